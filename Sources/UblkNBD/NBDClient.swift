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

/// Opens connections to an NBD export: connect, then the handshake. The connect is
/// bounded by `timeout`, and so is every send and receive of the handshake (a server
/// that stops answering fails it). Blocking: for setup and reconnects, never on a queue ring.
public enum NBDClient {
    /// How long connecting plus the handshake may take by default.
    public static let defaultTimeout: Duration = .seconds(10)

    public static func connect(to address: NBDAddress, timeout: Duration = defaultTimeout) throws(NBDError) -> NBDConnection {
        let socket: FileDescriptor
        do { socket = try FileDescriptor.connect(to: address.endpoint, timeout: timeout) }
        catch { throw connectFailure(error, endpoint: address.endpoint, timeout: timeout) }
        do { try socket.setStreamTimeout(timeout) }
        catch { throw NBDError(.connect, "cannot set up the connection to \(address.endpoint): \(error)") }
        let export = try NBDHandshake(address: address).negotiate(over: socket)
        do { try socket.setStreamTimeout(nil) }
        catch { throw NBDError(.connect, "cannot set up the connection to \(address.endpoint): \(error)") }
        return NBDConnection(export: export, socket: socket)
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

extension String {
    /// "Connection refused" → "connection refused", to continue a sentence.
    var lowercasedFirst: String { prefix(1).lowercased() + dropFirst() }
}
