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
///     resize [BYTES]   the backing's current size (or BYTES; 0 lifts the limit) becomes the device's
///     quiesce          QUIESCE_DEV; the server then exits and leaves the device to a new one
///     stopping         the device is about to be stopped (`ublk del --force`): the target
///                      stops waiting for what may not come (`Target.stopRequested`)
///
/// `@unchecked Sendable` is safe: `record` is touched only by
/// the channel's thread once it runs; `removed` only by the server's own thread (`stop`);
/// `keepDevice` and `queuesEnded`, the fields both threads use, are atomics.
public final class ServerControl: @unchecked Sendable {
    private let deviceID: UInt32
    private let capacity: DeviceCapacity
    private let target: any Target
    private let logger: Logger
    /// The record under /run/ublk, rewritten after a resize. Only the channel's thread
    /// touches it once the channel runs.
    private var record: DeviceRecord?
    /// The device's size limit (its spec's `window`, then each size `resize` asked for), which a resize to the backing's size stays within. Only the channel's thread
    /// touches it.
    private var sizeLimit: UInt64?
    private let keepDevice = Atomic<Bool>(false)
    /// Set by `stop`, once every queue thread ended.
    private let queuesEnded = Atomic<Bool>(false)

    init(deviceID: UInt32, capacity: DeviceCapacity, target: any Target, record: DeviceRecord?, logger: Logger) {
        self.deviceID = deviceID
        self.capacity = capacity
        self.target = target
        self.record = record
        self.logger = logger
        sizeLimit = (target as? any SpecifiedTarget)?.spec.window.sizeLimit
    }

    public static func socketPath(_ id: UInt32) -> String { "\(RuntimeDirectory.path)/ublkb\(id).sock" }

    /// Set once QUIESCE_DEV was sent on request: the queues end because a new server is to
    /// take the device over, so the device must stay.
    var keepsDevice: Bool { keepDevice.load(ordering: .acquiring) }

    /// Opens the socket and starts serving it; without it the device still works, only
    /// resize and upgrade do not (logged).
    func start() {
        let listener: UnixListener
        do { listener = try UnixListener(path: Self.socketPath(deviceID)) } catch {
            return logger.warning("no request channel: \(error)")
        }
        do { try OSThread { self.serve(listener) }.detach() } catch { logger.warning("no request channel thread: \(error)") }
    }

    /// Removes the socket (the thread ends with the process). Once only: after a hand-over
    /// the path may already be the new server's.
    func stop() {
        queuesEnded.store(true, ordering: .releasing)
        if !removed { SmallFile.remove(Self.socketPath(deviceID)) }
        removed = true
    }
    private var removed = false
    /// QUIESCE_DEV timed out: the server leaves the device by ending the process once it
    /// answered (only the channel's thread touches it).
    private var leavesByExiting = false

