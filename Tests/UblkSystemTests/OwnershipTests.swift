import Glibc
import Testing
@testable import UblkSystem

@Suite struct OwnershipTests {
    @Test func openErrorNamesTheCall() {
        #expect(throws: SystemError("open /nonexistent/x", errno: ENOENT)) {
            _ = try FileDescriptor(path: "/nonexistent/x", flags: O_RDONLY)
        }
    }

    @Test func descriptorClosedWhenOwnerEnds() throws {
        var raw: Int32 = -1
        do {
            let file = try FileDescriptor(path: "/dev/null", flags: O_RDONLY)
            raw = file.rawValue
            #expect(fcntl(raw, F_GETFD) >= 0)
        }
        #expect(fcntl(raw, F_GETFD) == -1)
    }

    @Test func alignedBufferIsPageAlignedAndZeroed() throws {
        let buffer = try AlignedBuffer(count: 3 * 4096)
        #expect(Int(bitPattern: buffer.base) % MappedRegion.pageSize == 0)
        #expect(UnsafeRawBufferPointer(start: buffer.base, count: buffer.count).allSatisfy { $0 == 0 })
    }

    @Test func ringRunsAnOperation() throws {
        let ring = try IORing(entries: 4, preferredFlags: IORing.singleThreadFlags)
        let sqe = try ring.nextSubmission()
        io_uring_prep_nop_shim(sqe)
        _ = try ring.submit(waitingFor: 1)
        let completion = ring.peekCompletion()
        let cqe = try #require(completion)
        #expect(cqe.pointee.user_data == 42)
        #expect(cqe.pointee.res == 0)
        ring.markSeen(cqe)
    }
}

import CLiburing
func io_uring_prep_nop_shim(_ sqe: UnsafeMutablePointer<io_uring_sqe>) {
    io_uring_prep_nop(sqe)
    io_uring_sqe_set_data64(sqe, 42)
}
