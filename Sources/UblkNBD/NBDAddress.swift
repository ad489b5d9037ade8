import UblkSystem

/// Where an NBD export lives: the socket to connect to and the export's name.
///
/// Written as a URI (the NBD project's URI syntax, as `nbdinfo` and qemu take it):
/// `nbd://HOST[:PORT]/EXPORT` (port 10809 by default, `[::1]` for IPv6) or
/// `nbd+unix:///EXPORT?socket=PATH`. The export name is percent-decoded; an empty
/// one names the server's default export.
public struct NBDAddress: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The IANA port for NBD.
    public static let defaultPort: UInt16 = 10809
    /// Longest export name the protocol lets a server accept.
    public static let maximumNameLength = 4096
    /// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating zero).
    public static let maximumSocketPathLength = 107

    public var endpoint: SocketEndpoint
    public var exportName: String

    public init(endpoint: SocketEndpoint, exportName: String) {
        self.endpoint = endpoint
        self.exportName = exportName
    }

    /// Parses an `nbd://` or `nbd+unix://` URI; anything else is one line saying what a good URI looks like.
    public init(uri: String) throws(NBDError) {
        guard let colon = uri.firstIndex(of: ":"), uri[colon...].hasPrefix("://") else {
            throw Self.malformed(uri, "no scheme")
        }
        let scheme = uri[..<colon].lowercased()
        var rest = uri[uri.index(colon, offsetBy: 3)...]
        var query: Substring = ""
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        if rest.contains("#") { throw Self.malformed(uri, "a fragment (#) is not allowed") }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        let authority = rest[..<slash]
        let path = slash == rest.endIndex ? "" : rest[rest.index(after: slash)...]
        let name = try Self.percentDecoded(path, in: uri)
        guard name.utf8.count <= Self.maximumNameLength else {
            throw Self.malformed(uri, "the export name is longer than \(Self.maximumNameLength) bytes")
        }
        switch scheme {
        case "nbd":
            guard query.isEmpty else { throw Self.malformed(uri, "nbd:// takes no ?query") }
            self.init(endpoint: try Self.tcpEndpoint(authority, in: uri), exportName: name)
        case "nbd+unix":
            guard authority.isEmpty else { throw Self.malformed(uri, "nbd+unix:// takes no host (three slashes)") }
            self.init(endpoint: .unix(path: try Self.socketPath(query, in: uri)), exportName: name)
        case "nbds", "nbds+unix":
            throw NBDError(.tlsNotSupported, "TLS is not supported yet: use nbd://HOST[:PORT]/EXPORT "
                + "or nbd+unix:///EXPORT?socket=PATH instead of \(scheme)://")
        default:
            throw Self.malformed(uri, "unknown scheme \(scheme)://")
        }
    }

    /// The address as a URI again (export name and socket path percent-encoded).
    public var description: String {
        let name = Self.percentEncoded(exportName)
        switch endpoint {
        case .tcp:
            return "nbd://\(endpoint)/\(name)"
        case .unix(let path):
            return "nbd+unix:///\(name)?socket=\(Self.percentEncoded(path))"
        }
    }

    /// The `nbdinfo` command that lists the exports of this server, for error hints.
    public var listCommand: String {
        switch endpoint {
        case .tcp: "nbdinfo --list nbd://\(endpoint)"
        case .unix(let path): "nbdinfo --list 'nbd+unix:///?socket=\(Self.percentEncoded(path))'"
        }
    }

    static func malformed(_ uri: String, _ problem: String) -> NBDError {
        NBDError(.badURI, "bad NBD URI '\(uri)': \(problem): expected nbd://HOST[:PORT]/EXPORT, "
            + "nbd://[IPV6]:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    }

    private static func tcpEndpoint(_ authority: Substring, in uri: String) throws(NBDError) -> SocketEndpoint {
        if authority.contains("@") { throw malformed(uri, "user names (@) are not supported") }
        var host = authority
        var portText: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw malformed(uri, "unclosed [ in the host") }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw malformed(uri, "unexpected text after ]") }
                portText = after.dropFirst()
            }
        } else if authority.filter({ $0 == ":" }).count > 1 {
            throw malformed(uri, "an IPv6 address goes in brackets: nbd://[\(authority)]/EXPORT")
        } else if let colon = authority.firstIndex(of: ":") {
            host = authority[..<colon]
            portText = authority[authority.index(after: colon)...]
        }
        guard !host.isEmpty else { throw malformed(uri, "no host") }
        guard let portText else { return .tcp(host: String(host), port: defaultPort) }
        guard portText.allSatisfy(\.isASCII), let port = UInt16(portText), port > 0 else {
            throw malformed(uri, "port '\(portText)' is not a number from 1 to 65535")
        }
        return .tcp(host: String(host), port: port)
    }

    private static func socketPath(_ query: Substring, in uri: String) throws(NBDError) -> String {
        var path: String?
        for parameter in query.split(separator: "&") {
            let parts = parameter.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts[0] == "socket", parts.count == 2 else {
                throw malformed(uri, "unknown query parameter '\(parts[0])'")
            }
            path = try percentDecoded(parts[1], in: uri)
        }
        guard let path, !path.isEmpty else { throw malformed(uri, "nbd+unix:// needs ?socket=PATH") }
        guard path.utf8.count <= maximumSocketPathLength else {
            throw malformed(uri, "the socket path is longer than \(maximumSocketPathLength) bytes")
        }
        return path
    }

    private static func percentDecoded(_ text: Substring, in uri: String) throws(NBDError) -> String {
        var bytes: [UInt8] = []
        var index = text.utf8.startIndex
        while index != text.utf8.endIndex {
            let byte = text.utf8[index]
            index = text.utf8.index(after: index)
            guard byte == UInt8(ascii: "%") else { bytes.append(byte); continue }
            let digits = text.utf8[index...].prefix(2)
            guard digits.count == 2, let value = UInt8(String(decoding: digits, as: UTF8.self), radix: 16) else {
                throw malformed(uri, "a % is not followed by two hex digits")
            }
            bytes.append(value)
            index = digits.endIndex
        }
        guard let decoded = String(validating: bytes, as: UTF8.self) else {
            throw malformed(uri, "the percent-decoded name is not UTF-8")
        }
        return decoded
    }

    private static func percentEncoded(_ text: String) -> String {
        var result = ""
        for byte in text.utf8 {
            let scalar = Unicode.Scalar(byte)
            if byte < 0x80, scalar.properties.isAlphabetic || ("0"..."9").contains(scalar) || "-._~/:".unicodeScalars.contains(scalar) {
                result.unicodeScalars.append(scalar)
            } else {
                result += "%" + (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
            }
        }
        return result
    }
}
