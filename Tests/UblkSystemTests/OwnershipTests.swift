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
        io_uring_prep_nop(try ring.handle.prepare(userData: 42))
        try ring.handle.submit(waitingFor: 1)
        var seen: [(UInt64, Int32)] = []
        #expect(ring.handle.reap { seen.append(($0, $1)) } == 1)
        #expect(seen.count == 1 && seen[0].0 == 42 && seen[0].1 == 0)
        #expect(ring.handle.reap { _, _ in Issue.record("a completion was reaped twice") } == 0)
    }

    /// More completions than one batch: every one is reaped exactly once, and the SQEs
    /// handed out are cleared (no field of an earlier use survives).
    @Test func reapingInBatchesSeesEveryCompletionOnce() throws {
        let ring = try IORing(entries: 64, preferredFlags: IORing.singleThreadFlags)
        let count = IORing.reapBatch * 2 + 5
        for value in 0..<count {
            let sqe = try ring.handle.prepare(userData: UInt64(value) | 1 << 40)
            #expect(sqe.pointee.fd == 0 && sqe.pointee.flags == 0 && sqe.pointee.len == 0 && sqe.pointee.off == 0)
            io_uring_prep_nop(sqe)
            sqe.pointee.fd = -1 // junk the next use of this slot must not see
            sqe.pointee.len = 77
        }
        var seen = Set<UInt64>()
        while seen.count < count {
            try ring.handle.submit(waitingFor: 1)
            ring.handle.reap { userData, result in
                #expect(result == 0)
                #expect(seen.insert(userData).inserted, "completion \(userData) reaped twice")
            }
        }
        #expect(seen == Set((0..<count).map { UInt64($0) | 1 << 40 }))
    }

    /// What `RequestStep.finishing` relies on: an operation linked to the next SQE posts no
    /// completion when it moves all its bytes (only the next one completes); a short read
    /// posts its own, and the next is canceled without one (the skip passes on to the
    /// link). A full submission queue refuses the link.
    @Test func aLinkedReadIsSilentUnlessItEndsShort() throws {
        let path = "/tmp/ublk-link-test-\(getpid())"
        defer { unlink(path) }
        let file = try FileDescriptor(path: path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        #expect(ftruncate(file.rawValue, 8192) == 0)
        let ring = try IORing(entries: 4, preferredFlags: IORing.singleThreadFlags)
        let buffer = try AlignedBuffer(count: 4096)
        func linkedRead(at offset: UInt64) throws -> [UInt64: Int32] {
            io_uring_prep_read(try ring.handle.prepare(userData: 1, zeroed: false), file.rawValue, buffer.base, 4096, offset)
            #expect(ring.handle.linkLastPrepared())
            try ring.handle.prepareNop(userData: 2)
            try ring.handle.submit(waitingFor: 1)
            var seen: [UInt64: Int32] = [:]
            // Whatever else comes, within a while (task work runs on each enter).
            for _ in 0..<20 {
                ring.handle.reap { seen[$0] = $1 }
                usleep(5_000)
                try ring.handle.submit()
            }
            return seen
        }
        #expect(try linkedRead(at: 0) == [2: 0])
        #expect(try linkedRead(at: 6144) == [1: 2048])
        for value in 0..<4 { try ring.handle.prepareNop(userData: UInt64(value)) }
        #expect(!ring.handle.linkLastPrepared())
    }

    /// The command area of a URING_CMD SQE is `sqe->cmd`, which overlays `addr3` at byte 48.
    @Test func commandAreaIsAtByte48() throws {
        let ring = try IORing(entries: 4, flags: IORING_SETUP_SQE128)
        let area = try ring.handle.prepareCommand(fd: 3, fixedFile: true, opcode: 0x21, userData: 7)
        area.storeBytes(of: 0x1122_3344_5566_7788 as UInt64, as: UInt64.self)
        let sqe = area.assumingMemoryBound(to: UInt8.self) - IORing.commandAreaOffset
        let entry = UnsafeMutableRawPointer(sqe).assumingMemoryBound(to: io_uring_sqe.self)
        #expect(entry.pointee.addr3 == 0x1122_3344_5566_7788)
        #expect(entry.pointee.cmd_op == 0x21 && entry.pointee.fd == 3 && entry.pointee.user_data == 7)
        #expect(entry.pointee.opcode == UInt8(IORING_OP_URING_CMD.rawValue))
    }
}

import CLiburing

extension OwnershipTests {
    /// The probe runs to an answer on the host's kernel, and the same answer twice.
    @Test func theLinkedCommandProbeAnswers() throws {
        let first = try IORing.probeLinkedCommandCopy()
        #expect(try IORing.probeLinkedCommandCopy() == first)
        #expect(IORing.copiesLinkedCommands == first)
        print("host kernel copies linked commands at submission: \(first)")
    }
}
