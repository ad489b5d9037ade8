import Glibc

/// The file-size limit (`ulimit -f`) a server may inherit from the shell that ran `ublk
/// add`. It is no limit of the device's: the kernel's loop driver writes its backing file
/// from kernel threads, which have none. So the server lifts it where it may, and a write
/// past one that stays fails alone, with EFBIG (the request with an I/O error), where
/// SIGXFSZ would have killed the server and every request after it.
public enum FileSizeLimit {
    /// Ignores SIGXFSZ and lifts the limit as far as allowed: both to unlimited (with
    /// CAP_SYS_RESOURCE), else the soft one to the hard one. Returns the limit in bytes
    /// that stays, nil when there is none.
    public static func lift() -> UInt64? {
        let unlimited = rlim_t.max  // RLIM_INFINITY, which Swift imports as a signed -1
        Syscalls.ignoreFileSizeSignal()
        guard let (soft, hard) = try? Syscalls.fileSizeLimit() else { return nil }
        if soft == unlimited { return nil }
        if (try? Syscalls.setFileSizeLimit(soft: unlimited, hard: unlimited)) != nil { return nil }
        if (try? Syscalls.setFileSizeLimit(soft: hard, hard: hard)) != nil {
            return hard == unlimited ? nil : UInt64(hard)
        }
        return UInt64(soft)
    }
}
