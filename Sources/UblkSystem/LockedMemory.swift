import Glibc

/// Memory for a secret (an encryption key): locked so it never reaches swap, kept out of
/// core dumps and forked children, and wiped with `explicit_bzero` before it is released.
///
/// `~Copyable` so a secret has one owner and is wiped exactly once; a copy would be a
/// second, unwiped home for the bytes. It gets its own anonymous pages rather than heap
/// memory because `munlock` works on whole pages and does not count: unlocking one secret
/// must not unlock a neighbour that happens to share its page.
public struct LockedMemory: ~Copyable {
    public let base: UnsafeMutableRawPointer
    public let count: Int
    /// Bytes locked from `base`: whole pages for our own mapping.
    private let lockedLength: Int
    /// Our own pages, unmapped after the wipe; nil for caller-owned memory (the test seam).
    private let mapping: MappedRegion?

    /// `count` bytes of zeroed, locked memory.
    public init(count: Int) throws(SystemError) {
        let length = MappedRegion.roundUp(max(count, 1), to: MappedRegion.pageSize)
        let region = try MappedRegion(fd: -1, length: length, offset: 0, protection: PROT_READ | PROT_WRITE,
                                      flags: MAP_PRIVATE | MAP_ANONYMOUS)
        do { try Syscalls.mlock(region.address, length: length) } catch { throw error as! SystemError }
        Syscalls.adviseSecret(region.address, length: length)
        base = region.address
        self.count = count
        lockedLength = length
        mapping = .some(region)
    }

    /// Test seam: locks memory the caller owns and frees only after this owner is gone, so a
    /// test can look at the bytes after the wipe (our own pages are unmapped by then).
    init(lockingCallerMemory base: UnsafeMutableRawPointer, count: Int) throws(SystemError) {
        do { try Syscalls.mlock(base, length: count) } catch { throw error as! SystemError }
        self.base = base
        self.count = count
        lockedLength = count
        mapping = nil
    }

    deinit {
        // Wipe first, then unlock; `mapping` is unmapped after this body, once stored
        // properties are destroyed.
        Syscalls.explicitBzero(base, length: lockedLength)
        Syscalls.munlock(base, length: lockedLength)
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }

    /// Reads from `fd`'s current position until the memory is full or the input ends, and
    /// returns how many bytes came. Straight into the locked pages, so the secret never
    /// passes through an unlocked buffer; sequential `read(2)`, so pipes and stdin work.
    public func fill(readingFrom fd: Int32) throws(SystemError) -> Int {
        var filled = 0
        while filled < count {
            let got: Int
            do { got = try Syscalls.read(fd, UnsafeMutableRawBufferPointer(start: base + filled, count: count - filled)) }
            catch { throw error as! SystemError }
            if got == 0 { break }
            filled += got
        }
        return filled
    }
}

extension LockedMemory {
    /// Keeps a block device's server from waiting on its own device for memory, which is a
    /// deadlock: the kernel frees memory by swapping to that device (`swapon /dev/ublkbN`)
    /// and writing dirty pages back to it, and only the server completes that I/O. So, as
    /// `nbd-client -swap` does: every page locked once touched (`mlockall`, MCL_ONFAULT), so
    /// that none of the server's memory is swapped out, nor its code dropped from the page
    /// cache (the kernel loop driver's memory is the kernel's, never swapped either); and
    /// PR_SET_IO_FLUSHER, so that its allocations never wait for I/O (threads created
    /// afterwards, the queues', inherit it). Call it before starting them. Locking is done
    /// only where the process may lock without limit (CAP_IPC_LOCK, or RLIMIT_MEMLOCK
    /// unlimited): with a limit, MCL_FUTURE would make later mappings (the queues'
    /// buffers) fail.
    /// A process that holds a key is protected the same way, and more: libraries make
    /// copies of the key we do not own (OpenSSL's key schedules, in cipher contexts on its
    /// heap), which must not reach swap (the lock, as cryptsetup locks its memory while it
    /// handles keys) nor a core dump (PR_SET_DUMPABLE 0).
    /// `populating` (a device that holds swap, `ublk add --swap`) locks every page at once
    /// instead, as `nbd-client -swap` does: mapped, faulted in and locked before any request
    /// comes, and each later mapping (the queues' buffers) as it is made. Else a swap-out
    /// under memory pressure may need a free page for the buffer it is copied into, and
    /// only swapping out would free one: Linux 6.12 stalled there (its ublk_drv pins the
    /// buffer's pages for the copy, faulting in those never touched).
    /// Returns what could not be done, for a warning; a key's own pages are locked anyway.
    public static func protectServer(holdingKey: Bool, populating: Bool = false) -> [SystemError] {
        var failed: [SystemError] = []
        if holdingKey {
            do { try Syscalls.forbidCoreDumps() } catch { failed.append(error) }
        }
        do { try Syscalls.setIOFlusher() } catch { failed.append(error) }
        guard locksEverything else { return failed + [SystemError("mlockall", errno: EPERM)] }
        do { try Syscalls.lockAllMemory(populating: populating) } catch { failed.append(error) }
        return failed
    }

    /// The machine's memory in bytes.
    public static var physicalBytes: UInt64 { Syscalls.physicalMemory() }

    /// Whether `protectServer` locks every page (else only a key's own are): where the
    /// process may lock without limit, by CAP_IPC_LOCK (bit 14 of /proc/self/status's
    /// CapEff) or an unlimited RLIMIT_MEMLOCK.
    public static var locksEverything: Bool {
        if Syscalls.memoryLockLimit() == nil { return true }
        guard let status = SmallFile.text("/proc/self/status"),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let bits = UInt64(line.dropFirst("CapEff:".count).filter { !$0.isWhitespace }, radix: 16) else { return false }
        return bits & (1 << 14) != 0
    }
}
