import Glibc
import UblkSystem

/// The fixed-newstyle handshake, client side: greeting, client flags, then `NBD_OPT_GO`
/// for the export (asking for its block-size constraints), or `NBD_OPT_EXPORT_NAME`
/// when the server does not know GO. Blocking; runs at setup and on reconnect.
struct NBDHandshake {
    static let greetingMagic: UInt64 = 0x4E42_444D_4147_4943 // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054 // "IHAVEOPT"
    static let oldstyleMagic: UInt64 = 0x0042_0281_8612_53
    static let optionReplyMagic: UInt64 = 0x3_e889_0455_65a9

    enum Option: UInt32 {
        case exportName = 1
        case abort = 2
        case go = 7
    }

    enum Info: UInt16 {
        case export = 0
        case blockSize = 3
    }

    /// Option reply types; errors have bit 31 set.
    enum Reply {
        static let ack: UInt32 = 1
        static let info: UInt32 = 3
        static let error: UInt32 = 1 << 31
        static let errorNames = ["UNSUP", "POLICY", "INVALID", "PLATFORM", "TLS_REQD", "UNKNOWN", "SHUTDOWN",
                                 "BLOCK_SIZE_REQD", "TOO_BIG", "EXT_HEADER_REQD"]
    }

    /// Longest option reply accepted: info replies are a few bytes, error texts short.
    static let maximumReplyLength: UInt32 = 64 * 1024
    /// Most info replies accepted to one GO: a server has a handful of kinds to send.
    static let maximumInfoReplies = 32

    let address: NBDAddress
    var server: String { address.endpoint.description }
    var name: String { NBDExport.shownName(address.exportName) }

    func negotiate<Stream: NBDByteStream & ~Copyable>(over stream: borrowing Stream) throws(NBDError) -> NBDExport {
        var greeting = ByteReader(try receive(18, from: stream))
        guard greeting.u64() == Self.greetingMagic else {
            throw violation("its greeting does not start with NBDMAGIC (is this an NBD server?)")
        }
        let style = greeting.u64()
        if style == Self.oldstyleMagic {
            throw NBDError(.refused, "NBD server \(server) speaks the old-style handshake, which is not supported: "
                + "run it with newstyle exports")
        }
        guard style == Self.optionMagic else { throw violation("its greeting has no IHAVEOPT") }
        let serverFlags = greeting.u16()
        let fixedNewstyle = serverFlags & 1 != 0, noZeroes = serverFlags & 2 != 0
        // Echo only the bits the server offered: an unknown bit makes it hang up.
        try send(ByteWriter().u32((fixedNewstyle ? 1 : 0) | (noZeroes ? 2 : 0)).bytes, to: stream)
        // A server without fixed newstyle drops the connection on any option it does not know.
        if fixedNewstyle {
            do { if let export = try go(over: stream) { return try addressable(export) } }
            catch where [.exportNotFound, .refused, .tlsNotSupported].contains(error.kind) {
                // End the negotiation politely: the server then logs no "unexpected end of file".
                try? sendOption(.abort, [], to: stream)
                throw error
            }
        }
        return try addressable(try exportName(over: stream, noZeroes: noZeroes))
    }

    /// The export, unless its size is beyond a signed 64-bit byte offset: no block device
    /// (and no file system) addresses that much, so the size is a lie.
    private func addressable(_ export: NBDExport) throws(NBDError) -> NBDExport {
        guard export.size > UInt64(Int64.max) else { return export }
        throw NBDError(.unusable, "NBD server \(server) claims \(export.size) bytes for export \(name), "
            + "more than a block device can address: check the server")
    }

    /// `NBD_OPT_GO`; nil when the server answers `NBD_REP_ERR_UNSUP` (then EXPORT_NAME is tried).
    private func go<Stream: NBDByteStream & ~Copyable>(over stream: borrowing Stream) throws(NBDError) -> NBDExport? {
        let nameBytes = Array(address.exportName.utf8)
        let request = ByteWriter().u32(UInt32(nameBytes.count)).raw(nameBytes)
            .u16(2).u16(Info.blockSize.rawValue).u16(Info.export.rawValue)
        try sendOption(.go, request.bytes, to: stream)
        var export: (size: UInt64, flags: NBDTransmissionFlags)?
        var blockSizes: NBDBlockSizes?
        for _ in 0...Self.maximumInfoReplies {
            let (type, data) = try receiveOptionReply(for: .go, from: stream)
            switch type {
            case Reply.ack:
                guard let export else { throw violation("it ended GO without the export's size") }
                let sizes = blockSizes ?? .protocolDefault
                guard sizes.isValid(exportSize: export.size) else {
                    throw violation("its block sizes \(sizes.minimum)/\(sizes.preferred)/\(sizes.maximumPayload) break the rules")
                }
                return NBDExport(name: address.exportName, size: export.size, flags: export.flags, blockSizes: sizes,
                                 serverSentBlockSizes: blockSizes != nil, negotiation: .go)
            case Reply.info:
                guard data.count >= 2 else { throw violation("it sent an info reply without a type") }
                var info = ByteReader(data)
                switch Info(rawValue: info.u16()) {
                case .export where data.count >= 12:
                    export = (info.u64(), NBDTransmissionFlags(rawValue: info.u16()))
                case .blockSize where data.count >= 14:
                    blockSizes = NBDBlockSizes(minimum: info.u32(), preferred: info.u32(), maximumPayload: info.u32())
                case .export, .blockSize: throw violation("it sent a short info reply")
                case nil: continue // Information the client did not ask for: ignore, as the protocol says.
                }
            case Reply.error | 1: return nil
            default: throw refusal(type, text: data)
            }
        }
        throw violation("it sent more than \(Self.maximumInfoReplies) info replies to GO")
    }