    private func serve(_ listener: UnixListener) {
        while true {
            let client: FileDescriptor
            do { client = try listener.accept() } catch {
                return logger.error("request channel: \(error)")
            }
            let request = UnixLine.read(client)
            let answer = handle(request)
            UnixLine.write(answer, to: client)
            guard answer == "ok" && request == "quiesce" else { continue }
            if leavesByExiting {
                SmallFile.remove(Self.socketPath(deviceID))
                _exit(0)
            }
            return
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
            case "stopping" where words.count == 1:
                target.stopRequested()
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
        let (bytes, limit): (UInt64, UInt64?)
        do { (bytes, limit) = try target.resizedSize(requested, limit: sizeLimit) } catch { throw ServerError.target(error) }
        let (old, new) = (capacity.sectors, bytes >> 9)
        if new > old { capacity.set(sectors: new) }
        do { try control.updateSize(deviceID, sectors: new) } catch {
            capacity.set(sectors: old)
            throw ServerError.control(error)
        }
        if new < old { capacity.set(sectors: new) }
        logger.info("/dev/ublkb\(deviceID) resized from \(old << 9) to \(bytes) bytes")
        sizeLimit = limit
        if var record {
            // (A limit beyond the backing is one: a recovering server's device ends where the
            // backing does, as at add.)
            record.spec = record.spec.resized(to: sizeLimit)
            record.size = bytes
            do { try RuntimeDirectory.save(record) } catch { logger.warning("cannot rewrite the device record: \(error)") }
            self.record = record
        }
        return bytes
    }

    /// QUIESCE_DEV: the kernel parks new requests and aborts the queues' fetches; the
    /// server then exits without deleting the device. Answers once the queues ended.
    private func quiesce() throws {
        let control = try DeviceServer.openControl()
        let info: DeviceInfo
        do { info = try control.deviceInfo(deviceID) } catch { throw ServerError.control(error) }
        guard info.flags.contains(.quiesce) else { throw ServerError.notUpgradable(deviceID) }
        keepDevice.store(true, ordering: .releasing)
        do { try control.quiesceDevice(deviceID, timeoutMilliseconds: 30_000) } catch where error.errno == EBUSY {
            // Every tag of a queue still in the backing's hands after 30 s: the kernel parks
            // new requests from now on and aborts nothing.
            return leaveByExiting()
        } catch {
            keepDevice.store(false, ordering: .releasing)
            throw ServerError.control(error)
        }
        logger.info("/dev/ublkb\(deviceID) quiesced: leaving it to a new server")
        // A queue that still waits for the backing would never end.
        if !abortRefetches(control) { leaveByExiting() }
    }

    /// A stalled backing holds requests after QUIESCE_DEV, and the device parks new ones:
    /// serving on would leave it stalled for good. Ending the process (once the request is
    /// answered) leaves it to the new server, which sends the unanswered requests again
    /// (reissue; fail-io fails them).
    private func leaveByExiting() {
        logger.warning("/dev/ublkb\(deviceID): requests are still in the backing's hands 30 s after QUIESCE_DEV: this server exits, leaving them to the new one")
        leavesByExiting = true
    }

    /// QUIESCE_DEV aborts the fetches parked in the driver at that moment. A request the
    /// server held then is committed later, and its commit parks the tag's fetch again,
    /// which nothing aborts: the queue would wait for that tag forever. So until every
    /// queue ended (at most 30 s), QUIESCE_DEV again every 200 ms: the device is still
    /// live and canceling, and the driver aborts each fetch it has not aborted before.
    /// True once every queue ended.
    private func abortRefetches(_ control: borrowing ControlDevice) -> Bool {
        for round in 1...600 {
            if queuesEnded.load(ordering: .acquiring) { return true }
            usleep(50_000)
            if round % 4 == 0 { try? control.quiesceDevice(deviceID, timeoutMilliseconds: 1_000) }
        }
        return queuesEnded.load(ordering: .acquiring)
    }

    /// Asks the server of device `id` (one line), waiting at most `seconds` for the answer;
    /// returns what follows `ok`, or throws the server's error.
    public static func request(_ id: UInt32, _ line: String, seconds: Int = 60) throws -> String {
        let path = socketPath(id)
        let answer: String
        do {
            let socket = try FileDescriptor.connect(to: .unix(path: path), timeout: .seconds(5))
            try socket.setStreamTimeout(.seconds(seconds))
            UnixLine.write(line, to: socket)
            answer = UnixLine.read(socket)
        } catch let error as SystemError {
            throw ServerError.noRequestChannel(id, path: path, error)
        }
        if answer == "ok" { return "" }
        if answer.hasPrefix("ok ") { return String(answer.dropFirst(3)) }
        if answer.hasPrefix("error ") { throw ServerError.refusedByServer(String(answer.dropFirst(6))) }
        throw ServerError.noAnswer(id, seconds: seconds)
    }
}

/// One newline-terminated line each way on a stream socket.
enum UnixLine {
    /// Best effort: a peer that went away has no one to tell.
    static func write(_ line: String, to socket: borrowing FileDescriptor) {
        _ = try? Array((line + "\n").utf8).withUnsafeBytes { try socket.sendAll($0) }
    }

    /// Up to the first newline (at most 4 KiB), without it; "" on EOF, error or timeout.
    static func read(_ socket: borrowing FileDescriptor) -> String {
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while bytes.count < 4096 {
            guard let count = try? withUnsafeMutableBytes(of: &byte, { try socket.receive(into: $0) }),
                  count > 0, byte != UInt8(ascii: "\n") else { break }
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
        // The new server reads the record: its first FLUSH fails, as this one's would have.
        if finalSync() != nil, var record = RuntimeDirectory.load(id) {
            record.writesLost = true
            do { try RuntimeDirectory.save(record) } catch { logger.error("cannot write the device record: \(error)") }
            logger.warning("writes /dev/ublkb\(id) completed may be lost: the next server fails its first FLUSH")
        }
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
