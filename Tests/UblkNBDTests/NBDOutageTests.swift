import Glibc
import Testing
import UblkQueue
import UblkSystem
import UblkTargets
import UblkTesting
@testable import UblkNBD

/// Servers that drop the connection again and again, or tell the client to go: the nbd
/// target reconnects and resends, but never past the reconnect timeout in all.
@Suite struct NBDOutageTests {
    static let read = IODescriptor(operation: .read, startSector: 8, sectorCount: 16)

    /// A READ on which the server hangs up, on every connection for 40 connections (4 s
    /// at the first backoff's pace), then answers: with 1 s of budget it fails with EIO
    /// after about 1 s, after a handful of reconnects.
    @Test func aRequestTheServerKeepsHangingUpOnFailsWithinTheTimeout() throws {
        let server = try LoopbackServer { connection, _ in connection < 40 ? .hangUp : .reply(error: 0) }
        defer { server.stop() }
        let queue = try OfflineQueue(target: try server.target(timeout: 1), depth: 2, bufferSize: 64 * 1024)
        let start = ContinuousClock.now
        #expect(try queue.perform(Self.read) == -EIO)
        let waited = ContinuousClock.now - start
        #expect(waited >= .milliseconds(900) && waited < .seconds(3), "waited \(waited)")
        #expect(server.connections <= 8, "\(server.connections) connections in \(waited)")
    }

    /// Other requests answered meanwhile do not end the outage of the one the server hangs
    /// up on: it still fails within the budget.
    @Test func answersToOtherRequestsDoNotExtendTheBudget() throws {
        let server = try LoopbackServer { connection, request in
            request.offset == 8 * 512 && connection < 40 ? .hangUp : .reply(error: 0)
        }
        defer { server.stop() }
        let queue = try OfflineQueue(target: try server.target(timeout: 1), depth: 2, bufferSize: 64 * 1024)
        let start = ContinuousClock.now
        var poisoned: Int32?
        try queue.start(tag: 0, Self.read)
        try queue.start(tag: 1, IODescriptor(operation: .read, startSector: 0, sectorCount: 8))
        while poisoned == nil && ContinuousClock.now - start < .seconds(8) {
            try queue.reap { tag, result throws in
                if tag == 0 { poisoned = result } else {
                    try queue.start(tag: 1, IODescriptor(operation: .read, startSector: 0, sectorCount: 8))
                }
            }
        }
        #expect(poisoned == -EIO, "after \(ContinuousClock.now - start)")
        while queue.inFlight > 0 { try queue.reap { _, _ in } }
    }
}

extension NBDOutageTests {
    /// A server that hangs with its connection up is given up by the watchdog (1 s here),
    /// but it may come back and apply what it had read: a WRITE sent on that connection
    /// fails with EIO rather than going again (a later write to the same blocks, answered on
    /// the next connection, would be undone by the old one), while a READ goes again and is
    /// answered on the next connection.
    @Test func aWriteSentToAHungServerFailsAndIsNotSentAgain() throws {
        let server = try LoopbackServer { connection, _ in connection == 0 ? .ignore : .reply(error: 0) }
        defer { server.stop() }
        let queue = try OfflineQueue(target: try server.target(timeout: 2, minimumSilence: .seconds(1)), depth: 2,
                                     bufferSize: 64 * 1024)
        memset(queue.buffer(tag: 0), 0x33, 4096)
        try queue.start(tag: 0, IODescriptor(operation: .write, startSector: 0, sectorCount: 8))
        try queue.start(tag: 1, Self.read)
        var results: [Int: Int32] = [:]
        let start = ContinuousClock.now
        while results.count < 2 && start.duration(to: .now) < .seconds(10) { try queue.reap { results[$0] = $1 } }
        #expect(results[0] == -EIO)
        #expect(results[1] == 8192)
        let commands = server.log.requests.withLock { $0.map { $0.map(\.command) } }
        #expect(commands.first?.sorted() == [NBDCommand.read.rawValue, NBDCommand.write.rawValue].sorted())
        #expect(commands.dropFirst().allSatisfy { !$0.contains(NBDCommand.write.rawValue) }, "\(commands)")
    }

