import Glibc
import Testing
@testable import UblkSystem

/// A server started from a shell with `ulimit -f` writes its backing as the kernel's loop
/// driver does, without that limit; where the limit cannot be lifted, a write past it
/// fails with EFBIG instead of killing the process with SIGXFSZ.
@Suite(.serialized) struct FileSizeLimitTests {
    @Test func theShellsLimitIsLifted() throws {
        let before = try Syscalls.fileSizeLimit()
        defer { try? Syscalls.setFileSizeLimit(soft: before.soft, hard: before.hard) }
        try Syscalls.setFileSizeLimit(soft: 1 << 20, hard: before.hard)
        #expect(FileSizeLimit.lift() == nil || geteuid() != 0)
        let after = try Syscalls.fileSizeLimit()
        #expect(after.soft == before.hard || after.soft == rlim_t.max)
    }

    @Test func aWritePastALimitThatStaysFailsAlone() throws {
        let before = try Syscalls.fileSizeLimit()
        defer { try? Syscalls.setFileSizeLimit(soft: before.soft, hard: before.hard) }
        _ = FileSizeLimit.lift()  // SIGXFSZ ignored from here on
        try Syscalls.setFileSizeLimit(soft: 4096, hard: before.hard)
        let path = "/tmp/ublk-fsize-\(getpid())"
        defer { unlink(path) }
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        #expect(fd >= 0)
        defer { close(fd) }
        var byte: UInt8 = 1
        #expect(pwrite(fd, &byte, 1, 0) == 1)
        #expect(pwrite(fd, &byte, 1, 8192) == -1 && errno == EFBIG)
    }
}
