import CUblk
import Glibc
import Synchronization

// Every raw system call the project makes outside io_uring lives in this file, so
// error handling (EINTR, errno capture) is written once.

enum Syscalls {
    static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0) throws(SystemError) -> Int32 {
        try retryingOnInterrupt("open \(path)") { Glibc.open(path, flags, mode) }
    }

    static func close(_ fd: Int32) {
        // Linux releases the descriptor even when close reports EINTR: never retry.
        _ = Glibc.close(fd)
    }

    /// The magic number of the file system holding `fd` (`fstatfs`'s `f_type`).
    static func fileSystemType(_ fd: Int32) throws(SystemError) -> Int {
        let type = cublk_file_system_type(fd)
        guard type >= 0 else { throw SystemError("fstatfs", errno: Int32(-type)) }
        return Int(type)
    }

    static func fstat(_ fd: Int32) throws(SystemError) -> stat {
        var st = stat()
        _ = try retryingOnInterrupt("fstat") { Glibc.fstat(fd, &st) }
        return st
    }

    /// stat(2) of what `path` names now (symlinks followed).
    static func status(ofPath path: String) throws(SystemError) -> stat {
        var st = stat()
        _ = try retryingOnInterrupt("stat \(path)") { stat(path, &st) }
        return st
    }

    static func fsync(_ fd: Int32) throws(SystemError) {
        _ = try retryingOnInterrupt("fsync") { Glibc.fsync(fd) }
    }

    static func fallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) throws(SystemError) {
        _ = try retryingOnInterrupt("fallocate") { cublk_fallocate(fd, mode, offset, length) }
    }

    /// Sets `fd`'s modification time, and so its change time, to now; its access time stays.
    static func touchModificationTime(_ fd: Int32) throws(SystemError) {
        let result = cublk_touch_modification_time(fd)
        if result < 0 { throw SystemError("futimens", errno: result) }
    }

    static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws(SystemError) -> Int {
        try retryingOnInterrupt("pread") { Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: Int64) throws(SystemError) -> Int {
        try retryingOnInterrupt("pwrite") { Glibc.pwrite(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    static func mmap(length: Int, protection: Int32, flags: Int32, fd: Int32, offset: Int64) throws(SystemError) -> UnsafeMutableRawPointer {
        guard let address = Glibc.mmap(nil, length, protection, flags, fd, off_t(offset)),
              address != MAP_FAILED else {
            throw SystemError.last("mmap")
        }
        return address
    }

    static func munmap(_ address: UnsafeMutableRawPointer, length: Int) {
        _ = Glibc.munmap(address, length)
    }

    static func blockDeviceSize(_ fd: Int32) throws(SystemError) -> UInt64 {
        var bytes: UInt64 = 0
        let result = cublk_block_device_size(fd, &bytes)
        if result < 0 { throw SystemError("ioctl BLKGETSIZE64", errno: result) }
        return bytes
    }

    static func blockDeviceSectorSizes(_ fd: Int32) throws(SystemError) -> (logical: UInt32, physical: UInt32) {
        var logical: UInt32 = 0, physical: UInt32 = 0
        let result = cublk_block_device_sector_sizes(fd, &logical, &physical)
        if result < 0 { throw SystemError("ioctl BLKSSZGET", errno: result) }
        return (logical, physical)
    }

    /// The offset alignment O_DIRECT on `path` needs (0: none is possible); nil where the
    /// kernel or file system does not say.
    static func directIOAlignment(_ path: String) -> Int? {
        let result = cublk_direct_io_alignment(path)
        return result >= 0 ? Int(result) : nil
    }

    static func rereadPartitions(_ fd: Int32) throws(SystemError) {
        let result = cublk_reread_partitions(fd)
        if result < 0 { throw SystemError("ioctl BLKRRPART", errno: result) }
    }

    static var pageSize: Int { Int(sysconf(Int32(_SC_PAGESIZE))) }
}

extension Syscalls {
    static func rename(_ from: String, _ to: String) throws(SystemError) {
        _ = try retryingOnInterrupt("rename \(from)") { Glibc.rename(from, to) }
    }

    static func unlink(_ path: String) {
        _ = Glibc.unlink(path)
    }

    static func mkdir(_ path: String, _ mode: mode_t) {
        _ = Glibc.mkdir(path, mode)
    }

    static func directoryEntries(_ path: String) throws(SystemError) -> [String] {
        guard let dir = opendir(path) else { throw SystemError.last("opendir \(path)") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}

// Stream sockets, for network targets (NBD). Connecting happens at setup and on
// reconnect, off the queue rings, so these calls block (bounded by a deadline).
extension Syscalls {
    /// One address `getaddrinfo` returned: the family and the raw `sockaddr` bytes.
    struct SocketAddress {
        var family: Int32
        var bytes: [UInt8]
    }

    /// The TCP addresses of `host`:`port` (numeric or by name), or `HostLookupError`, within
    /// `timeout`: a name server that does not answer (glibc waits 5 s per try and server)
    /// must not hold a queue thread that reconnects, nor a device's stop behind it. A name
    /// is looked up on a thread of its own, left to finish alone if it takes longer; callers
    /// asking for the same name meanwhile (each queue, each retry) wait for that lookup
    /// rather than start another, so a long outage leaves one thread per name, not one per
    /// retry. `lookUp` is the blocking lookup (a test seam).
    static func resolve(host: String, port: UInt16, timeout: Duration,
                        lookUp: @escaping @Sendable (String, UInt16) throws -> [SocketAddress] = { try resolve(host: $0, port: $1) })
        throws -> [SocketAddress] {
        if let numeric = try? resolve(host: host, port: port, flags: AI_NUMERICHOST) { return numeric }
        let lookup = try HostLookup.pending(host: host, port: port, lookUp: lookUp)
        guard lookup.done.wait(timeout: timeout), let outcome = lookup.outcome else {
            throw HostLookupError(host: host, reason: "No answer from the name server within \(timeout)")
        }
        lookup.done.signal()  // Once done, it stays done for every other caller waiting on it.
        return try outcome.get()
    }

    /// The TCP addresses of `host`:`port` (numeric or by name), blocking. Throws `HostLookupError`.
    static func resolve(host: String, port: UInt16, flags: Int32 = 0) throws -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        // No AI_ADDRCONFIG: on a host with only loopback it would hide "localhost".
        hints.ai_flags = AI_NUMERICSERV | flags
        var list: UnsafeMutablePointer<addrinfo>?
        let result = getaddrinfo(host, String(port), &hints, &list)
        guard result == 0 else {
            let reason = result == EAI_SYSTEM ? String(cString: strerror(Glibc.errno)) : String(cString: gai_strerror(result))
            throw HostLookupError(host: host, reason: reason)
        }
        defer { freeaddrinfo(list) }
        var addresses: [SocketAddress] = []
        var entry = list
        while let current = entry?.pointee {
            if let address = current.ai_addr {
                let bytes = UnsafeRawBufferPointer(start: address, count: Int(current.ai_addrlen))
                addresses.append(SocketAddress(family: current.ai_family, bytes: Array(bytes)))
            }
            entry = current.ai_next
        }
        return addresses
    }

    /// The `sockaddr_un` for a Unix socket path, or nil if the path does not fit.
    static func unixAddress(_ path: String) -> SocketAddress? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let utf8 = Array(path.utf8)
        guard !utf8.isEmpty, utf8.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: utf8) }
        let length = MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + utf8.count + 1
        return SocketAddress(family: AF_UNIX, bytes: withUnsafeBytes(of: &address) { Array($0.prefix(length)) })
    }

    /// A blocking stream socket connected to `address`; `description` names it in errors.
    /// The connect runs non-blocking and waits in poll, so `deadline` bounds it.
    static func connect(_ address: SocketAddress, description: String, deadline: ContinuousClock.Instant) throws -> Int32 {
        let type = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
        let fd = try retryingOnInterrupt("socket") { Glibc.socket(address.family, type, 0) }
        do {
            let result = address.bytes.withUnsafeBytes {
                Glibc.connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
            }
            if result != 0 {
                guard Glibc.errno == EINPROGRESS || Glibc.errno == EINTR else { throw SystemError.last("connect \(description)") }
                try waitUntilWritable(fd, description: description, deadline: deadline)
            }
            _ = try retryingOnInterrupt("fcntl F_SETFL") { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) }
            return fd
        } catch {
            close(fd)
            throw error
        }
    }

    /// Waits for a non-blocking connect to finish and throws its outcome (ETIMEDOUT past `deadline`).
    private static func waitUntilWritable(_ fd: Int32, description: String, deadline: ContinuousClock.Instant) throws {
        var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        while true {
            let left = ContinuousClock.now.duration(to: deadline)
            let milliseconds = max(0, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000)
            let ready = poll(&poller, 1, Int32(clamping: milliseconds))
            if ready < 0 && Glibc.errno == EINTR { continue }
            if ready < 0 { throw SystemError.last("poll") }
            if ready == 0 { throw SystemError("connect \(description)", errno: ETIMEDOUT) }
            break
        }
        var failure: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = try retryingOnInterrupt("getsockopt SO_ERROR") { getsockopt(fd, SOL_SOCKET, SO_ERROR, &failure, &length) }
        if failure != 0 { throw SystemError("connect \(description)", errno: failure) }
    }

    static func setSocketOption(_ fd: Int32, level: Int32, option: Int32, _ value: some BitwiseCopyable, name: String) throws {
        var value = value
        _ = try retryingOnInterrupt("setsockopt \(name)") {
            setsockopt(fd, level, option, &value, socklen_t(MemoryLayout.size(ofValue: value)))
        }
    }

    /// A Unix stream socket bound to `path` (replacing a stale socket file there) and
    /// listening. The file gets no access for group or others: `umask` is the one way to have `bind`
    /// create it so, with no moment in which another user could connect (umask is
    /// process-wide, so this runs before the threads that create files exist or beside
    /// ones that do not).
    static func listenUnix(_ path: String, backlog: Int32) throws(SystemError) -> Int32 {
        guard let address = unixAddress(path) else { throw SystemError("bind \(path)", errno: ENAMETOOLONG) }
        let type = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        let fd = try retryingOnInterrupt("socket") { Glibc.socket(AF_UNIX, type, 0) }
        Glibc.unlink(path)
        let previous = umask(0o077)
        let bound = address.bytes.withUnsafeBytes {
            Glibc.bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
        }
        umask(previous)
        if bound != 0 || Glibc.listen(fd, backlog) != 0 {
            let error = SystemError.last(bound != 0 ? "bind \(path)" : "listen \(path)")
            close(fd)
            throw error
        }
        return fd
    }

    /// `accept(2)` of the next connection, made close-on-exec (Glibc's module has no
    /// `accept4`); a connection the peer dropped before it was accepted (ECONNABORTED) is skipped.
    static func accept(_ fd: Int32) throws(SystemError) -> Int32 {
        while true {
            let client = Glibc.accept(fd, nil, nil)
            if client >= 0 {
                _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                return client
            }
            if Glibc.errno != EINTR && Glibc.errno != ECONNABORTED { throw SystemError.last("accept") }
        }
    }

    /// `send(2)` without SIGPIPE (a peer that hung up is an EPIPE error, not a dead process).
    static func send(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws -> Int {
        try retryingOnInterrupt("send") { Glibc.send(fd, buffer.baseAddress, buffer.count, Int32(MSG_NOSIGNAL)) }
    }

    /// `shutdown(2)` of both directions: operations pending on the socket (an io_uring
    /// recv, a send) end at once, before the descriptor is closed.
    static func shutdown(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    /// `recv(2)`: 0 means the peer closed the connection.
    static func receive(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try retryingOnInterrupt("recv") { Glibc.recv(fd, buffer.baseAddress, buffer.count, 0) }
    }
}

// The kernel probe of `IORing.copiesLinkedCommands`.
extension Syscalls {
    /// `pipe(2)`, both ends close-on-exec: (read end, write end).
    static func pipe() throws(SystemError) -> (Int32, Int32) {
        var ends: [Int32] = [-1, -1]
        guard Glibc.pipe(&ends) == 0 else { throw SystemError("pipe", errno: errno) }
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        return (ends[0], ends[1])
    }

    /// An unbound Unix datagram socket.
    static func datagramSocket() throws(SystemError) -> Int32 {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket AF_UNIX SOCK_DGRAM", errno: errno) }
        return fd
    }

    /// O_NONBLOCK on (a pipe's end).
    static func setNonBlocking(_ fd: Int32) {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    /// `write(2)` at the descriptor's position (a pipe).
    static func write(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SystemError) -> Int {
        try retryingOnInterrupt("write") { Glibc.write(fd, buffer.baseAddress, buffer.count) }
    }
}

// Memory that holds secrets (keys): locked, kept out of core dumps, wiped.
extension Syscalls {
    /// `read(2)` from the descriptor's current position: pipes and stdin have no offset for pread.
    static func read(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try retryingOnInterrupt("read") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    /// The machine's memory in bytes (0 if unknown).
    static func physicalMemory() -> UInt64 {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && size > 0 ? UInt64(pages) * UInt64(size) : 0
    }

    static func mlock(_ address: UnsafeMutableRawPointer, length: Int) throws {
        _ = try retryingOnInterrupt("mlock") { Glibc.mlock(address, length) }
    }

    static func munlock(_ address: UnsafeMutableRawPointer, length: Int) {
        _ = Glibc.munlock(address, length)
    }

    /// `madvise` DONTDUMP and WIPEONFORK: keeps a secret out of core dumps and forked children.
    /// Best effort (older kernels lack WIPEONFORK); the pages stay locked either way.
    static func adviseSecret(_ address: UnsafeMutableRawPointer, length: Int) {
        _ = Glibc.madvise(address, length, MADV_DONTDUMP)
        _ = Glibc.madvise(address, length, MADV_WIPEONFORK)
    }

    /// prctl(PR_SET_DUMPABLE, 0): no core dump of the process, and its memory (/proc/PID/mem,
    /// ptrace) only for a caller with CAP_SYS_PTRACE.
    static func setIOFlusher() throws(SystemError) {
        let result = cublk_set_io_flusher()
        if result < 0 { throw SystemError("prctl(PR_SET_IO_FLUSHER)", errno: -result) }
    }

    static func forbidCoreDumps() throws(SystemError) {
        let result = cublk_forbid_core_dumps()
        if result < 0 { throw SystemError("prctl(PR_SET_DUMPABLE)", errno: -result) }
    }

    /// The soft RLIMIT_MEMLOCK in bytes, nil when unlimited.
    static func memoryLockLimit() -> UInt64? {
        var limit = rlimit()
        // Unreadable counts as a limit (nothing locks without one then).
        guard getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit) == 0 else { return 0 }
        return limit.rlim_cur == rlim_t.max ? nil : UInt64(limit.rlim_cur)
    }

    /// mlockall(MCL_CURRENT | MCL_FUTURE), with MCL_ONFAULT unless `populating`: every page
    /// of the process stays in memory once touched (ONFAULT: mappings are not filled in up
    /// front), or (populating) every mapped page is filled in and locked at once.
    static func lockAllMemory(populating: Bool) throws(SystemError) {
        let flags = MCL_CURRENT | MCL_FUTURE | (populating ? 0 : MCL_ONFAULT)
        if Glibc.mlockall(flags) != 0 { throw SystemError("mlockall", errno: errno) }
    }

    /// `explicit_bzero(3)`: a plain memset before release may be removed by the optimizer.
    static func explicitBzero(_ address: UnsafeMutableRawPointer, length: Int) {
        Glibc.explicit_bzero(address, length)
    }
}

// The server's process limits.
extension Syscalls {
    /// getrlimit(RLIMIT_FSIZE): (soft, hard), `rlim_t.max` meaning none.
    static func fileSizeLimit() throws(SystemError) -> (soft: rlim_t, hard: rlim_t) {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit) == 0 else {
            throw SystemError("getrlimit(RLIMIT_FSIZE)", errno: errno)
        }
        return (limit.rlim_cur, limit.rlim_max)
    }

    /// setrlimit(RLIMIT_FSIZE): raising the hard limit needs CAP_SYS_RESOURCE.
    static func setFileSizeLimit(soft: rlim_t, hard: rlim_t) throws(SystemError) {
        var limit = rlimit(rlim_cur: soft, rlim_max: hard)
        guard setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit) == 0 else {
            throw SystemError("setrlimit(RLIMIT_FSIZE)", errno: errno)
        }
    }

    /// SIGXFSZ ignored: a write past the file-size limit fails with EFBIG instead of
    /// killing the process.
    static func ignoreFileSizeSignal() {
        signal(SIGXFSZ, SIG_IGN)
    }
}

/// A name lookup in flight on its own thread (`Syscalls.resolve`), shared by every caller
/// that asks for the same host and port until it ends.
final class HostLookup: @unchecked Sendable {
    // Written by the lookup's thread before `done` is signalled; read only after.
    var outcome: Result<[Syscalls.SocketAddress], any Error>?
    let done = Semaphore()

    private static let inFlight = Mutex<[String: HostLookup]>([:])

    /// The lookup of `host`:`port` in flight, or a new one started.
    static func pending(host: String, port: UInt16,
                        lookUp: @escaping @Sendable (String, UInt16) throws -> [Syscalls.SocketAddress]) throws -> HostLookup {
        let key = "\(host) \(port)"
        return try inFlight.withLock { (lookups: inout [String: HostLookup]) throws -> HostLookup in
            if let running = lookups[key] { return running }
            let lookup = HostLookup()
            try OSThread {
                lookup.outcome = Result { try lookUp(host, port) }
                _ = inFlight.withLock { $0.removeValue(forKey: key) }
                lookup.done.signal()
            }.detach()
            lookups[key] = lookup
            return lookup
        }
    }
}