    /// `NBD_OPT_EXPORT_NAME`: the reply is the size and flags; a refusal is a hang-up.
    private func exportName<Stream: NBDByteStream & ~Copyable>(over stream: borrowing Stream, noZeroes: Bool) throws(NBDError) -> NBDExport {
        try sendOption(.exportName, Array(address.exportName.utf8), to: stream)
        var reply: ByteReader
        do { reply = ByteReader(try receive(10 + (noZeroes ? 0 : 124), from: stream)) }
        catch where error.kind == .closed {
            throw NBDError(.exportNotFound, "export \(name) not found on \(server) (the server hung up): "
                + "check the name (\(address.listCommand))")
        }
        return NBDExport(name: address.exportName, size: reply.u64(), flags: NBDTransmissionFlags(rawValue: reply.u16()),
                         negotiation: .exportName)
    }

    private func sendOption<Stream: NBDByteStream & ~Copyable>(_ option: Option, _ data: [UInt8], to stream: borrowing Stream) throws(NBDError) {
        let message = ByteWriter().u64(Self.optionMagic).u32(option.rawValue).u32(UInt32(data.count)).raw(data)
        try send(message.bytes, to: stream)
    }

    /// One option reply: its type and data, after checking its magic and option.
    private func receiveOptionReply<Stream: NBDByteStream & ~Copyable>(for option: Option, from stream: borrowing Stream) throws(NBDError) -> (UInt32, [UInt8]) {
        var header = ByteReader(try receive(20, from: stream))
        guard header.u64() == Self.optionReplyMagic, header.u32() == option.rawValue else {
            throw violation("its option reply has a bad magic or names another option")
        }
        let type = header.u32(), length = header.u32()
        guard length <= Self.maximumReplyLength else { throw violation("its option reply claims \(length) bytes") }
        return (type, try receive(Int(length), from: stream))
    }

    /// One line for an error reply to GO.
    private func refusal(_ type: UInt32, text: [UInt8]) -> NBDError {
        guard type & Reply.error != 0 else { return violation("it sent option reply type \(type) to GO") }
        let code = Int(type & ~Reply.error)
        let said = Self.printable(text).map { " (the server says: \($0))" } ?? ""
        switch code {
        case 6:
            return NBDError(.exportNotFound, "export \(name) not found on \(server): check the name (\(address.listCommand))")
        case 2:
            return NBDError(.refused, "NBD server \(server) refuses export \(name) by policy\(said): "
                + "check its access rules for this client")
        case 5:
            return NBDError(.tlsNotSupported, "NBD server \(server) requires TLS, which is not supported yet: "
                + "serve the export without TLS")
        default:
            let label = (1...Reply.errorNames.count).contains(code) ? "NBD_REP_ERR_" + Reply.errorNames[code - 1] : "error \(code)"
            return NBDError(.refused, "NBD server \(server) refuses export \(name): \(label)\(said)")
        }
    }

    /// A server's message made safe for one log line; nil when empty.
    static func printable(_ text: [UInt8]) -> String? {
        let line = String(decoding: text.prefix(200), as: UTF8.self)
            .map { $0.isNewline || $0.asciiValue.map { $0 < 0x20 } == true ? " " : String($0) }.joined()
        return line.isEmpty ? nil : line
    }

    private func violation(_ what: String) -> NBDError {
        NBDError(.protocolViolation, "NBD server \(server) broke the handshake protocol: \(what)")
    }

    private func send<Stream: NBDByteStream & ~Copyable>(_ bytes: [UInt8], to stream: borrowing Stream) throws(NBDError) {
        do { try bytes.withUnsafeBytes { try stream.sendAll($0) } }
        catch { throw streamFailure(error) }
    }

    private func receive<Stream: NBDByteStream & ~Copyable>(_ count: Int, from stream: borrowing Stream) throws(NBDError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let complete: Bool
        do { complete = try bytes.withUnsafeMutableBytes { try stream.receiveAll(into: $0) } }
        catch { throw streamFailure(error) }
        guard complete else { throw NBDError(.closed, "NBD server \(server) closed the connection during the handshake") }
        return bytes
    }

    private func streamFailure(_ error: any Error) -> NBDError {
        if let error = error as? SystemError, error.errno == EAGAIN {
            return NBDError(.closed, "NBD server \(server) stopped answering during the handshake: is it overloaded?")
        }
        return NBDError(.closed, "handshake with NBD server \(server) failed: \(error)")
    }
}

/// Builds a big-endian message (handshake only: allocating here is fine).
struct ByteWriter {
    private(set) var bytes: [UInt8] = []

    func u16(_ value: UInt16) -> Self { appending(value) }
    func u32(_ value: UInt32) -> Self { appending(value) }
    func u64(_ value: UInt64) -> Self { appending(value) }
    func raw(_ data: [UInt8]) -> Self {
        var copy = self
        copy.bytes += data
        return copy
    }

    private func appending<T: FixedWidthInteger>(_ value: T) -> Self {
        var copy = self
        withUnsafeBytes(of: value.bigEndian) { copy.bytes += $0 }
        return copy
    }
}

/// Reads big-endian integers from a received message; callers check the length first.
struct ByteReader {
    private let bytes: [UInt8]
    private var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    mutating func u16() -> UInt16 { next() }
    mutating func u32() -> UInt32 { next() }
    mutating func u64() -> UInt64 { next() }

    private mutating func next<T: FixedWidthInteger>() -> T {
        let value = bytes[offset..<offset + MemoryLayout<T>.size].reduce(T(0)) { $0 << 8 | T($1) }
        offset += MemoryLayout<T>.size
        return value
    }
}
