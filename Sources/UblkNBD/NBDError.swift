/// Why an NBD export could not be reached or negotiated: one line that says what to do.
///
/// `kind` lets callers react (a reconnect loop retries `.connect` and `.closed` but not
/// `.exportNotFound`); `message` is the line shown to the user.
public struct NBDError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: Equatable, Sendable {
        /// The URI is malformed or names something unsupported.
        case badURI
        /// The URI or the server asks for TLS, which this client does not speak yet.
        case tlsNotSupported
        /// The host name did not resolve.
        case lookup
        /// The socket could not connect (refused, unreachable, timed out).
        case connect
        /// The server does not have the export.
        case exportNotFound
        /// The server refused the export for another reason (policy, unsupported, ...).
        case refused
        /// The server closed the connection or stopped answering mid-handshake.
        case closed
        /// The server broke the handshake protocol.
        case protocolViolation
        /// The export cannot be served as a ublk device (block size).
        case unusable
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }

    /// Whether trying again later may succeed (the server restarting, a network blip).
    public var isTransient: Bool { kind == .connect || kind == .closed || kind == .lookup }
}
