import Glibc
import Testing
@testable import UblkNBD

/// A server that plays back a script: what it sends, and a record of what the client sent.
final class ScriptedServer: NBDByteStream {
    var toClient: [UInt8]
    var fromClient: [UInt8] = []
    init(_ script: [UInt8]) { toClient = script }

    func sendAll(_ bytes: UnsafeRawBufferPointer) throws { fromClient += bytes }
    func receiveAll(into buffer: UnsafeMutableRawBufferPointer) throws -> Bool {
        guard toClient.count >= buffer.count else { toClient = []; return false }
        buffer.copyBytes(from: toClient.prefix(buffer.count))
        toClient.removeFirst(buffer.count)
        return true
    }
}

@Suite struct NBDHandshakeTests {
    static let address = NBDAddress(endpoint: .tcp(host: "127.0.0.1", port: 10809), exportName: "disk")

    static func greeting(flags: UInt16 = 3) -> [UInt8] {
        ByteWriter().u64(NBDHandshake.greetingMagic).u64(NBDHandshake.optionMagic).u16(flags).bytes
    }

    static func optionReply(_ option: UInt32 = 7, type: UInt32, _ data: [UInt8] = []) -> [UInt8] {
        ByteWriter().u64(NBDHandshake.optionReplyMagic).u32(option).u32(type).u32(UInt32(data.count)).raw(data).bytes
    }

    static func exportInfo(size: UInt64, flags: UInt16) -> [UInt8] {
        optionReply(type: 3, ByteWriter().u16(0).u64(size).u16(flags).bytes)
    }

    static let ack = optionReply(type: 1)

    func negotiate(_ script: [UInt8], address: NBDAddress = address) throws(NBDError) -> (NBDExport, ScriptedServer) {
        let server = ScriptedServer(script)
        return (try NBDHandshake(address: address).negotiate(over: server), server)
    }

