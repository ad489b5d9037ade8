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

    /// A zero-copy source whose PREP of every tag went out and was answered.
    func prepared(depth: Int, ring: inout IORing) throws -> UblkBatchCommands {
        let commands = try source(depth: depth, buffers: .autoRegister(fallback: false), ring: &ring)
        for tag in 0..<depth { try commands.fetch(request(UInt16(tag), nil), ring.handle) }
        _ = try commands.flush(ring.handle)
        _ = try commands.batchCompleted(step: CommandStep.batchPrepare, tag: 0, result: 0, flags: 0, ring.handle) { _ in }
        return commands
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
        let commands = try prepared(depth: 8, ring: &ring)
        let array = commands.gathering
        for tag: UInt16 in [5, 1, 6, 3] { try commands.commit(request(tag, nil), result: 0, step: 0, ring.handle) }
        #expect(commands.elementBytes == 8 && gathered(commands).map(\.buf_index) == [5, 1, 6, 3])
        _ = try commands.flush(ring.handle)
        // The kernel took the first element and refused the second (8 bytes answered).
        let settled = try commands.batchCompleted(step: CommandStep.batchCommit, tag: UInt16(array), result: 8,
                                                  flags: 0, ring.handle) { _ in }
        #expect(settled == -2 && commands.sent == 0)
        #expect(gathered(commands).map(\.tag) == [6, 3])
        // All of it taken.
        _ = try commands.flush(ring.handle)
        #expect(try commands.batchCompleted(step: CommandStep.batchCommit, tag: UInt16(1 - array), result: 16,
                                            flags: 0, ring.handle) { _ in } == -2)
        #expect(commands.gathered == 0)
    }

    /// A FETCH completion handing out `tags` (from provided buffer 0); returns the change in
    /// the commands the kernel holds, and the tags that arrived.
    func deliver(_ tags: [UInt16], to commands: UblkBatchCommands, ending result: Int32? = nil,
                 _ ring: IORing.Handle) throws -> (change: Int, arrived: [Int]) {
        let buffer = UnsafeMutableRawPointer(mutating: commands.tagBuffers.buffer(0))
        for (index, tag) in tags.enumerated() { buffer.storeBytes(of: tag, toByteOffset: 2 * index, as: UInt16.self) }
        // IORING_CQE_F_BUFFER | IORING_CQE_F_MORE (buffer id 0 in the high bits)
        let flags: UInt32 = result == nil ? 1 | 2 : 0
        var arrived: [Int] = []
        let change = try commands.batchCompleted(step: CommandStep.batchFetch, tag: 0, result: result ?? Int32(2 * tags.count),
                                                 flags: flags, ring) { arrived.append($0) }
        return (change, arrived)
    }

    /// Linked commits are not counted as settled until the queue learns they went: the tag
    /// comes back in a FETCH (the new request takes the old one's place), or the fetch ends.
    /// A failed backing operation unlinks its request (it goes on); a refused linked commit
    /// drops its request; a cancelled one changes nothing.
    @Test func linkedCommitsAreSettledByTheNextFetchOrItsEnd() throws {
        var ring = try IORing(entries: 32)
        let commands = try prepared(depth: 4, ring: &ring)
        #expect(try deliver([0, 1, 2, 3], to: commands, ring.handle) == (4, [0, 1, 2, 3]))
        for tag: UInt16 in 0..<4 {
            try ring.handle.prepareNop(userData: 99)  // the backing operation
            #expect(try commands.linkCommit(request(tag, nil), result: 4096, ring.handle))
        }
        #expect(commands.linkedCommits == 4 && commands.gathered == 0)
        #expect(try commands.flush(ring.handle) == 0)  // nothing gathered: the wait is for the next request

        #expect(try deliver([0], to: commands, ring.handle) == (0, [0]))  // 0's commit went
        commands.backingCompleted(tag: 1)  // 1's I/O failed: its commit was cancelled
        #expect(try commands.batchCompleted(step: CommandStep.batchLinkedCommit, tag: 1, result: -ECANCELED, flags: 0,
                                            ring.handle) { _ in } == 0)
        #expect(try commands.batchCompleted(step: CommandStep.batchLinkedCommit, tag: 2, result: -EINVAL, flags: 0,
                                            ring.handle) { _ in } == -1)  // refused: dropped
        #expect(commands.linkedCommits == 1 && commands.linked[3] && !commands.linked[1] && !commands.linked[2])

        // The fetch ends for good (the device stopped once its requests completed): tag 3's
        // commit is settled with it.
        #expect(try deliver([], to: commands, ending: -ENODEV, ring.handle) == (-2, []))
        #expect(!commands.fetchArmed && commands.linkedCommits == 0 && !commands.linked[3])
        // No link once the fetch has ended: the commit is gathered.
        try ring.handle.prepareNop(userData: 99)
        #expect(try !commands.linkCommit(request(1, nil), result: 4096, ring.handle))
    }
}
