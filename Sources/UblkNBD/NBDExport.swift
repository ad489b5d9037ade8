/// The transmission flags a server announces for an export (16 bits, sent with its size).
public struct NBDTransmissionFlags: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let hasFlags = Self(rawValue: 1 << 0)
    public static let readOnly = Self(rawValue: 1 << 1)
    public static let sendFlush = Self(rawValue: 1 << 2)
    public static let sendFUA = Self(rawValue: 1 << 3)
    public static let rotational = Self(rawValue: 1 << 4)
    public static let sendTrim = Self(rawValue: 1 << 5)
    public static let sendWriteZeroes = Self(rawValue: 1 << 6)
    public static let sendDF = Self(rawValue: 1 << 7)
    public static let canMultiConn = Self(rawValue: 1 << 8)
    public static let sendResize = Self(rawValue: 1 << 9)
    public static let sendCache = Self(rawValue: 1 << 10)
    public static let sendFastZero = Self(rawValue: 1 << 11)
    public static let blockStatusPayload = Self(rawValue: 1 << 12)

    /// The protocol's names, in bit order.
    static let names: [(Self, String)] = [
        (.hasFlags, "HAS_FLAGS"), (.readOnly, "READ_ONLY"), (.sendFlush, "SEND_FLUSH"), (.sendFUA, "SEND_FUA"),
        (.rotational, "ROTATIONAL"), (.sendTrim, "SEND_TRIM"), (.sendWriteZeroes, "SEND_WRITE_ZEROES"),
        (.sendDF, "SEND_DF"), (.canMultiConn, "CAN_MULTI_CONN"), (.sendResize, "SEND_RESIZE"),
        (.sendCache, "SEND_CACHE"), (.sendFastZero, "SEND_FAST_ZERO"), (.blockStatusPayload, "BLOCK_STAT_PAYLOAD"),
    ]

    /// The set flags by name, `|`-separated (`HAS_FLAGS|SEND_FLUSH|...`); unnamed bits as hex.
    public var description: String {
        var parts = Self.names.filter { contains($0.0) }.map(\.1)
        let unnamed = rawValue & ~Self.names.reduce(0) { $0 | $1.0.rawValue }
        if unnamed != 0 { parts.append("0x" + String(unnamed, radix: 16)) }
        return parts.isEmpty ? "none" : parts.joined(separator: "|")
    }
}

/// The block-size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
///
/// Once the client asked for them in `NBD_OPT_GO` it must obey them: requests aligned
/// to `minimum`, payloads of at most `maximumPayload`.
public struct NBDBlockSizes: Equatable, Hashable, Sendable {
    public var minimum: UInt32
    public var preferred: UInt32
    public var maximumPayload: UInt32

    public init(minimum: UInt32, preferred: UInt32, maximumPayload: UInt32) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximumPayload = maximumPayload
    }

    /// What the protocol lets a client assume when the server states nothing.
    public static let protocolDefault = NBDBlockSizes(minimum: 1, preferred: 4096, maximumPayload: 32 << 20)

    /// Whether the values obey the protocol's rules: powers of two from 1 to 64 KiB for
    /// minimum and at least 512 for preferred, minimum ≤ preferred, and a maximum that
    /// is a multiple of the minimum (or 0xffffffff, no limit) and at least the preferred
    /// size (or the whole export).
    func isValid(exportSize: UInt64) -> Bool {
        func powerOfTwo(_ value: UInt32) -> Bool { value != 0 && value & (value - 1) == 0 }
        return powerOfTwo(minimum) && minimum <= 65536 && powerOfTwo(preferred) && preferred >= max(512, minimum)
            && (maximumPayload % minimum == 0 || maximumPayload == .max)
            && (maximumPayload >= preferred || UInt64(maximumPayload) >= exportSize)
    }
}

/// An export the handshake agreed on: what the transmission phase may do with it.
public struct NBDExport: Equatable, Hashable, Sendable {
    /// How the export was selected: `NBD_OPT_GO`, or the older `NBD_OPT_EXPORT_NAME` for
    /// servers that answer GO with `NBD_REP_ERR_UNSUP`.
    public enum Negotiation: Equatable, Hashable, Sendable {
        case go
        case exportName
    }

    public var name: String
    /// Size in bytes, as the server reported it in the GO (or EXPORT_NAME) reply.
    public var size: UInt64
    public var flags: NBDTransmissionFlags
    /// The server's constraints, or `NBDBlockSizes.protocolDefault` when it sent none.
    public var blockSizes: NBDBlockSizes
    /// Whether `blockSizes` came from the server (`NBD_INFO_BLOCK_SIZE`).
    public var serverSentBlockSizes: Bool
    public var negotiation: Negotiation

    public init(name: String, size: UInt64, flags: NBDTransmissionFlags, blockSizes: NBDBlockSizes = .protocolDefault,
                serverSentBlockSizes: Bool = false, negotiation: Negotiation = .go) {
        self.name = name
        self.size = size
        self.flags = flags
        self.blockSizes = blockSizes
        self.serverSentBlockSizes = serverSentBlockSizes
        self.negotiation = negotiation
    }

    /// The name as messages show it: the default export's empty name would read as a gap.
    public var shownName: String { Self.shownName(name) }

    static func shownName(_ name: String) -> String { name.isEmpty ? "\"\" (the default export)" : name }

    /// Whether several connections may serve this export (one per ublk queue): only when
    /// the server promises that FLUSH and FUA on one connection cover writes on all.
    public var allowsMultipleConnections: Bool { flags.contains(.canMultiConn) }
}
