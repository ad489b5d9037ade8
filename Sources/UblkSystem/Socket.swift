import Glibc

/// Where a stream socket connects: a TCP host and port, or a Unix socket path.
public enum SocketEndpoint: Equatable, Hashable, Sendable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    /// `host:port` (`[::1]:port` for an IPv6 literal) or the socket path, as messages name it.
    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): path
        }
    }
}

/// `getaddrinfo` found no address for a host; `reason` is its `gai_strerror` text.
public struct HostLookupError: Error, Equatable, Sendable, CustomStringConvertible {
    public var host: String
    public var reason: String

    public init(host: String, reason: String) {
        self.host = host
        self.reason = reason
    }

    public var description: String { "cannot resolve \(host): \(reason)" }
}

extension FileDescriptor {
    /// A blocking stream socket connected to `endpoint`; for TCP with TCP_NODELAY and
    /// the means to notice a vanished peer (`noticePeerLoss`).
    ///
    /// Every address of a host is tried in turn, all within one `timeout`. Throws
    /// `HostLookupError`, or the `SystemError` of the last address tried (`connect
    /// HOST:PORT` with ECONNREFUSED, ETIMEDOUT when `timeout` passed, ...).
    public static func connect(to endpoint: SocketEndpoint, timeout: Duration) throws -> FileDescriptor {
        let deadline = ContinuousClock.now + timeout
        switch endpoint {
        case .unix(let path):
            guard let address = Syscalls.unixAddress(path) else {
                throw SystemError("connect \(path)", errno: ENAMETOOLONG)
            }
            return FileDescriptor(adopting: try Syscalls.connect(address, description: path, deadline: deadline))
        case .tcp(let host, let port):
            var lastError: any Error = SystemError("connect \(endpoint)", errno: EADDRNOTAVAIL)
            for address in try Syscalls.resolve(host: host, port: port, timeout: timeout) {
                do {
                    let socket = FileDescriptor(adopting: try Syscalls.connect(address, description: "\(endpoint)", deadline: deadline))
                    try socket.noticePeerLoss()
                    return socket
                } catch {
                    lastError = error
                    if (error as? SystemError)?.errno == ETIMEDOUT { break }
                }
            }
            throw lastError
        }
    }

    /// Seconds a connection may go without a byte from its peer before keepalive probes
    /// start, between probes, and probes unanswered: a peer that vanished without a word
    /// (power lost, a partition, a dropped NAT entry) is noticed within 15 to 25 s, by
    /// the probes or by `unacknowledgedLimit` (which also bounds unanswered probes).
    public static let keepalive = (idle: Int32(10), interval: Int32(5), probes: Int32(3))
    /// Milliseconds sent data may go unacknowledged before the connection fails (TCP_USER_TIMEOUT).
    public static let unacknowledgedLimit = UInt32(15_000)

    /// TCP_NODELAY (a request header must not wait for the previous reply's ACK), and the
    /// keepalive and user timeout above: without them a connection to a vanished peer
    /// looks alive for TCP's own ~15 minutes of retransmissions, and so would its requests.
    /// Those two are best effort (a sandbox may lack them): the connection works without.
    func noticePeerLoss() throws {
        let tcp = Int32(IPPROTO_TCP)
        try Syscalls.setSocketOption(rawValue, level: tcp, option: TCP_NODELAY, Int32(1), name: "TCP_NODELAY")
        try? Syscalls.setSocketOption(rawValue, level: SOL_SOCKET, option: SO_KEEPALIVE, Int32(1), name: "SO_KEEPALIVE")
        try? Syscalls.setSocketOption(rawValue, level: tcp, option: TCP_KEEPIDLE, Self.keepalive.idle, name: "TCP_KEEPIDLE")
        try? Syscalls.setSocketOption(rawValue, level: tcp, option: TCP_KEEPINTVL, Self.keepalive.interval, name: "TCP_KEEPINTVL")
        try? Syscalls.setSocketOption(rawValue, level: tcp, option: TCP_KEEPCNT, Self.keepalive.probes, name: "TCP_KEEPCNT")
        try? Syscalls.setSocketOption(rawValue, level: tcp, option: TCP_USER_TIMEOUT, Self.unacknowledgedLimit,
                                      name: "TCP_USER_TIMEOUT")
    }

    /// Bounds every later blocking send and receive on this socket (`SO_SNDTIMEO`,
    /// `SO_RCVTIMEO`): past it they fail with EAGAIN. `nil` removes the bound.
    public func setStreamTimeout(_ timeout: Duration?) throws {
        let (seconds, attoseconds) = (timeout ?? .zero).components
        let value = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        try Syscalls.setSocketOption(rawValue, level: SOL_SOCKET, option: SO_RCVTIMEO, value, name: "SO_RCVTIMEO")
        try Syscalls.setSocketOption(rawValue, level: SOL_SOCKET, option: SO_SNDTIMEO, value, name: "SO_SNDTIMEO")
    }

    /// `send(2)` (never raises SIGPIPE): may send fewer bytes than given.
    public func send(_ buffer: UnsafeRawBufferPointer) throws -> Int { try Syscalls.send(rawValue, buffer) }

    /// Ends both directions of the connection now: pending receives see its end, sends fail.
    public func shutdown() { Syscalls.shutdown(rawValue) }

    /// `recv(2)`: may return fewer bytes than asked; 0 means the peer closed the connection.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int { try Syscalls.receive(rawValue, buffer) }

    /// Sends every byte of `bytes` (as many `send` calls as it takes), or throws.
    public func sendAll(_ bytes: UnsafeRawBufferPointer) throws {
        var sent = 0
        while sent < bytes.count {
            sent += try send(UnsafeRawBufferPointer(rebasing: bytes[sent...]))
        }
    }

    /// Fills all of `buffer`; false when the peer closed the connection first.
    public func receiveAll(into buffer: UnsafeMutableRawBufferPointer) throws -> Bool {
        var filled = 0
        while filled < buffer.count {
            let count = try receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
            if count == 0 { return false }
            filled += count
        }
        return true
    }
}

/// A listening Unix stream socket at a path (owner only: root's requests, like the
/// control device). A class, so the thread that accepts on it can share it with the
/// thread that made it; it closes the socket when the last reference goes. The socket
/// file is not removed then: the path may be another process's by that time.
public final class UnixListener: Sendable {
    private let socket: FileDescriptor
    public let path: String

    public init(path: String, backlog: Int32 = 4) throws(SystemError) {
        socket = FileDescriptor(adopting: try Syscalls.listenUnix(path, backlog: backlog))
        self.path = path
    }

    /// The next connection (blocking).
    public func accept() throws(SystemError) -> FileDescriptor {
        FileDescriptor(adopting: try Syscalls.accept(socket.rawValue))
    }
}