    @Test func goTakesSizeFlagsAndBlockSizes() throws {
        let blockSize = Self.optionReply(type: 3, ByteWriter().u16(3).u32(512).u32(4096).u32(1 << 21).bytes)
        let name = Self.optionReply(type: 3, ByteWriter().u16(1).raw(Array("disk".utf8)).bytes)
        let (export, server) = try negotiate(Self.greeting() + name + Self.exportInfo(size: 1 << 30, flags: 0x16d)
            + blockSize + Self.ack)
        #expect(export == NBDExport(name: "disk", size: 1 << 30, flags: NBDTransmissionFlags(rawValue: 0x16d),
                                    blockSizes: NBDBlockSizes(minimum: 512, preferred: 4096, maximumPayload: 1 << 21),
                                    serverSentBlockSizes: true, negotiation: .go))
        let expected = ByteWriter().u32(3).u64(NBDHandshake.optionMagic).u32(7).u32(4 + 4 + 2 + 4)
            .u32(4).raw(Array("disk".utf8)).u16(2).u16(3).u16(0).bytes
        #expect(server.fromClient == expected)
        #expect(server.toClient.isEmpty)
    }

    @Test func withoutBlockSizeInfoTheProtocolDefaultsHold() throws {
        let (export, server) = try negotiate(Self.greeting(flags: 1) + Self.exportInfo(size: 4096, flags: 0x56d) + Self.ack)
        #expect(export.blockSizes == .protocolDefault && !export.serverSentBlockSizes)
        #expect(export.allowsMultipleConnections)
        #expect(server.fromClient.prefix(4) == [0, 0, 0, 1], "NO_ZEROES only when offered")
    }

    @Test func unsupportedGoFallsBackToExportName() throws {
        let reply = ByteWriter().u64(1 << 20).u16(0x3).bytes + [UInt8](repeating: 0, count: 124)
        let (export, server) = try negotiate(Self.greeting(flags: 1) + Self.optionReply(type: 1 << 31 | 1) + reply)
        #expect(export == NBDExport(name: "disk", size: 1 << 20, flags: [.hasFlags, .readOnly], negotiation: .exportName))
        let exportName = ByteWriter().u64(NBDHandshake.optionMagic).u32(1).u32(4).raw(Array("disk".utf8)).bytes
        #expect(server.fromClient.suffix(exportName.count) == exportName[...])
        #expect(server.toClient.isEmpty)
    }

    @Test func aServerWithoutFixedNewstyleGetsExportNameOnly() throws {
        let (export, server) = try negotiate(Self.greeting(flags: 2) + ByteWriter().u64(512).u16(1).bytes)
        #expect(export.size == 512 && export.negotiation == .exportName)
        #expect(server.fromClient == ByteWriter().u32(2).u64(NBDHandshake.optionMagic).u32(1).u32(4).raw(Array("disk".utf8)).bytes)
    }

    @Test func exportNameHangUpMeansNotFound() {
        #expect(throws: NBDError(.exportNotFound, "export disk not found on 127.0.0.1:10809 (the server hung up): "
            + "check the name (nbdinfo --list nbd://127.0.0.1:10809)")) {
            try negotiate(Self.greeting(flags: 3) + Self.optionReply(type: 1 << 31 | 1))
        }
    }

    @Test func unknownExportIsOneLine() {
        #expect(throws: NBDError(.exportNotFound, "export disk not found on 127.0.0.1:10809: "
            + "check the name (nbdinfo --list nbd://127.0.0.1:10809)")) {
            try negotiate(Self.greeting() + Self.optionReply(type: 1 << 31 | 6, Array("no such export".utf8)))
        }
        let unnamed = NBDAddress(endpoint: .unix(path: "/run/s"), exportName: "")
        #expect(throws: NBDError(.exportNotFound, "export \"\" (the default export) not found on /run/s: "
            + "check the name (nbdinfo --list 'nbd+unix:///?socket=/run/s')")) {
            try negotiate(Self.greeting() + Self.optionReply(type: 1 << 31 | 6), address: unnamed)
        }
    }

    /// A size past Int64.max (no block device addresses it) is refused, by GO or EXPORT_NAME.
    @Test func aSizeBeyondAnyBlockDeviceIsRefused() {
        let huge = UInt64.max - 511
        let message = "NBD server 127.0.0.1:10809 claims \(huge) bytes for export disk, more than a block device "
            + "can address: check the server"
        #expect(throws: NBDError(.unusable, message)) {
            try negotiate(Self.greeting() + Self.exportInfo(size: huge, flags: 1) + Self.ack)
        }
        #expect(throws: NBDError(.unusable, message)) {
            try negotiate(Self.greeting(flags: 2) + ByteWriter().u64(huge).u16(1).bytes)
        }
        #expect(throws: Never.self) {
            try negotiate(Self.greeting() + Self.exportInfo(size: UInt64(Int64.max) / 512 * 512, flags: 1) + Self.ack)
        }
    }

    @Test func aRefusedGoIsFollowedByAbort() {
        let server = ScriptedServer(Self.greeting() + Self.optionReply(type: 1 << 31 | 6))
        #expect(throws: NBDError.self) { try NBDHandshake(address: Self.address).negotiate(over: server) }
        #expect(server.fromClient.suffix(16) == ByteWriter().u64(NBDHandshake.optionMagic).u32(2).u32(0).bytes[...])
    }

    @Test func refusalsAreOneLineEach() {
        #expect(throws: NBDError(.refused, "NBD server 127.0.0.1:10809 refuses export disk by policy "
            + "(the server says: not you go away): check its access rules for this client")) {
            try negotiate(Self.greeting() + Self.optionReply(type: 1 << 31 | 2, Array("not you\ngo away".utf8)))
        }
        #expect(throws: NBDError(.tlsNotSupported, "NBD server 127.0.0.1:10809 requires TLS, which is not supported yet: "
            + "serve the export without TLS")) {
            try negotiate(Self.greeting() + Self.optionReply(type: 1 << 31 | 5))
        }
        #expect(throws: NBDError(.refused, "NBD server 127.0.0.1:10809 refuses export disk: NBD_REP_ERR_SHUTDOWN")) {
            try negotiate(Self.greeting() + Self.optionReply(type: 1 << 31 | 7))
        }
        #expect(throws: NBDError(.refused, "NBD server 127.0.0.1:10809 refuses export disk: error 77")) {
            try negotiate(Self.greeting() + Self.optionReply(type: 1 << 31 | 77))
        }
    }

    static let violations: [([UInt8], String)] = [
        (ByteWriter().u64(0x1234).u64(NBDHandshake.optionMagic).u16(1).bytes, "NBDMAGIC"),
        (greeting() + optionReply(2, type: 1), "names another option"),
        (greeting() + optionReply(type: 2), "option reply type 2"),
        (greeting() + ack, "without the export's size"),
        (greeting() + optionReply(type: 3, [0, 0, 1]), "short info reply"),
        (greeting() + optionReply(type: 3, [0]), "without a type"),
        (greeting() + ByteWriter().u64(NBDHandshake.optionReplyMagic).u32(7).u32(3).u32(1 << 20).bytes, "claims 1048576 bytes"),
        (greeting() + exportInfo(size: 1, flags: 1) + optionReply(type: 3, ByteWriter().u16(3).u32(3).u32(4096).u32(1 << 20).bytes)
            + ack, "block sizes 3/4096/1048576"),
        (greeting() + exportInfo(size: 1 << 30, flags: 1) + optionReply(type: 3, ByteWriter().u16(3).u32(512).u32(4096).u32(1024).bytes)
            + ack, "block sizes 512/4096/1024"),
        (greeting() + (0...32).flatMap { _ in optionReply(type: 3, [0, 99]) } + exportInfo(size: 1, flags: 1) + ack,
         "more than 32 info replies"),
    ]

    @Test(arguments: violations)
    func protocolViolationsAreRefused(script: [UInt8], problem: String) {
        do {
            _ = try negotiate(script)
            Issue.record("handshake succeeded")
        } catch {
            #expect(error.kind == .protocolViolation)
            #expect(error.message.hasPrefix("NBD server 127.0.0.1:10809 broke the handshake protocol: "))
            #expect(error.message.contains(problem), "\(error.message)")
        }
    }

    @Test func oldstyleAndHangUpsAreNamed() {
        let oldstyle = ByteWriter().u64(NBDHandshake.greetingMagic).u64(NBDHandshake.oldstyleMagic).u16(0).bytes
        #expect(throws: NBDError(.refused, "NBD server 127.0.0.1:10809 speaks the old-style handshake, which is not "
            + "supported: run it with newstyle exports")) { try negotiate(oldstyle) }
        #expect(throws: NBDError(.closed, "NBD server 127.0.0.1:10809 closed the connection during the handshake")) {
            try negotiate(Array(Self.greeting().prefix(10)))
        }
        #expect(throws: NBDError(.closed, "NBD server 127.0.0.1:10809 closed the connection during the handshake")) {
            try negotiate(Self.greeting() + Self.exportInfo(size: 1, flags: 1))
        }
    }
}
