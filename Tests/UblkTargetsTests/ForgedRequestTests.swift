import Glibc
import Testing
import UblkQueue
import UblkSystem
import UblkTesting
@testable import UblkTargets

/// Requests a target must survive: forged ranges never reach the backing file, a
/// backing that shrank underneath fails reads past its end (as loop.c does), and
/// odd-but-valid requests finish with a result instead of a crash.
@Suite struct ForgedRequestTests {
    typealias ScratchFile = LoopTargetTests.ScratchFile

    func snapshot(_ file: ScratchFile, size: Int) -> [UInt8] { file.bytes(at: 0, count: size) }

    @Test func forgedRangesNeverReachTheFile() throws {
        let file = try ScratchFile(size: 256 * 1024)
        let target = try LoopTarget(LoopConfiguration(path: file.path))
        let queue = try OfflineQueue(target: target, depth: 4, bufferSize: 64 * 1024)
        for tag in 0..<4 { memset(queue.buffer(tag: tag), 0x3C, 64 * 1024) }
        let before = snapshot(file, size: 256 * 1024)
        let forged: [IODescriptor] = [
            IODescriptor(operation: .write, startSector: 512, sectorCount: 1),          // just past the end
            IODescriptor(operation: .write, startSector: 511, sectorCount: 2),          // straddles the end
            IODescriptor(operation: .write, startSector: UInt64.max - 3, sectorCount: 8), // wraps around
            IODescriptor(operation: .write, startSector: 1 << 55, sectorCount: 8),       // offset overflows Int64
            IODescriptor(operation: .write, startSector: 0, sectorCount: 129),          // longer than the buffer
            IODescriptor(operation: .write, startSector: 0, sectorCount: 0),            // empty transfer
            IODescriptor(operation: .discard, startSector: 500, sectorCount: 100),      // discard past the end
            IODescriptor(operation: .writeZeroes, startSector: UInt64.max, sectorCount: 1),
            IODescriptor(operation: .unsupported(4), startSector: 0, sectorCount: 8),   // WRITE_SAME
        ]
        for (index, descriptor) in forged.enumerated() {
            let result = try queue.perform(descriptor, tag: index % 4)
            #expect(result < 0, "forged \(descriptor) completed with \(result)")
            #expect(result == -EIO || result == -EOPNOTSUPP, "forged \(descriptor) completed with \(result)")
        }
        #expect(queue.inFlight == 0)
        #expect(snapshot(file, size: 256 * 1024) == before, "a forged request changed the backing file")
        // The queue still works afterwards.
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 504, sectorCount: 8)) == 4096)
        #expect(file.bytes(at: 504 * 512, count: 4096).allSatisfy { $0 == 0x3C })
    }

    /// As the kernel loop driver: a read wholly past the end of a backing that shrank
    /// underneath fails with EIO (no zeros the file does not hold); one that straddles the
    /// end completes the blocks before it (the driver sends the rest again, which fails).
    @Test func aBackingThatShrankFailsReadsPastItsEnd() throws {
        let file = try ScratchFile(size: 1 << 20, fill: 0x77)
        var configuration = LoopConfiguration(path: file.path)
        configuration.directIO = .off
        let queue = try OfflineQueue(target: try LoopTarget(configuration), depth: 2, bufferSize: 64 * 1024)
        // Someone truncates the backing behind the server's back, to an odd size.
        #expect(truncate(file.path, 512 * 1024 + 100) == 0)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 1536, sectorCount: 16)) == -EIO)
        memset(queue.buffer(tag: 1), 0xEE, 64 * 1024)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 1024 - 8, sectorCount: 16), tag: 1) == 4096)
        #expect(UnsafeRawBufferPointer(start: queue.buffer(tag: 1), count: 4096).allSatisfy { $0 == 0x77 })
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 1024, sectorCount: 8)) == -EIO)
    }

    /// Zero copy: ublk_drv (7.3, UBLK_F_AUTO_BUF_REG) ends a request whole on a partial
    /// result, as if every byte had been read, so a read that meets the end of a shrunk
    /// backing fails whole there; with a tag buffer its whole blocks complete.
    @Test func aReadMeetingTheEndInZeroCopyFailsWhole() throws {
        let file = try ScratchFile(size: 1 << 20, fill: 0x77)
        let handler = try LoopTarget(LoopConfiguration(path: file.path)).makeQueueHandler(queueID: 0, depth: 1, share: .all)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { buffer.deallocate() }
        let read = IODescriptor(operation: .read, startSector: 0, sectorCount: 16)
        handler.transferred[0] = 4096 + 100
        #expect(handler.endOfBacking(IORequest(tag: 0, descriptor: read, data: .buffer(buffer))) == 4096)
        #expect(handler.endOfBacking(IORequest(tag: 0, descriptor: read, data: .registered(index: 0, offset: 0))) == -EIO)
    }

    /// A sparse backing of the largest size a file can have (tmpfs makes one): served, its
    /// last sectors read as zeros. The probe for hole punching, past the end, once trapped
    /// on rounding the size up.
    @Test func theLargestFileIsServed() throws {
        let path = "/dev/shm/ublk-largest-\(getpid())"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0o600)
        #expect(fd >= 0)
        defer { close(fd); unlink(path) }
        #expect(ftruncate(fd, Int(Int64.max)) == 0)
        var configuration = LoopConfiguration(path: path)
        configuration.directIO = .off
        let target = try LoopTarget(configuration)
        let size = target.properties.size
        #expect(size > UInt64(Int64.max) - 4096 && !target.properties.supportsDiscard)
        let queue = try OfflineQueue(target: target, depth: 1, bufferSize: 4096)
        memset(queue.buffer(tag: 0), 0xEE, 4096)
        let last = IODescriptor(operation: .read, startSector: size / 512 - 8, sectorCount: 8)
        #expect(try queue.perform(last) == 4096)
        #expect(UnsafeRawBufferPointer(start: queue.buffer(tag: 0), count: 4096).allSatisfy { $0 == 0 })
    }

    @Test func oddButValidRequestsFinish() throws {
        let file = try ScratchFile(size: 256 * 1024)
        let queue = try OfflineQueue(target: try LoopTarget(LoopConfiguration(path: file.path)), depth: 2, bufferSize: 64 * 1024)
        // A one-sector read and write at the very last sector.
        memset(queue.buffer(tag: 0), 0x42, 512)
        #expect(try queue.perform(IODescriptor(operation: .write, flags: .fua, startSector: 511, sectorCount: 1)) == 512)
        #expect(file.bytes(at: 511 * 512, count: 512).allSatisfy { $0 == 0x42 })
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 511, sectorCount: 1), tag: 1) == 512)
        // A flush whatever its (junk) range says; an empty discard gets an answer, not a crash.
        #expect(try queue.perform(IODescriptor(operation: .flush, startSector: UInt64.max, sectorCount: UInt32.max)) == 0)
        _ = try queue.perform(IODescriptor(operation: .discard, startSector: 0, sectorCount: 0))
        #expect(queue.inFlight == 0)
    }

    @Test func nullTargetRefusesForgedRangesToo() throws {
        let queue = try OfflineQueue(target: NullTarget(size: 1 << 20), depth: 1, bufferSize: 8192)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 2048, sectorCount: 1)) == -EIO)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 17)) == -EIO)
        #expect(try queue.perform(IODescriptor(operation: .unsupported(13), startSector: 0, sectorCount: 1)) == -EOPNOTSUPP)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 2047, sectorCount: 1)) == 512)
    }
}
