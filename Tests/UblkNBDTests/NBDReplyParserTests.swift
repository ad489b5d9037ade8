import Glibc
import Testing
import UblkNBD

/// A queue's in-flight table as a test sees it: cookies to buffers, completions in order.
final class Buffers {
    var storage: [UInt64: UnsafeMutableRawBufferPointer] = [:]
    func buffer(_ cookie: UInt64, count: Int) -> UnsafeMutableRawBufferPointer {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        storage[cookie] = buffer
        return buffer
    }
    func bytes(_ cookie: UInt64) -> [UInt8] { Array(storage[cookie]!) }
    deinit { storage.values.forEach { $0.deallocate() } }
}

struct InFlightTable: NBDInFlightRequests {
    var pending: [UInt64: NBDExpectedReply] = [:]
    var completed: [(cookie: UInt64, errno: Int32)] = []

    mutating func expectedReply(cookie: UInt64) -> NBDExpectedReply? { pending[cookie] }
    mutating func replyCompleted(cookie: UInt64, errno: Int32) {
        pending[cookie] = nil
        completed.append((cookie, errno))
    }
}

/// The bytes a server sends for one simple reply.
func simpleReply(cookie: UInt64, error: UInt32 = 0, data: [UInt8] = []) -> [UInt8] {
    var header = [UInt8](repeating: 0, count: 16)
    header.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: error, cookie: cookie).encode(into: $0) }
    return header + data
}

@Suite struct NBDReplyParserTests {
    func feed(_ stream: [UInt8], chunk: Int, _ parser: inout NBDReplyParser, _ table: inout InFlightTable) throws {
        var offset = 0
        while offset < stream.count {
            let end = min(offset + chunk, stream.count)
            let slice = Array(stream[offset..<end])
            try slice.withUnsafeBytes { try parser.feed($0, to: &table) }
            offset = end
        }
    }

    @Test(arguments: [1, 2, 3, 7, 16, 17, 1000])
    func outOfOrderRepliesLandInTheirOwnBuffers(chunk: Int) throws {
        let buffers = Buffers()
        var table = InFlightTable()
        let dataA = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let dataC = (0..<512).map { UInt8(truncatingIfNeeded: 255 - $0) }
        table.pending[0xA] = .readData(into: buffers.buffer(0xA, count: 4096))
        table.pending[0xB] = .noData
        table.pending[0xC] = .readData(into: buffers.buffer(0xC, count: 512))
        table.pending[0xD] = .readData(into: buffers.buffer(0xD, count: 512))
        let stream = simpleReply(cookie: 0xC, data: dataC) + simpleReply(cookie: 0xD, error: 5)
            + simpleReply(cookie: 0xB) + simpleReply(cookie: 0xA, data: dataA)
        var parser = NBDReplyParser()
        try feed(stream, chunk: chunk, &parser, &table)
        #expect(table.completed.map(\.cookie) == [0xC, 0xD, 0xB, 0xA])
        #expect(table.completed.map(\.errno) == [0, EIO, 0, 0])
        #expect(buffers.bytes(0xA) == dataA && buffers.bytes(0xC) == dataC)
        #expect(buffers.bytes(0xD).allSatisfy { $0 == 0 }, "a failed read gets no data")
        #expect(table.pending.isEmpty && parser.isBetweenReplies)
        #expect(throws: Never.self) { try parser.endOfStream() }
    }

    @Test func aReadIsNotCompleteUntilItsLastByte() throws {
        let buffers = Buffers()
        var table = InFlightTable()
        table.pending[1] = .readData(into: buffers.buffer(1, count: 8))
        var parser = NBDReplyParser()
        let stream = simpleReply(cookie: 1, data: [1, 2, 3, 4, 5, 6, 7, 8])
        try feed(Array(stream.dropLast()), chunk: 1, &parser, &table)
        #expect(table.completed.isEmpty && !parser.isBetweenReplies)
        #expect(throws: NBDProtocolViolation.truncatedReply(bytesMissing: 1)) { try parser.endOfStream() }
        try feed([8], chunk: 1, &parser, &table)
        #expect(table.completed.map(\.cookie) == [1] && buffers.bytes(1) == [1, 2, 3, 4, 5, 6, 7, 8])
    }

