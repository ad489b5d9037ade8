import Glibc
import Testing
import UblkNBD
import UblkSystem

/// A scratch directory with a disk image, removed with everything in it when the test ends.
final class ScratchDirectory {
    let path: String
    var image: String { path + "/disk.img" }

    /// A directory holding `disk.img` of `size` bytes, byte i = i % 251 (so misplaced data shows).
    init(imageSize: Int) throws {
        var template = Array("/tmp/ublk-nbd-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw SystemError("mkdtemp", errno: errno) }
        path = String(cString: template)
        let content = (0..<imageSize).map { UInt8($0 % 251) }
        try write("disk.img", content)
    }

    func write(_ name: String, _ bytes: [UInt8]) throws {
        let fd = open(path + "/" + name, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw SystemError("open \(name)", errno: errno) }
        defer { close(fd) }
        #expect(bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == bytes.count)
    }

    func imageBytes(at offset: Int, count: Int) -> [UInt8] {
        let fd = open(image, O_RDONLY)
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        _ = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return bytes
    }

    deinit {
        if let dir = opendir(path) {
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != "." && name != ".." { unlink(path + "/" + name) }
            }
            closedir(dir)
        }
        rmdir(path)
    }
}

/// An NBD server for one test, in its own process group, stopped (TERM, then KILL
/// after 3 s) when the test ends, so no server outlives its test.
final class ServerProcess {
    let pid: pid_t
    let logPath: String
    private var reaped = false

    init(_ arguments: [String], log logPath: String) throws {
        self.logPath = logPath
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Own process group (stop() signals all of it); SIGTERM at its default action and
        // unblocked, whatever the test runner's thread inherited.
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        posix_spawnattr_setpgroup(&attributes, 0)
        var signals = sigset_t()
        sigemptyset(&signals)
        posix_spawnattr_setsigmask(&attributes, &signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGPIPE)
        posix_spawnattr_setsigdefault(&attributes, &signals)
        var cArguments = arguments.map { strdup($0) } + [nil]
        defer { cArguments.forEach { free($0) } }
        var pid: pid_t = 0
        let result = posix_spawnp(&pid, arguments[0], &actions, &attributes, &cArguments, environ)
        guard result == 0 else { throw SystemError("posix_spawn \(arguments[0]) (apt-get install nbdkit qemu-utils nbd-server)", errno: result) }
        self.pid = pid
    }

    /// Whether the server already exited (it failed to start, or served its one client).
    var hasExited: Bool {
        if reaped { return true }
        var status: Int32 = 0
        reaped = waitpid(pid, &status, WNOHANG) == pid
        return reaped
    }

    var log: String { SmallFile.text(logPath) ?? "" }

    func stop() {
        kill(-pid, SIGTERM)
        let deadline = ContinuousClock.now + .seconds(3)
        while !hasExited && ContinuousClock.now < deadline { usleep(20_000) }
        kill(-pid, SIGKILL) // whatever is left of the group, children included
        if !reaped {
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            reaped = true
        }
    }

    deinit { stop() }

    /// The first connection to the server once it listens: refused connects are
    /// retried for up to 10 s while the process is alive.
    func connect(_ uri: String) throws -> NBDConnection {
        let address = try NBDAddress(uri: uri)
        let deadline = ContinuousClock.now + .seconds(10)
        while true {
            do { return try NBDClient.connect(to: address, timeout: .seconds(5)) }
            catch {
                let retry = error.kind == .connect && !hasExited && ContinuousClock.now < deadline
                if !retry && error.kind == .connect { Issue.record("server did not come up: \(error); its log: \(log)") }
                if !retry { throw error }
            }
            usleep(50_000)
        }
    }
}

/// A loopback TCP port nobody listens on right now (the kernel picks it; closed again at once).
func freeLoopbackPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = loopback(port: 0)
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
        }
    }
    guard bound else { throw SystemError("bind 127.0.0.1:0", errno: errno) }
    return UInt16(bigEndian: address.sin_port)
}

func loopback(port: UInt16) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    return address
}

/// A listening loopback socket that never accepts or answers (for timeout tests).
final class SilentListener {
    let fd: Int32
    let port: UInt16

    init(backlog: Int32) throws {
        port = try freeLoopbackPort()
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = loopback(port: port)
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard ok, listen(fd, backlog) == 0 else { throw SystemError("listen", errno: errno) }
    }

    deinit { close(fd) }
}
