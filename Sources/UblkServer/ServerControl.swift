import Glibc
import Logging
import Synchronization
import UblkControl
import UblkQueue
import UblkSystem
import UblkTargets

/// A running server's request channel: `ublk resize` and `ublk upgrade` ask the server
/// that owns the device, because only it can change what its queues accept and what its
/// record says.
///
/// A Unix stream socket `/run/ublk/ublkbN.sock` (root only, like the control device),
/// served by one thread of its own with its own control ring; one request line, one
/// answer line (`ok ...` or `error MESSAGE`):
///
///     resize [BYTES]   the backing's current size (or BYTES) becomes the device's
///     quiesce          QUIESCE_DEV; the server then exits and leaves the device to a new one
///
/// `@unchecked Sendable` is safe: `listener` is written before the channel's thread is
/// started (thread creation orders it) and only read there; `record` is touched only by
/// the channel's thread once it runs; `removed` only by the server's own thread (`stop`);
/// `keepDevice`, the one field both threads use, is an atomic.
public final class ServerControl: @unchecked Sendable {
    private let deviceID: UInt32
    private let capacity: DeviceCapacity
    private let target: any Target
    private let logger: Logger
    /// The record under /run/ublk, rewritten after a resize. Only the channel's thread
    /// touches it once the channel runs.
    private var record: DeviceRecord?
    private let keepDevice = Atomic<Bool>(false)
    private var listener: Int32 = -1

    init(deviceID: UInt32, capacity: DeviceCapacity, target: any Target, record: DeviceRecord?, logger: Logger) {
        self.deviceID = deviceID
        self.capacity = capacity
        self.target = target
        self.record = record
        self.logger = logger
    }

    public static func socketPath(_ id: UInt32) -> String { "\(RuntimeDirectory.path)/ublkb\(id).sock" }

    /// Set once QUIESCE_DEV was sent on request: the queues end because a new server is to
    /// take the device over, so the device must stay.
    var keepsDevice: Bool { keepDevice.load(ordering: .acquiring) }

    /// Opens the socket and starts serving it; without it the device still works, only
    /// resize and upgrade do not (logged).
    func start() {
        let path = Self.socketPath(deviceID)
        SmallFile.remove(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0, var address = UnixAddress(path) else { return logger.warning("no request channel: socket failed") }
        let previous = umask(0o077)
        let bound = address.withSockaddr { bind(fd, $0, $1) } == 0
        umask(previous)
        guard bound, listen(fd, 4) == 0 else {
            logger.warning("no request channel at \(path): \(String(cString: strerror(errno)))")
            Glibc.close(fd)
            return
        }
        listener = fd
        do { try OSThread { self.serve() }.detach() } catch { logger.warning("no request channel thread: \(error)") }
    }

    /// Removes the socket (the thread ends with the process). Once only: after a hand-over
    /// the path may already be the new server's.
    func stop() {
        if listener >= 0 && !removed { SmallFile.remove(Self.socketPath(deviceID)) }
        removed = true
    }
    private var removed = false

    private func serve() {
        while true {
            let client = accept(listener, nil, nil) // the server never execs: no CLOEXEC needed
            if client < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return logger.error("request channel: accept: \(String(cString: strerror(errno)))")
            }
            let request = UnixLine.read(client)
            let answer = handle(request)
            UnixLine.write(answer, to: client)
            Glibc.close(client)
            if answer == "ok" && request == "quiesce" { return }
        }
    }

    func handle(_ request: String) -> String {
        let words = request.split(separator: " ").map(String.init)
        do {
            switch words.first {
            case "resize" where words.count <= 2:
                let requested = words.count == 2 ? UInt64(words[1]) : nil
                if words.count == 2 && requested == nil { return "error bad size `\(words[1])`" }
                return "ok \(try resize(requested))"
            case "quiesce" where words.count == 1:
                try quiesce()
                return "ok"
            default:
                return "error unknown request `\(request)`"
            }
        } catch {
            return "error \(error)"
        }
    }

