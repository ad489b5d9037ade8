/// How the `user_data` of every SQE on a queue's ring is laid out: the one place that says so.
///
///     bits 56...63  kind   what the operation is (below)
///     bits 16...31  step   a target's own number for which of a request's operations
///                          this is, when it has several in flight (0 otherwise)
///     bits  0...15  tag    the request's tag (meaningless for `.queue`)
///
/// Kinds:
/// - `.command`: a ublk FETCH_REQ or COMMIT_AND_FETCH_REQ on /dev/ublkcN;
/// - `.target`: a target's backing operation for a tag's request;
/// - `.queue`: reserved for target operations not tied to one request (the receive of
///   a network reply header, which says itself which tag it answers).
public struct UserData: RawRepresentable, Equatable, Sendable {
    public var rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    public enum Kind: UInt8, Sendable {
        case command = 0
        case target = 1
        case queue = 2
    }

    @inlinable
    public init(_ kind: Kind, tag: UInt16, step: UInt16 = 0) {
        rawValue = UInt64(kind.rawValue) << 56 | UInt64(step) << 16 | UInt64(tag)
    }

    /// The kind, or nil for a value no SQE of this project carries.
    @inlinable public var kind: Kind? { Kind(rawValue: UInt8(truncatingIfNeeded: rawValue >> 56)) }
    @inlinable public var tag: UInt16 { UInt16(truncatingIfNeeded: rawValue) }
    @inlinable public var step: UInt16 { UInt16(truncatingIfNeeded: rawValue >> 16) }
}
