import Glibc
import UblkSystem

/// A socket in the transmission phase of one export, and what the handshake agreed.
public struct NBDConnection: ~Copyable {
    public let export: NBDExport
    /// Blocking, without send/receive timeouts: ready for the queue ring's send and recv.
    public let socket: FileDescriptor

    /// The socket alone, for the queue that will own it (the export is a copyable value:
    /// read it before).
    public consuming func takeSocket() -> FileDescriptor { socket }
}

/// Opens connections to an NBD export: connect, then the handshake, both within one
/// `timeout` (a server that stops answering, or sends a byte now and then, fails it).
/// Blocking: for setup and reconnects, never on a queue ring.
public enum NBDClient {
    /// How long connecting plus the handshake may take by default.
    public static let defaultTimeout: Duration = .seconds(10)

    public static func connect(to address: NBDAddress, timeout: Duration = defaultTimeout) throws(NBDError) -> NBDConnection {
        let deadline = ContinuousClock.now + timeout
        let socket: FileDescriptor
        do { socket = try FileDescriptor.connect(to: address.endpoint, timeout: timeout) }
        catch { throw connectFailure(error, endpoint: address.endpoint, timeout: timeout) }
        let stream = DeadlineStream(socket: socket, deadline: deadline)
        let export = try NBDHandshake(address: address).negotiate(over: stream)
        let ready = stream.take()
        do { try ready.setStreamTimeout(nil) }
        catch { throw NBDError(.connect, "cannot set up the connection to \(address.endpoint): \(error)") }
        return NBDConnection(export: export, socket: ready)
    }

    /// One line for a failed connect, with what to check.
    static func connectFailure(_ error: any Error, endpoint: SocketEndpoint, timeout: Duration) -> NBDError {
        if let lookup = error as? HostLookupError {
            return NBDError(.lookup, "cannot resolve \(lookup.host): \(lookup.reason.lowercasedFirst): check the host in the URI")
        }
        guard let error = error as? SystemError else { return NBDError(.connect, "cannot connect to \(endpoint): \(error)") }
        let prefix = "cannot connect to \(endpoint): \(error.reason.lowercasedFirst)"
        switch error.errno {
        case ECONNREFUSED, ENOENT: return NBDError(.connect, prefix + ": is the NBD server running?")
        case ETIMEDOUT: return NBDError(.connect, "cannot connect to \(endpoint): no answer within \(timeout): check the host, the port and any firewall")
        case ENAMETOOLONG: return NBDError(.badURI, "socket path \(endpoint) is too long: Unix sockets take at most 107 bytes")
        case EACCES: return NBDError(.connect, prefix + ": check the socket's permissions")
        default: return NBDError(.connect, prefix)
        }
    }
}

/// The socket during the handshake: each send and receive may take only what is left
/// until `deadline`, so the handshake as a whole ends by it. Past it they fail with EAGAIN,
/// as a receive timeout does.
struct DeadlineStream: NBDByteStream, ~Copyable {
    let socket: FileDescriptor
    let deadline: ContinuousClock.Instant

    /// The socket again, for the transmission phase.
    consuming func take() -> FileDescriptor { socket }

    func sendAll(_ bytes: UnsafeRawBufferPointer) throws {
        var sent = 0
        while sent < bytes.count {
            try bound()
            sent += try socket.send(UnsafeRawBufferPointer(rebasing: bytes[sent...]))
        }
    }

    func receiveAll(into buffer: UnsafeMutableRawBufferPointer) throws -> Bool {
        var filled = 0
        while filled < buffer.count {
            try bound()
            let count = try socket.receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
            if count == 0 { return false }
            filled += count
        }
        return true
    }

    /// The next send or receive times out at the deadline (a zero timeout would mean none).
    private func bound() throws {
        let left = ContinuousClock.now.duration(to: deadline)
        guard left > .zero else { throw SystemError("NBD handshake", errno: EAGAIN) }
        try socket.setStreamTimeout(max(left, .milliseconds(1)))
    }
}

extension String {
    /// "Connection refused" → "connection refused", to continue a sentence.
    var lowercasedFirst: String { prefix(1).lowercased() + dropFirst() }
}
