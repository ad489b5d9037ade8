import UblkCrypto
import UblkQueue
import UblkSystem

/// What a device is backed by and how: the one description of a target that the
/// command line, config files, the records under /run/ublk and recovery all share.
/// New targets add a case.
public enum TargetSpec: Sendable, Equatable, Codable {
    case loop(LoopConfiguration)
    case null(NullConfiguration)
    case nbd(NBDConfiguration)

    /// Short name (`loop`, `null`), as `ublk list` shows it.
    public var name: String {
        switch self {
        case .loop: "loop"
        case .null: "null"
        case .nbd: "nbd"
        }
    }

    /// The name `ublk list` shows: `loop+crypt` for an encrypting loop target.
    public var displayName: String {
        encryption == nil ? name : "\(name)+crypt"
    }

    /// How the target encrypts, if it does (never the key).
    public var encryption: EncryptionConfiguration? {
        switch self {
        case .loop(let configuration): configuration.encryption
        case .null, .nbd: nil
        }
    }

    /// The backing file, if the target has one.
    public var backing: String? {
        switch self {
        case .loop(let configuration): configuration.path
        case .null: nil
        case .nbd(let configuration): configuration.uri
        }
    }

    /// Where in its backing a loop device lies: its offset, and its size limit if it has
    /// one (losetup's OFFSET and SIZELIMIT); 0 and nil for other targets.
    public var window: (offset: UInt64, sizeLimit: UInt64?) {
        guard case .loop(let configuration) = self else { return (0, nil) }
        return (configuration.offset, configuration.size)
    }

    /// The same target after `ublk resize`: its size limit `size` bytes (nil: to the end of the backing).
    public func resized(to size: UInt64?) -> TargetSpec {
        switch self {
        case .loop(var configuration):
            configuration.size = size
            return .loop(configuration)
        case .null(var configuration):
            if let size { configuration.size = size }
            return .null(configuration)
        case .nbd:
            return self // the export's size is the server's
        }
    }

    /// Opens the target the spec describes (the backing is opened and probed); `key` is the
    /// key of an encrypted one (see `encryption`), which every server reads anew.
    public func makeTarget(key: EncryptionKey? = nil) throws(TargetError) -> any SpecifiedTarget {
        switch self {
        case .loop(let configuration): try LoopTarget(configuration, key: key)
        case .null(let configuration): NullTarget(configuration)
        case .nbd(let configuration): try NBDTarget(configuration)
        }
    }

    private enum CodingKeys: String, CodingKey {
        case kind, loop, null, nbd
    }

    // {"kind": "loop", "loop": {...}}: the kind readable on its own, the settings beside it.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let kind = try container.decode(String.self, forKey: .kind)
        switch kind {
        case "loop": self = .loop(try container.decode(LoopConfiguration.self, forKey: .loop))
        case "null": self = .null(try container.decode(NullConfiguration.self, forKey: .null))
        case "nbd": self = .nbd(try container.decode(NBDConfiguration.self, forKey: .nbd))
        default: throw DecodingError.dataCorruptedError(forKey: .kind, in: container, debugDescription: "unknown target \(kind)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(name, forKey: .kind)
        switch self {
        case .loop(let configuration): try container.encode(configuration, forKey: .loop)
        case .null(let configuration): try container.encode(configuration, forKey: .null)
        case .nbd(let configuration): try container.encode(configuration, forKey: .nbd)
        }
    }
}

/// A target made from a `TargetSpec`: what the server records about it besides `Target`.
public protocol SpecifiedTarget: Target {
    /// The spec that makes this same device again: what was asked, with what the target
    /// settled on filled in (the block size). Recovery rebuilds the target from it.
    var spec: TargetSpec { get }
    /// O_DIRECT on the backing: "on", "off", or "-" without a backing (`ublk list`'s DIO).
    var directIOState: String { get }
    /// One line for the user when the target chose less than was asked, else nil.
    var note: String? { get }
    /// The most queues the target can serve, and why, when it cannot serve any number.
    var queueLimit: (queues: Int, reason: String)? { get }
    /// A check value of the target's key, for the record a new server's key is checked
    /// against; nil for targets without a key.
    var keyCheck: KeyCheck? { get }
    /// The backing file the target opened, for the record a new server's is checked
    /// against; nil for targets without one.
    var backingIdentity: FileIdentity? { get }
}

extension SpecifiedTarget {
    public var queueLimit: (queues: Int, reason: String)? { nil }
    public var keyCheck: KeyCheck? { nil }
    public var backingIdentity: FileIdentity? { nil }
}
