import Glibc

/// Brings a file's modification and change times up to date from the writing thread, once
/// per tick of the kernel's coarse real-time clock, before that tick's first write.
///
/// Why: a write must move the file's mtime and ctime to the current coarse time, so the
/// first write after each clock tick updates the inode. Where the file system honours
/// IOCB_NOWAIT for that update (ext4 on Debian's 7.3 calls `kiocb_modified`, which refuses
/// to update without blocking; 6.12's calls `file_modified`, which updates anyway),
/// io_uring's non-blocking attempt fails with EAGAIN and the write goes to an io-wq worker,
/// and so does every other write submitted before that worker has made the update. Traced
/// on 7.3 (ftrace `io_uring_queue_async_work`, `kiocb_modified` returning -EAGAIN): 36% of
/// 4 KiB writes at depth 32 left the queue thread that way. One `futimens` per tick and
/// stamp (each queue keeps its own; a few hundred a second at most) leaves the writes
/// nothing to update. The times move where the write would have moved them (the access
/// time stays); the file also sees an attribute change (inotify IN_ATTRIB) once per tick
/// of writing.
///
/// If the call fails (a file owned by someone else, without CAP_FOWNER), stamping stops
/// for good and writes behave as without it.
public struct ModificationStamp: ~Copyable {
    @usableFromInline
    struct State {
        /// The coarse clock's reading at the last stamp.
        @usableFromInline var tick = timespec()
        @usableFromInline var enabled: Bool
    }

    @usableFromInline let fd: Int32
    /// Behind a pointer so a class holding the stamp changes it without an exclusivity check.
    @usableFromInline let state: UnsafeMutablePointer<State>

    /// Stamps `fd` (not owned; it must outlive the stamp) when `enabled`, else never.
    public init(fd: Int32, enabled: Bool) {
        self.fd = fd
        state = .allocate(capacity: 1)
        state.initialize(to: State(enabled: enabled))
    }

    deinit { state.deallocate() }

    /// Call before submitting a write: stamps the file if the clock ticked since the last stamp.
    /// Reading CLOCK_REALTIME_COARSE is a vDSO read of the value the kernel's
    /// timestamps come from, not a system call.
    @inlinable
    public func beforeWrite() {
        guard state.pointee.enabled else { return }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &now)
        if now.tv_nsec != state.pointee.tick.tv_nsec || now.tv_sec != state.pointee.tick.tv_sec {
            stamp(at: now)
        }
    }

    @usableFromInline
    func stamp(at now: timespec) {
        state.pointee.tick = now
        do { try Syscalls.touchModificationTime(fd) } catch { state.pointee.enabled = false }
    }
}
