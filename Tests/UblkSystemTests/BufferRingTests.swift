import CLiburing
import Glibc
import Testing
@testable import UblkSystem

/// The provided-buffer ring batched ublk queues take their tags in (FETCH_IO_CMDS), tried
/// with plain reads from a pipe: the kernel picks a buffer, the completion names it, and a
/// recycled buffer is picked again.
@Suite struct BufferRingTests {
    /// A READ of the pipe into whatever buffer of `group` the kernel picks.
    func readSelectingBuffer(_ ring: borrowing IORing, from fd: Int32, group: UInt16, userData: UInt64) throws {
        let sqe = try ring.handle.prepare(userData: userData)
        io_uring_prep_rw(Int32(IORING_OP_READ.rawValue), sqe, fd, nil, 0, 0)
        sqe.pointee.flags |= UInt8(1 << IOSQE_BUFFER_SELECT_BIT)
        sqe.pointee.buf_group = group
    }

    /// Writes `text` into the pipe, reads it through the ring, returns (buffer id, bytes).
    func roundTrip(_ ring: borrowing IORing, _ buffers: IORing.BufferRing, pipe: (Int32, Int32), _ text: String,
                   group: UInt16) throws -> (UInt16, String) {
        _ = text.withCString { write(pipe.1, $0, strlen($0)) }
        try readSelectingBuffer(ring, from: pipe.0, group: group, userData: 7)
        try ring.handle.submit(waitingFor: 1)
        var seen: (result: Int32, flags: UInt32)?
        ring.handle.reapWithFlags { userData, result, flags in
            #expect(userData == 7)
            seen = (result, flags)
        }
        let (result, flags) = try #require(seen)
        try #require(result > 0, "read failed: \(result)")
        #expect(flags & IORING_CQE_F_BUFFER != 0)
        let id = UInt16(truncatingIfNeeded: flags >> IORING_CQE_BUFFER_SHIFT)
        let bytes = UnsafeRawBufferPointer(start: buffers.buffer(id), count: Int(result))
        return (id, String(decoding: bytes, as: UTF8.self))
    }

    @Test func theKernelPicksABufferAndTakesItBackWhenRecycled() throws {
        var ring = try IORing(entries: 8, preferredFlags: IORing.singleThreadFlags)
        let buffers = try ring.registerBufferRing(group: 3, count: 2, size: 16)
        let ends = try Syscalls.pipe()
        defer { close(ends.0); close(ends.1) }

        let (first, text1) = try roundTrip(ring, buffers, pipe: ends, "tags-1", group: 3)
        let (second, text2) = try roundTrip(ring, buffers, pipe: ends, "tags-2", group: 3)
        #expect(text1 == "tags-1" && text2 == "tags-2")
        #expect(first != second, "a buffer not given back was picked again")

        // Both are taken: the next read finds none until one is recycled.
        _ = "x".withCString { write(ends.1, $0, 1) }
        try readSelectingBuffer(ring, from: ends.0, group: 3, userData: 8)
        try ring.handle.submit(waitingFor: 1)
        var result: Int32 = 0
        ring.handle.reap { _, value in result = value }
        #expect(result == -ENOBUFS)

        buffers.recycle(first)
        let (again, text3) = try roundTrip(ring, buffers, pipe: ends, "tags-3", group: 3)
        #expect(again == first && text3 == "xtags-3")
    }
}
