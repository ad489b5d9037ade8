/// What an in-flight request expects back.
public enum NBDExpectedReply {
    /// No data follows a reply (WRITE, FLUSH, TRIM, WRITE_ZEROES).
    case noData
    /// A successful reply carries `destination.count` bytes (the READ's length), which
    /// go straight into `destination`: the request's own buffer.
    case readData(into: UnsafeMutableRawBufferPointer)
}

/// The caller's table of requests in flight on one connection, keyed by cookie.
///
/// The parser is generic over it (specialized, no existential, no allocation), so the
/// lookup and the completion are plain calls on the queue thread's own state.
public protocol NBDInFlightRequests {
    /// The request in flight under `cookie`, or nil when there is none (an unknown cookie,
    /// or one whose reply already came): the parser then reports a protocol violation.
    mutating func expectedReply(cookie: UInt64) -> NBDExpectedReply?

    /// The reply for `cookie` is complete: its header, and for a successful READ all its
    /// data, arrived. `errno` is 0 on success or the Linux errno the server's error maps to.
    /// The caller must forget `cookie` here, so a second reply for it is a violation.
    mutating func replyCompleted(cookie: UInt64, errno: Int32)
}

/// A server broke the transmission protocol. The caller drops the connection (and
/// resends what was in flight on a new one); no request completes with its data.
public enum NBDProtocolViolation: Error, Equatable, Sendable, CustomStringConvertible {
    /// A reply header's magic is not the simple reply's (structured replies are never negotiated).
    case badMagic(UInt32)
    /// A reply names a cookie that is not in flight.
    case unknownCookie(UInt64)
    /// The connection ended in the middle of a reply.
    case truncatedReply(bytesMissing: Int)

    public var description: String {
        switch self {
        case .badMagic(let magic): "NBD server broke the protocol: reply magic 0x\(String(magic, radix: 16)) is not 0x67446698"
        case .unknownCookie(let cookie): "NBD server broke the protocol: reply for cookie \(cookie), which is not in flight"
        case .truncatedReply(let missing): "NBD server closed the connection \(missing) bytes short of a reply"
        }
    }
}

/// Turns the byte stream of one connection's transmission phase into completed replies,
/// whatever way `recv` splits it.
///
/// Feed it bytes as they arrive (`feed`); or, while a READ's data is pending, receive
/// straight into `pendingReadData` and report the count with `readDataArrived`, so the
/// payload lands in the request's buffer without a copy. One parser per connection; a
/// new connection starts with a new parser (`init`).
public struct NBDReplyParser {
    private enum State {
        /// Collecting a 16-byte reply header; `filled` bytes so far.
        case header(filled: Int)
        /// A successful READ's data: `filled` of `destination.count` bytes arrived.
        case readData(cookie: UInt64, destination: UnsafeMutableRawBufferPointer, filled: Int)
    }

    private var state = State.header(filled: 0)
    /// The partial header, in place (no heap): two words are 16 bytes.
    private var headerBytes: (UInt64, UInt64) = (0, 0)

    public init() {}

    /// Whether the stream is between two replies (an end of stream here loses nothing).
    public var isBetweenReplies: Bool {
        if case .header(0) = state { return true }
        return false
    }

    /// The rest of the current READ's buffer while its data is arriving, else nil:
    /// the caller may `recv` into it directly, then call `readDataArrived`.
    public var pendingReadData: UnsafeMutableRawBufferPointer? {
        guard case .readData(_, let destination, let filled) = state else { return nil }
        return UnsafeMutableRawBufferPointer(rebasing: destination[filled...])
    }

    /// Consumes every byte of `bytes`, completing each reply they finish on `requests`.
    public mutating func feed<Requests: NBDInFlightRequests>(
        _ bytes: UnsafeRawBufferPointer, to requests: inout Requests
    ) throws(NBDProtocolViolation) {
        var consumed = 0
        while consumed < bytes.count {
            let input = UnsafeRawBufferPointer(rebasing: bytes[consumed...])
            switch state {
            case .header(let filled):
                let count = min(NBDSimpleReplyHeader.size - filled, input.count)
                withUnsafeMutableBytes(of: &headerBytes) {
                    UnsafeMutableRawBufferPointer(rebasing: $0[filled..<filled + count]).copyMemory(from: UnsafeRawBufferPointer(rebasing: input[..<count]))
                }
                consumed += count
                state = .header(filled: filled + count)
                if filled + count == NBDSimpleReplyHeader.size { try headerComplete(&requests) }
            case .readData(_, let destination, let filled):
                let count = min(destination.count - filled, input.count)
                UnsafeMutableRawBufferPointer(rebasing: destination[filled..<filled + count])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: input[..<count]))
                consumed += count
                readDataArrived(count, to: &requests)
            }
        }
    }

    /// Reports `count` bytes the caller received straight into `pendingReadData`.
    public mutating func readDataArrived<Requests: NBDInFlightRequests>(_ count: Int, to requests: inout Requests) {
        guard case .readData(let cookie, let destination, let filled) = state else {
            preconditionFailure("readDataArrived without a READ's data pending")
        }
        precondition(filled + count <= destination.count, "more READ data than the request's length")
        if filled + count == destination.count {
            state = .header(filled: 0)
            requests.replyCompleted(cookie: cookie, errno: 0)
        } else {
            state = .readData(cookie: cookie, destination: destination, filled: filled + count)
        }
    }

    /// The connection ended: fine between replies, a violation inside one.
    public func endOfStream() throws(NBDProtocolViolation) {
        switch state {
        case .header(0): return
        case .header(let filled): throw .truncatedReply(bytesMissing: NBDSimpleReplyHeader.size - filled)
        case .readData(_, let destination, let filled): throw .truncatedReply(bytesMissing: destination.count - filled)
        }
    }

    private mutating func headerComplete<Requests: NBDInFlightRequests>(_ requests: inout Requests) throws(NBDProtocolViolation) {
        let decoded = withUnsafeBytes(of: &headerBytes) { NBDSimpleReplyHeader(decoding: $0) }
        guard let header = decoded else {
            throw .badMagic(withUnsafeBytes(of: &headerBytes) { UInt32(bigEndian: $0.loadUnaligned(as: UInt32.self)) })
        }
        guard let expected = requests.expectedReply(cookie: header.cookie) else { throw .unknownCookie(header.cookie) }
        state = .header(filled: 0)
        switch expected {
        case .readData(let destination) where header.error == 0 && destination.count > 0:
            state = .readData(cookie: header.cookie, destination: destination, filled: 0)
        case .readData, .noData:
            requests.replyCompleted(cookie: header.cookie, errno: header.errno)
        }
    }
}