    /// UPDATE_SIZE with the size the target allows. The queues' limit grows before the
    /// kernel may send a request beyond the old end, and shrinks only after it no longer does.
    private func resize(_ requested: UInt64?) throws -> UInt64 {
        guard let target = target as? any ResizableTarget else {
            throw ServerError.notResizable(target.name)
        }
        let control = try DeviceServer.openControl()
        guard control.features?.contains(.updateSize) == true else { throw ServerError.noUpdateSize }
        let bytes: UInt64
        do { bytes = try target.resizedSize(requested) } catch { throw ServerError.target(error) }
        let (old, new) = (capacity.sectors, bytes >> 9)
        if new > old { capacity.set(sectors: new) }
        do { try control.updateSize(deviceID, sectors: new) } catch {
            capacity.set(sectors: old)
            throw ServerError.control(error)
        }
        if new < old { capacity.set(sectors: new) }
        logger.info("/dev/ublkb\(deviceID) resized from \(old << 9) to \(bytes) bytes")
        if var record {
            record.spec = record.spec.resized(to: requested)
            record.size = bytes
            do { try RuntimeDirectory.save(record) } catch { logger.warning("cannot rewrite the device record: \(error)") }
            self.record = record
        }
        return bytes
    }

    /// QUIESCE_DEV: the kernel waits for the requests in flight to finish, parks new ones,
    /// and aborts the queues' fetches; the server then exits without deleting the device.
    private func quiesce() throws {
        let control = try DeviceServer.openControl()
        let info: DeviceInfo
        do { info = try control.deviceInfo(deviceID) } catch { throw ServerError.control(error) }
        guard info.flags.contains(.quiesce) else { throw ServerError.notUpgradable(deviceID) }
        keepDevice.store(true, ordering: .releasing)
        do { try control.quiesceDevice(deviceID, timeoutMilliseconds: 30_000) } catch {
            keepDevice.store(false, ordering: .releasing)
            throw ServerError.control(error)
        }
        logger.info("/dev/ublkb\(deviceID) quiesced: leaving it to a new server")
    }

    /// Asks the server of device `id` (one line), waiting at most `seconds` for the answer;
    /// returns what follows `ok`, or throws the server's error.
    public static func request(_ id: UInt32, _ line: String, seconds: Int = 60) throws -> String {
        let path = socketPath(id)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0, var address = UnixAddress(path) else {
            throw ServerError.noRequestChannel(id, path: path, SystemError("socket", errno: errno))
        }
        defer { Glibc.close(fd) }
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard address.withSockaddr({ connect(fd, $0, $1) }) == 0 else {
            throw ServerError.noRequestChannel(id, path: path, SystemError("connect", errno: errno))
        }
        UnixLine.write(line, to: fd)
        let answer = UnixLine.read(fd)
        if answer == "ok" { return "" }
        if answer.hasPrefix("ok ") { return String(answer.dropFirst(3)) }
        if answer.hasPrefix("error ") { throw ServerError.refusedByServer(String(answer.dropFirst(6))) }
        throw ServerError.noAnswer(id, seconds: seconds)
    }
}

/// A filesystem-path `sockaddr_un`.
struct UnixAddress {
    private var address = sockaddr_un()
    private let length: socklen_t

    init?(_ path: String) {
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
    }

    mutating func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        let length = length
        return withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) } }
    }
}

/// One newline-terminated line each way on a stream socket.
enum UnixLine {
    static func write(_ line: String, to fd: Int32) {
        let bytes = Array((line + "\n").utf8)
        var sent = 0
        while sent < bytes.count {
            let count = bytes[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return }
            sent += count
        }
    }

    /// Up to the first newline (at most 4 KiB), without it; "" on EOF, error or timeout.
    static func read(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while bytes.count < 4096 {
            let count = recv(fd, &byte, 1, 0)
            if count < 0 && errno == EINTR { continue }
            if count <= 0 || byte == UInt8(ascii: "\n") { break }
            bytes.append(byte)
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension DeviceServer {
    /// After QUIESCE_DEV ended the queues: sync, close /dev/ublkcN (the kernel then marks
    /// the device quiesced and a new server may START_USER_RECOVERY), keep the device and its
    /// record, and stay until the new server has the device live (at most a minute): a
    /// service manager that follows the main pid sees the new server's MAINPID first.
    func handOver(_ id: UInt32, characterDevice: consuming FileDescriptor, control: borrowing ControlDevice) {
        do { try target.sync() } catch { logger.error("sync of the backing failed: \(error)") }
        _ = consume characterDevice
        logger.info("/dev/ublkb\(id) left to a new server")
        for _ in 0..<600 {
            guard let info = try? control.deviceInfo(id) else { return }
            if info.state == .live && info.serverPID != getpid() {
                return logger.info("/dev/ublkb\(id) is served by pid \(info.serverPID) now")
            }
            usleep(100_000)
        }
        logger.warning("no new server took /dev/ublkb\(id) over within 60 s: it waits for `ublk recover --id \(id)`")
    }
}
