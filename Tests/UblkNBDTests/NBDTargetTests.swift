import Glibc
import Testing
import UblkNBD
import UblkQueue
import UblkSystem
import UblkTargets
import UblkTesting

/// The nbd target through the production queue engine (`OfflineQueue`: requests handed
/// in instead of fetched from ublk) against real servers on 127.0.0.1: data lands where
/// it should, replies out of order are matched, a server restart loses nothing, and a
/// server that stays away fails I/O with EIO after the reconnect timeout.
@Suite(.serialized) struct NBDTargetTests {
    static let imageSize = 4 << 20
    static let bufferSize = 128 * 1024

    func nbdkit(_ scratch: ScratchDirectory, port: UInt16, filters: [String] = []) throws -> ServerProcess {
        try ServerProcess(["nbdkit", "-f", "-i", "127.0.0.1", "-p", "\(port)"] + filters + ["file", scratch.image],
                          log: scratch.path + "/server.log")
    }

    func target(port: UInt16, export: String = "disk", timeout: Int = 30, server: ServerProcess) throws -> NBDTarget {
        _ = try server.connect("nbd://127.0.0.1:\(port)/\(export)") // waits until it listens
        var configuration = NBDConfiguration(uri: "nbd://127.0.0.1:\(port)/\(export)")
        configuration.reconnectTimeout = timeout
        return try NBDTarget(configuration)
    }

    /// Runs `requests` (tag = index) all at once and returns each one's result.
    func runAll(_ queue: OfflineQueue<NBDTarget>, _ requests: [IODescriptor]) throws -> [Int32] {
        var results = [Int32?](repeating: nil, count: requests.count)
        for (tag, request) in requests.enumerated() { try queue.start(tag: tag, request) }
        while results.contains(where: { $0 == nil }) { try queue.reap { results[$0] = $1 } }
        return results.map { $0! }
    }

    func fill(_ queue: OfflineQueue<NBDTarget>, tag: Int, count: Int, seed: UInt8) {
        let buffer = queue.buffer(tag: tag).assumingMemoryBound(to: UInt8.self)
        for i in 0..<count { buffer[i] = UInt8(truncatingIfNeeded: i &* 7) &+ seed }
    }

    func bytes(_ queue: OfflineQueue<NBDTarget>, tag: Int, count: Int) -> [UInt8] {
        Array(UnsafeBufferPointer(start: queue.buffer(tag: tag).assumingMemoryBound(to: UInt8.self), count: count))
    }

