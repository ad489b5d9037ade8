import CUblk
import Glibc
import Logging
import Testing
@testable import UblkQueue
import UblkSystem

/// `UblkBatchCommands` without the driver: /dev/zero stands in for /dev/ublkcN (its mmap
/// gives the descriptor array), so what is checked is the source's own bookkeeping of the
/// element arrays, not the kernel's answers, which the tests hand in.
@Suite struct BatchCommandsTests {
    /// (The descriptor array stays mapped once /dev/zero is closed again.)
    func source(depth: Int, buffers: TagBufferMode, ring: inout IORing) throws -> UblkBatchCommands {
        let zero = try FileDescriptor(path: "/dev/zero", flags: O_RDWR)
        let configuration = QueueConfiguration(queueID: 0, depth: depth, buffers: buffers,
                                               limits: DeviceLimits(sectors: 1 << 20, maxIOBytes: 4096), encoding: .ioctl)
        return try UblkBatchCommands(configuration, characterDevice: zero.rawValue, ring: &ring,
                                     logger: Logger(label: "test"))
    }

    func request(_ tag: UInt16, _ buffer: UnsafeMutableRawPointer?) -> IORequest {
        IORequest(tag: tag, descriptor: IODescriptor(operation: .read, startSector: 0, sectorCount: 8),
                  data: buffer.map { .buffer($0) } ?? .registered(index: tag, offset: 0))
    }

    func gathered(_ commands: UblkBatchCommands) -> [ublk_elem_header] {
        let base = commands.elements + commands.gathering * commands.depth * commands.elementBytes
        return (0..<commands.gathered).map {
            base.load(fromByteOffset: $0 * commands.elementBytes, as: ublk_elem_header.self)
        }
    }

    /// The first flush is the PREP of every tag, with the tag's buffer in copy mode; later
    /// ones are COMMITs; nothing is sent while the kernel has not answered the last one.
    @Test func prepThenCommitsOneAtATime() throws {
        var ring = try IORing(entries: 16)
        let commands = try source(depth: 4, buffers: .copy(bytesPerTag: 4096), ring: &ring)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        for tag in 0..<4 { try commands.fetch(request(UInt16(tag), buffer), ring.handle) }
        #expect(commands.elementBytes == 16 && gathered(commands).map(\.tag) == [0, 1, 2, 3])
        let address = (commands.elements + 8).load(as: UInt64.self)
        #expect(address == UInt64(UInt(bitPattern: buffer)))
        #expect(try commands.flush(ring.handle) == 1)  // PREP, answered during the submit; fetch armed
        #expect(commands.prepared && commands.fetchArmed && commands.sent == 4 && commands.gathered == 0)

        try commands.commit(request(2, buffer), result: 4096, step: CommandStep.fetch, ring.handle)
        #expect(try commands.flush(ring.handle) == 0)  // the PREP is not answered yet: waits
        #expect(commands.gathered == 1)
        #expect(try commands.batchCompleted(step: CommandStep.batchPrepare, tag: 0, result: 0, flags: 0,
                                            ring.handle) { _ in } == 0)
        #expect(try commands.flush(ring.handle) == 1)
        #expect(commands.sent == 1 && commands.gathered == 0)
    }

    /// A COMMIT the kernel took only in part: the refused element is dropped, the ones
    /// after it are gathered again, and the queue is told how many are settled.
    @Test func aPartialCommitSendsTheRestAgain() throws {
        var ring = try IORing(entries: 16)
        let commands = try source(depth: 8, buffers: .autoRegister(fallback: false), ring: &ring)
        for tag in 0..<8 { try commands.fetch(request(UInt16(tag), nil), ring.handle) }
        _ = try commands.flush(ring.handle)
        _ = try commands.batchCompleted(step: CommandStep.batchPrepare, tag: 0, result: 0, flags: 0, ring.handle) { _ in }
        commands.held = 4
        let array = commands.gathering
        for tag: UInt16 in [5, 1, 6, 3] { try commands.commit(request(tag, nil), result: 0, step: 0, ring.handle) }
        #expect(commands.elementBytes == 8 && gathered(commands).map(\.buf_index) == [5, 1, 6, 3])
        _ = try commands.flush(ring.handle)
        // The kernel took the first element and refused the second (8 bytes answered).
        let settled = try commands.batchCompleted(step: CommandStep.batchCommit, tag: UInt16(array), result: 8,
                                                  flags: 0, ring.handle) { _ in }
        #expect(settled == -2 && commands.held == 2 && commands.sent == 0)
        #expect(gathered(commands).map(\.tag) == [6, 3])
        // All of it taken.
        _ = try commands.flush(ring.handle)
        #expect(try commands.batchCompleted(step: CommandStep.batchCommit, tag: UInt16(1 - array), result: 16,
                                            flags: 0, ring.handle) { _ in } == -2)
        #expect(commands.held == 0 && commands.gathered == 0)
    }
}