    @Test func dataCanBeReceivedStraightIntoTheRequestBuffer() throws {
        let buffers = Buffers()
        var table = InFlightTable()
        table.pending[9] = .readData(into: buffers.buffer(9, count: 6))
        table.pending[10] = .noData
        var parser = NBDReplyParser()
        #expect(parser.pendingReadData == nil)
        try feed(simpleReply(cookie: 9) + [0x10, 0x11], chunk: 100, &parser, &table)
        let pending = try #require(parser.pendingReadData)
        #expect(pending.count == 4 && pending.baseAddress == buffers.storage[9]!.baseAddress! + 2)
        pending.copyBytes(from: [0x12, 0x13, 0x14, 0x15])
        parser.readDataArrived(4, to: &table)
        #expect(table.completed.map(\.cookie) == [9] && parser.pendingReadData == nil)
        #expect(buffers.bytes(9) == [0x10, 0x11, 0x12, 0x13, 0x14, 0x15])
        try feed(simpleReply(cookie: 10), chunk: 100, &parser, &table)
        #expect(table.completed.map(\.cookie) == [9, 10])
    }

    @Test func zeroLengthReadCompletesAtItsHeader() throws {
        var table = InFlightTable()
        table.pending[4] = .readData(into: UnsafeMutableRawBufferPointer(start: nil, count: 0))
        var parser = NBDReplyParser()
        try feed(simpleReply(cookie: 4), chunk: 16, &parser, &table)
        #expect(table.completed.map(\.cookie) == [4] && parser.isBetweenReplies)
    }

    @Test func badMagicIsAViolation() {
        var table = InFlightTable()
        table.pending[1] = .noData
        var stream = simpleReply(cookie: 1)
        stream[0...3] = [0x66, 0x8E, 0x33, 0xEF] // a structured reply, never negotiated
        var parser = NBDReplyParser()
        #expect(throws: NBDProtocolViolation.badMagic(0x668E_33EF)) { try feed(stream, chunk: 1, &parser, &table) }
        #expect(table.completed.isEmpty)
    }

    @Test func unknownOrRepeatedCookieIsAViolation() throws {
        let buffers = Buffers()
        var table = InFlightTable()
        table.pending[1] = .readData(into: buffers.buffer(1, count: 4))
        var parser = NBDReplyParser()
        #expect(throws: NBDProtocolViolation.unknownCookie(2)) {
            try feed(simpleReply(cookie: 2, data: [9, 9, 9, 9]), chunk: 5, &parser, &table)
        }
        #expect(table.completed.isEmpty && buffers.bytes(1) == [0, 0, 0, 0])

        var fresh = NBDReplyParser()
        try feed(simpleReply(cookie: 1, data: [1, 2, 3, 4]), chunk: 3, &fresh, &table)
        #expect(throws: NBDProtocolViolation.unknownCookie(1)) {
            try feed(simpleReply(cookie: 1, data: [5, 6, 7, 8]), chunk: 3, &fresh, &table)
        }
        #expect(table.completed.count == 1 && buffers.bytes(1) == [1, 2, 3, 4])
    }

    @Test func endOfStreamInsideAHeaderIsAViolation() throws {
        var table = InFlightTable()
        var parser = NBDReplyParser()
        try feed(Array(simpleReply(cookie: 1).prefix(5)), chunk: 1, &parser, &table)
        #expect(throws: NBDProtocolViolation.truncatedReply(bytesMissing: 11)) { try parser.endOfStream() }
    }

    @Test func violationsSayWhatHappened() {
        #expect(NBDProtocolViolation.badMagic(0x668E_33EF).description.contains("0x668e33ef"))
        #expect(NBDProtocolViolation.unknownCookie(42).description.contains("cookie 42"))
    }
}