    @Test func writesReadsFlushTrimAndZeroesReachTheExport() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        let server = try nbdkit(scratch, port: port)
        defer { server.stop() }
        let target = try target(port: port, server: server)
        #expect(target.properties.size == UInt64(Self.imageSize))
        #expect(target.queueLimit == nil, "nbdkit allows multi-conn")
        let queue = try OfflineQueue(target: target, depth: 8, bufferSize: Self.bufferSize)
        // Eight writes of 64 KiB at once, then flush, then eight reads at once.
        let length = 64 * 1024
        for tag in 0..<8 { fill(queue, tag: tag, count: length, seed: UInt8(tag)) }
        let writes = (0..<8).map { IODescriptor(operation: .write, flags: $0 == 3 ? .fua : [], startSector: UInt64($0 * 256), sectorCount: 128) }
        #expect(try runAll(queue, writes) == Array(repeating: Int32(length), count: 8))
        #expect(try queue.perform(IODescriptor(operation: .flush, startSector: 0, sectorCount: 0)) == 0)
        for tag in 0..<8 {
            #expect(scratch.imageBytes(at: tag * 128 * 1024, count: length) == bytes(queue, tag: tag, count: length))
            memset(queue.buffer(tag: tag), 0, length)
        }
        let reads = (0..<8).map { IODescriptor(operation: .read, startSector: UInt64((7 - $0) * 256), sectorCount: 128) }
        #expect(try runAll(queue, reads) == Array(repeating: Int32(length), count: 8))
        for tag in 0..<8 {
            #expect(bytes(queue, tag: tag, count: length) == scratch.imageBytes(at: (7 - tag) * 128 * 1024, count: length))
        }
        // Trim and write-zeroes: both read back as zeros.
        #expect(try queue.perform(IODescriptor(operation: .writeZeroes, flags: .noUnmap, startSector: 0, sectorCount: 8)) == 0)
        #expect(try queue.perform(IODescriptor(operation: .discard, startSector: 8, sectorCount: 8)) == 0)
        #expect(scratch.imageBytes(at: 0, count: 4096).allSatisfy { $0 == 0 })
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 8)) == 4096)
        #expect(bytes(queue, tag: 0, count: 4096).allSatisfy { $0 == 0 })
    }

    /// The device's last sync sends a FLUSH only where an answered write waits for one: a
    /// device that only read, or whose writes a FLUSH covered, stops without reaching for the
    /// server, which may be down (its stop then does not fail).
    @Test func theLastSyncFlushesOnlyWritesNoFlushCovered() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        var server = try nbdkit(scratch, port: port)
        let reader = try target(port: port, server: server)
        let writer = try target(port: port, server: server)
        let flushed = try target(port: port, server: server)
        func serve(_ target: NBDTarget, _ requests: [IODescriptor]) throws {
            let queue = try OfflineQueue(target: target, depth: 2, bufferSize: Self.bufferSize)
            for request in requests { #expect(try queue.perform(request) >= 0) }
        }  // The queue, and its handler, end here: as a stopping device's do.
        let write = IODescriptor(operation: .write, startSector: 0, sectorCount: 8)
        try serve(reader, [IODescriptor(operation: .read, startSector: 0, sectorCount: 8)])
        try serve(writer, [write])
        try serve(flushed, [write, IODescriptor(operation: .flush, startSector: 0, sectorCount: 0)])
        server.stop()
        try reader.sync()
        try flushed.sync()
        #expect(throws: (any Error).self) { try writer.sync() }
        // A server taking a device over flushes what the last one may have left unflushed.
        reader.takesOverWrites()
        #expect(throws: (any Error).self) { try reader.sync() }
        server = try nbdkit(scratch, port: port)
        defer { server.stop() }
        _ = try server.connect("nbd://127.0.0.1:\(port)/disk")
        try writer.sync()
    }

    @Test func aServerRestartLosesNothing() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        var server = try nbdkit(scratch, port: port)
        let target = try target(port: port, server: server)
        let queue = try OfflineQueue(target: target, depth: 4, bufferSize: Self.bufferSize)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 8)) == 4096)
        server.stop()
        // Requests arrive while the server is gone; it comes back 1 s later.
        for tag in 0..<4 { fill(queue, tag: tag, count: 32768, seed: UInt8(40 + tag)) }
        var results = [Int32?](repeating: nil, count: 4)
        for tag in 0..<4 {
            try queue.start(tag: tag, IODescriptor(operation: .write, startSector: UInt64(tag * 64), sectorCount: 64))
        }
        usleep(1_000_000)
        server = try nbdkit(scratch, port: port)
        defer { server.stop() }
        while results.contains(where: { $0 == nil }) { try queue.reap { results[$0] = $1 } }
        #expect(results == Array(repeating: Int32(32768), count: 4))
        for tag in 0..<4 {
            #expect(scratch.imageBytes(at: tag * 32768, count: 32768) == bytes(queue, tag: tag, count: 32768))
        }
    }

    @Test func aServerThatStaysAwayFailsIOWithEIO() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        let server = try nbdkit(scratch, port: port)
        let target = try target(port: port, timeout: 1, server: server)
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: Self.bufferSize)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 8)) == 4096)
        server.stop()
        let start = ContinuousClock.now
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 8)) == -EIO)
        let waited = ContinuousClock.now - start
        #expect(waited >= .milliseconds(900) && waited < .seconds(6), "waited \(waited)")
        // Down past the timeout: new I/O fails at once.
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 8), tag: 1) == -EIO)
    }

    @Test func anUnknownExportIsOneLineAndNoMultiConnMeansOneQueue() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        let server = try ServerProcess(["qemu-nbd", "-t", "-f", "raw", "-b", "127.0.0.1", "-p", "\(port)", "-x", "disk",
                                        scratch.image], log: scratch.path + "/server.log")
        defer { server.stop() }
        _ = try server.connect("nbd://127.0.0.1:\(port)/disk") // waits until it listens
        // qemu-nbd -e 1 serves one client at a time: ask for the unknown export first.
        do {
            _ = try NBDTarget(NBDConfiguration(uri: "nbd://127.0.0.1:\(port)/nope"))
            Issue.record("an unknown export was accepted")
        } catch {
            guard case .nbd(let nbd) = error else { throw error }
            #expect(nbd.kind == .exportNotFound)
            #expect(!"\(error)".contains("\n") && "\(error)".contains("nope"), "\(error)")
        }
        let target = try NBDTarget(NBDConfiguration(uri: "nbd://127.0.0.1:\(port)/disk"))
        #expect(target.queueLimit?.queues == 1, "qemu-nbd -e 1 has no multi-conn")
    }
}
