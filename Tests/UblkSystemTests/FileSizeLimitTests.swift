import Glibc
import Testing
@testable import UblkSystem

/// A server started from a shell with `ulimit -f` writes its backing as the kernel's loop
/// driver does, without that limit; where the limit cannot be lifted, a write past it
/// fails with EFBIG instead of killing the process with SIGXFSZ. Each test runs in a child
/// process: a limit set in the test process would hit the other suites running beside it.
@Suite struct FileSizeLimitTests {
    /// Runs `body` in a forked child and returns its wait status: 0 when it returned true.
    /// (The child calls only what needs no lock another thread could hold at the fork.)
    func inChild(_ body: () -> Bool) -> Int32 {
        let pid = fork()
        if pid == 0 { _exit(body() ? 0 : 1) }
        var status: Int32 = -1
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status
    }

    @Test func theShellsLimitIsLifted() {
        let root = geteuid() == 0
        #expect(inChild {
            guard let (_, hard) = try? Syscalls.fileSizeLimit(),
                  (try? Syscalls.setFileSizeLimit(soft: 1 << 20, hard: hard)) != nil else { return false }
            let stays = FileSizeLimit.lift()
            guard let (soft, _) = try? Syscalls.fileSizeLimit() else { return false }
            return root ? stays == nil && soft == rlim_t.max : soft == hard
        } == 0)
    }

    @Test func aWritePastALimitThatStaysFailsAlone() {
        let path = "/tmp/ublk-fsize-\(getpid())"
        defer { unlink(path) }
        #expect(inChild {
            // As in a shell: SIGXFSZ kills (the test runner's threads may ignore or block it).
            var fileSizeSignal = sigset_t()
            sigemptyset(&fileSizeSignal)
            sigaddset(&fileSizeSignal, SIGXFSZ)
            pthread_sigmask(SIG_UNBLOCK, &fileSizeSignal, nil)
            signal(SIGXFSZ, SIG_DFL)
            _ = FileSizeLimit.lift()  // SIGXFSZ ignored from here on
            guard let (_, hard) = try? Syscalls.fileSizeLimit(),
                  (try? Syscalls.setFileSizeLimit(soft: 4096, hard: hard)) != nil else { return false }
            let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
            var byte: UInt8 = 1
            return fd >= 0 && pwrite(fd, &byte, 1, 0) == 1 && pwrite(fd, &byte, 1, 8192) == -1 && errno == EFBIG
        } == 0)
    }
}
