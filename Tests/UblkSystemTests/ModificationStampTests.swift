import Glibc
import Testing
@testable import UblkSystem

@Suite struct ModificationStampTests {
    /// A new temporary file (unlinked at once) whose access and modification times are `seconds`.
    private func agedFile(_ name: String, seconds: Int) throws -> FileDescriptor {
        let path = "/tmp/ublk-stamp-\(getpid())-\(name)"
        let file = try FileDescriptor(path: path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        unlink(path)
        var times = [timespec(tv_sec: seconds, tv_nsec: 0), timespec(tv_sec: seconds, tv_nsec: 0)]
        #expect(futimens(file.rawValue, &times) == 0)
        return file
    }

    private func times(_ file: borrowing FileDescriptor) throws -> (access: Int, modification: Int) {
        var st = stat()
        #expect(fstat(file.rawValue, &st) == 0)
        return (st.st_atim.tv_sec, st.st_mtim.tv_sec)
    }

    /// The first write moves the modification time to now and leaves the access time.
    @Test func stampsTheModificationTimeOnly() throws {
        let file = try agedFile("on", seconds: 946_684_800)
        let stamp = ModificationStamp(fd: file.rawValue, enabled: true)
        stamp.beforeWrite()
        let after = try times(file)
        #expect(after.access == 946_684_800)
        #expect(abs(after.modification - time(nil)) <= 2)
    }

    /// Within one tick of the coarse clock a second write does not stamp again: the time
    /// set back by hand stays set back.
    @Test func stampsOncePerTick() throws {
        let file = try agedFile("tick", seconds: 946_684_800)
        let stamp = ModificationStamp(fd: file.rawValue, enabled: true)
        var now = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &now)
        stamp.state.pointee.tick = now
        stamp.beforeWrite()
        // The clock may have ticked between the two reads; then the stamp was due.
        var later = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &later)
        if later.tv_sec == now.tv_sec && later.tv_nsec == now.tv_nsec {
            #expect(try times(file).modification == 946_684_800)
        }
    }

    /// Disabled (a block device's backing), or once a stamp failed, it never touches the file.
    @Test func disabledOrFailedStampsNothing() throws {
        let file = try agedFile("off", seconds: 946_684_800)
        ModificationStamp(fd: file.rawValue, enabled: false).beforeWrite()
        #expect(try times(file).modification == 946_684_800)

        let failing = ModificationStamp(fd: -1, enabled: true)
        failing.beforeWrite()
        #expect(!failing.state.pointee.enabled)
    }
}
