import Glibc
import Testing
import UblkNBD
import UblkSystem

/// A synchronous transmission-phase client for tests: sends a batch of requests with
/// blocking sends, then receives replies through `NBDReplyParser` until every one is
/// complete. Not a product API: the NBD target drives the same pieces from its ring.
struct NBDTestDriver: ~Copyable {
    let connection: NBDConnection
    let buffers = Buffers()
    private var nextCookie: UInt64 = 0x1000
    private var parser = NBDReplyParser()

    init(_ connection: consuming NBDConnection) throws {
        self.connection = connection
        try self.connection.socket.setStreamTimeout(.seconds(10)) // a hung server fails the test, never hangs it
    }

    var export: NBDExport { connection.export }

    /// Sends `blocks` as one pipelined batch (mapped with `NBDExport.request`) and waits
    /// for all replies; returns each request's cookie and errno in submission order.
    mutating func perform(_ blocks: [(BlockRequest, data: [UInt8])]) throws -> [(cookie: UInt64, errno: Int32)] {
        var table = InFlightTable()
        var cookies: [UInt64] = []
        var header = [UInt8](repeating: 0, count: NBDRequest.headerSize)
        for (block, data) in blocks {
            nextCookie += 1
            let request = try #require(export.request(for: block, cookie: nextCookie))
            header.withUnsafeMutableBytes { request.encode(into: $0) }
            try header.withUnsafeBytes { try connection.socket.sendAll($0) }
            if request.carriesData { try data.withUnsafeBytes { try connection.socket.sendAll($0) } }
            table.pending[nextCookie] = request.command == .read
                ? .readData(into: buffers.buffer(nextCookie, count: Int(request.length))) : .noData
            cookies.append(nextCookie)
        }
        try receive(until: { $0.pending.isEmpty }, &table)
        let results = Dictionary(uniqueKeysWithValues: table.completed.map { ($0.cookie, $0.errno) })
        return cookies.map { ($0, results[$0]!) }
    }

    /// One request; its errno and, for a read, the data.
    mutating func perform(_ block: BlockRequest, data: [UInt8] = []) throws -> (errno: Int32, data: [UInt8]) {
        let (cookie, errno) = try perform([(block, data)])[0]
        return (errno, block.operation == .read ? buffers.bytes(cookie) : [])
    }

    /// DISC, then the server must close the connection between replies.
    mutating func disconnect() throws {
        var header = [UInt8](repeating: 0, count: NBDRequest.headerSize)
        header.withUnsafeMutableBytes { NBDRequest(.disconnect, cookie: 0).encode(into: $0) }
        try header.withUnsafeBytes { try connection.socket.sendAll($0) }
        var table = InFlightTable()
        try receive(until: { _ in false }, &table)
    }

    /// Receives in odd-sized chunks (so replies straddle them) until `done` or the end of stream.
    private mutating func receive(until done: (InFlightTable) -> Bool, _ table: inout InFlightTable) throws {
        var chunk = [UInt8](repeating: 0, count: 1000)
        while !done(table) {
            let count = try chunk.withUnsafeMutableBytes { try connection.socket.receive(into: $0) }
            if count == 0 {
                try parser.endOfStream()
                return
            }
            try chunk.withUnsafeBytes { try parser.feed(UnsafeRawBufferPointer(rebasing: $0[..<count]), to: &table) }
        }
    }
}