    /// A server that hangs up (a crash, a restart) applies nothing more from that
    /// connection: a WRITE it left unanswered goes again on the next one.
    @Test func aWriteTheServerHungUpOnGoesAgain() throws {
        let server = try LoopbackServer { connection, _ in connection == 0 ? .hangUp : .reply(error: 0) }
        defer { server.stop() }
        let queue = try OfflineQueue(target: try server.target(timeout: 5), depth: 2, bufferSize: 64 * 1024)
        memset(queue.buffer(tag: 0), 0x33, 4096)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 8)) == 4096)
        #expect(server.connections == 2)
    }

    /// A server that takes the device over from one that could not make its writes durable
    /// (`ublk upgrade` after the NBD server crashed) fails its first FLUSH, once, as the old
    /// one would have; until then `writesLost` says so (for the next handover).
    @Test func aLossInheritedFailsTheFirstFlush() throws {
        let server = try LoopbackServer { _, _ in .reply(error: 0) }
        defer { server.stop() }
        let target = try server.target()
        #expect(!target.writesLost)
        target.writesWereLost()
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        #expect(target.writesLost)
        let flush = IODescriptor(operation: .flush, startSector: 0, sectorCount: 0)
        #expect(try queue.perform(flush) == -EIO)
        #expect(!target.writesLost)
        #expect(try queue.perform(flush) == 0)
    }

    /// NBD_ESHUTDOWN is no answer to give the kernel: the client says DISC, reconnects and
    /// sends the READ again, which the next connection answers.
    @Test func aServerShuttingDownGetsADisconnectAndTheRequestAgain() throws {
        let server = try LoopbackServer { connection, _ in .reply(error: connection == 0 ? NBDErrorNumber.eshutdown : 0) }
        defer { server.stop() }
        let queue = try OfflineQueue(target: try server.target(), depth: 2, bufferSize: 64 * 1024)
        #expect(try queue.perform(Self.read) == 8192)
        #expect(UnsafeRawBufferPointer(start: queue.buffer(tag: 0), count: 8192).allSatisfy { $0 == LoopbackServer.data })
        let first = server.log.requests.withLock { $0[0].map(\.command) }
        #expect(first == [NBDCommand.read.rawValue, NBDCommand.disconnect.rawValue])
    }
}

extension NBDOutageTests {
    /// A WRITE answered on a connection that then dies, with no FLUSH answered since, may
    /// be lost in a crashed server's cache: the next FLUSH fails with EIO, once. With the
    /// FLUSH answered before the connection died, nothing is lost.
    @Test(arguments: [false, true]) func writesAnsweredOnADeadConnectionFailTheNextFlush(flushedBefore: Bool) throws {
        // The first connection answers everything but READs, on which it hangs up.
        let server = try LoopbackServer { connection, request in
            connection == 0 && request.command == NBDCommand.read.rawValue ? .hangUp : .reply(error: 0)
        }
        defer { server.stop() }
        let queue = try OfflineQueue(target: try server.target(), depth: 2, bufferSize: 64 * 1024)
        let flush = IODescriptor(operation: .flush, startSector: 0, sectorCount: 0)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 8)) == 4096)
        if flushedBefore { #expect(try queue.perform(flush) == 0) }
        #expect(try queue.perform(Self.read) == 8192) // the first connection dies; the second answers
        #expect(try queue.perform(flush) == (flushedBefore ? 0 : -EIO))
        #expect(try queue.perform(flush) == 0)
        #expect(server.connections == 2)
    }

    /// A write answered on a connection the watchdog then gives up (the server alive, a
    /// reply withheld: no crash, so no write counts as lost) still waits in the server's
    /// cache: the device's last sync sends the FLUSH for it, though the connection after
    /// it wrote nothing.
    @Test func aWriteAnsweredOnAConnectionGivenUpIsFlushedAtTheStop() throws {
        let server = try LoopbackServer { connection, request in
            connection == 0 && request.command == NBDCommand.read.rawValue ? .ignore : .reply(error: 0)
        }
        defer { server.stop() }
        let target = try server.target(timeout: 5, minimumSilence: .seconds(1))
        do {
            let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
            #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 8)) == 4096)
            #expect(try queue.perform(Self.read, tag: 1) == 8192)  // After the watchdog's reconnect.
        }  // The queue, and its handler, end here: as a stopping device's do.
        #expect(!target.writesLost)
        try target.sync()
        let commands = server.log.requests.withLock { $0.map { $0.map(\.command) } }
        #expect(commands.count == 3, "\(commands)")
        #expect(commands.last?.first == NBDCommand.flush.rawValue, "\(commands)")
    }
}
