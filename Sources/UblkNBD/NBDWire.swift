/// Transmission-phase commands (the request's `type` field).
public enum NBDCommand: UInt16, Sendable {
    case read = 0
    case write = 1
    /// Ends the session: no reply, the server closes the connection.
    case disconnect = 2
    /// Needs `SEND_FLUSH`; offset and length 0. Covers the writes already replied to.
    case flush = 3
    /// Needs `SEND_TRIM`.
    case trim = 4
    /// Needs `SEND_WRITE_ZEROES`.
    case writeZeroes = 6
}

/// Per-request command flags.
public struct NBDCommandFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// Force unit access: the reply means the data is on stable storage (needs `SEND_FUA`).
    public static let fua = Self(rawValue: 1 << 0)
    /// WRITE_ZEROES must allocate (not punch a hole).
    public static let noHole = Self(rawValue: 1 << 1)
}

/// One transmission request: the 28-byte header (a WRITE's data follows it on the wire).
public struct NBDRequest: Equatable, Hashable, Sendable {
    public static let magic: UInt32 = 0x2560_9513
    public static let headerSize = 28

    public var flags: NBDCommandFlags
    public var command: NBDCommand
    /// Echoed in the reply; the client picks it (a ublk tag fits).
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(_ command: NBDCommand, flags: NBDCommandFlags = [], cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// Writes the header, big-endian, into the first `headerSize` bytes of `buffer`
    /// (the caller's, so nothing is allocated per request).
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.headerSize, "an NBD request header needs \(Self.headerSize) bytes")
        buffer.storeBytes(of: Self.magic.bigEndian, toByteOffset: 0, as: UInt32.self)
        buffer.storeBytes(of: flags.rawValue.bigEndian, toByteOffset: 4, as: UInt16.self)
        buffer.storeBytes(of: command.rawValue.bigEndian, toByteOffset: 6, as: UInt16.self)
        buffer.storeBytes(of: cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
        buffer.storeBytes(of: offset.bigEndian, toByteOffset: 16, as: UInt64.self)
        buffer.storeBytes(of: length.bigEndian, toByteOffset: 24, as: UInt32.self)
    }

    /// Whether `length` bytes of data follow the header on the wire.
    public var carriesData: Bool { command == .write }

    /// Whether the server answers it (every command but DISC).
    public var expectsReply: Bool { command != .disconnect }
}

/// The simple reply header (16 bytes); a successful READ's data follows it.
public struct NBDSimpleReplyHeader: Equatable, Sendable {
    public static let magic: UInt32 = 0x6744_6698
    public static let size = 16

    /// The NBD error value (0 = success); `errno` translates it.
    public var error: UInt32
    public var cookie: UInt64

    public init(error: UInt32, cookie: UInt64) {
        self.error = error
        self.cookie = cookie
    }

    /// Decodes the first 16 bytes of `bytes`; nil when the magic is not the simple reply's.
    public init?(decoding bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        guard UInt32(bigEndian: bytes.loadUnaligned(as: UInt32.self)) == Self.magic else { return nil }
        error = UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        cookie = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
    }

    /// Writes the header (what a server sends; tests and fakes use it).
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.size)
        buffer.storeBytes(of: Self.magic.bigEndian, toByteOffset: 0, as: UInt32.self)
        buffer.storeBytes(of: error.bigEndian, toByteOffset: 4, as: UInt32.self)
        buffer.storeBytes(of: cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
    }

    /// The Linux errno for `error` (0 for success).
    public var errno: Int32 { NBDErrorNumber.errno(for: error) }
}

/// NBD error values. The protocol names them after Linux errno numbers; an unknown
/// value must be treated as EINVAL.
public enum NBDErrorNumber {
    public static let eperm: UInt32 = 1
    public static let eio: UInt32 = 5
    public static let enomem: UInt32 = 12
    public static let einval: UInt32 = 22
    public static let enospc: UInt32 = 28
    public static let eoverflow: UInt32 = 75
    public static let enotsup: UInt32 = 95
    /// The server is shutting down: no answer to pass on; the client sends DISC and tries again on a new connection.
    public static let eshutdown: UInt32 = 108

    /// The errno a ublk request completes with for an NBD error value (0 stays 0).
    public static func errno(for value: UInt32) -> Int32 {
        switch value {
        case 0, eperm, eio, enomem, einval, enospc, eoverflow, enotsup, eshutdown: Int32(value)
        default: Int32(einval)
        }
    }
}
