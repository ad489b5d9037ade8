import Glibc
import Testing
@testable import UblkNBD

@Suite struct NBDWireTests {
    @Test func requestHeaderIsBigEndianAndByteExact() {
        let request = NBDRequest(.write, flags: .fua, cookie: 0x0102_0304_0506_0708,
                                 offset: 0x1122_3344_5566_7788, length: 0x99AA_BBCC)
        var bytes = [UInt8](repeating: 0xEE, count: 30)
        bytes.withUnsafeMutableBytes { request.encode(into: $0) }
        #expect(bytes == [0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01,
                          0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
                          0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
                          0x99, 0xAA, 0xBB, 0xCC, 0xEE, 0xEE])
    }

    @Test func commandAndFlagValuesAreTheProtocols() {
        #expect([NBDCommand.read, .write, .disconnect, .flush, .trim, .writeZeroes].map(\.rawValue) == [0, 1, 2, 3, 4, 6])
        #expect(NBDCommandFlags.fua.rawValue == 1 && NBDCommandFlags.noHole.rawValue == 2)
        var bytes = [UInt8](repeating: 0, count: 28)
        bytes.withUnsafeMutableBytes { NBDRequest(.writeZeroes, flags: [.noHole, .fua], cookie: 7, offset: 512, length: 4096).encode(into: $0) }
        #expect(bytes[4..<8] == [0, 3, 0, 6])
        #expect(NBDRequest(.write, cookie: 1).carriesData && !NBDRequest(.read, cookie: 1).carriesData)
        #expect(!NBDRequest(.disconnect, cookie: 0).expectsReply && NBDRequest(.flush, cookie: 0).expectsReply)
    }

    @Test func replyHeaderRoundTrips() {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: 28, cookie: 0xDEAD_BEEF_0000_0001).encode(into: $0) }
        #expect(bytes == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0xDE, 0xAD, 0xBE, 0xEF, 0, 0, 0, 1])
        let decoded = bytes.withUnsafeBytes { NBDSimpleReplyHeader(decoding: $0) }
        #expect(decoded == NBDSimpleReplyHeader(error: 28, cookie: 0xDEAD_BEEF_0000_0001))
        #expect(decoded?.errno == ENOSPC)
        bytes[0] = 0x66
        #expect(bytes.withUnsafeBytes { NBDSimpleReplyHeader(decoding: $0) } == nil)
    }

    @Test func errorNumbersMapToLinuxErrno() {
        let expected: [(UInt32, Int32)] = [(0, 0), (1, EPERM), (5, EIO), (12, ENOMEM), (22, EINVAL), (28, ENOSPC),
                                           (75, EOVERFLOW), (95, ENOTSUP), (108, ESHUTDOWN),
                                           (2, EINVAL), (13, EINVAL), (999, EINVAL), (.max, EINVAL)]
        for (value, errno) in expected {
            #expect(NBDErrorNumber.errno(for: value) == errno, "NBD error \(value)")
        }
    }

    @Test func flagsPrintByName() {
        #expect(NBDTransmissionFlags(rawValue: 0x56d).description
            == "HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN|SEND_CACHE")
        #expect(NBDTransmissionFlags(rawValue: 0x8003).description == "HAS_FLAGS|READ_ONLY|0x8000")
        #expect(NBDTransmissionFlags().description == "none")
    }
}

@Suite struct NBDBlockMappingTests {
    static let everything: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn]

    func export(_ flags: NBDTransmissionFlags, sizes: NBDBlockSizes = .protocolDefault) -> NBDExport {
        NBDExport(name: "disk", size: 1 << 30, flags: flags, blockSizes: sizes)
    }

    @Test func operationsMapToCommands() {
        let full = export(Self.everything)
        #expect(full.request(for: BlockRequest(.read, offset: 4096, length: 8192), cookie: 3)
            == NBDRequest(.read, cookie: 3, offset: 4096, length: 8192))
        #expect(full.request(for: BlockRequest(.write, offset: 512, length: 512), cookie: 4)
            == NBDRequest(.write, cookie: 4, offset: 512, length: 512))
        #expect(full.request(for: BlockRequest(.write, flags: .fua, offset: 512, length: 512), cookie: 4)?.flags == .fua)
        #expect(full.request(for: BlockRequest(.flush, offset: 99, length: 99), cookie: 5) == NBDRequest(.flush, cookie: 5))
        #expect(full.request(for: BlockRequest(.discard, offset: 1 << 20, length: 1 << 20), cookie: 6)
            == NBDRequest(.trim, cookie: 6, offset: 1 << 20, length: 1 << 20))
        #expect(full.request(for: BlockRequest(.writeZeroes, offset: 0, length: 4096), cookie: 7)
            == NBDRequest(.writeZeroes, cookie: 7, offset: 0, length: 4096))
        #expect(full.request(for: BlockRequest(.writeZeroes, flags: .noUnmap, offset: 0, length: 4096), cookie: 7)?.flags == .noHole)
    }

    @Test func fuaNeedsSendFUAAndCommandsNeedTheirFlag() {
        let plain = export([.hasFlags])
        #expect(plain.request(for: BlockRequest(.write, flags: .fua, length: 512), cookie: 1)?.flags == [])
        #expect(plain.request(for: BlockRequest(.flush), cookie: 1) == nil)
        #expect(plain.request(for: BlockRequest(.discard, length: 512), cookie: 1) == nil)
        #expect(plain.request(for: BlockRequest(.writeZeroes, length: 512), cookie: 1) == nil)
        let readOnly = export(Self.everything.union(.readOnly))
        #expect(readOnly.request(for: BlockRequest(.write, length: 512), cookie: 1) == nil)
        #expect(readOnly.request(for: BlockRequest(.read, length: 512), cookie: 1) != nil)
    }

    @Test func capabilitiesFollowTheFlags() throws {
        let full = try export(Self.everything.union(.rotational)).deviceCapabilities()
        #expect(full == NBDDeviceCapabilities(readOnly: false, volatileCache: true, fua: true, discard: true, writeZeroes: true,
                                              rotational: true, logicalBlockSize: 512, physicalBlockSize: 4096,
                                              maximumTransferBytes: 32 << 20, maximumZeroingBytes: UInt32.max - 511))
        let plain = try export([.hasFlags, .sendFUA]).deviceCapabilities()
        #expect(!plain.volatileCache && !plain.fua && !plain.discard && !plain.writeZeroes && !plain.readOnly)
        let readOnly = try export(Self.everything.union(.readOnly)).deviceCapabilities()
        #expect(readOnly.readOnly && !readOnly.volatileCache && !readOnly.discard && !readOnly.writeZeroes)
    }

    @Test func blockSizesShapeTheDevice() throws {
        let qemu = try export(Self.everything, sizes: NBDBlockSizes(minimum: 1, preferred: 4096, maximumPayload: 33_554_432)).deviceCapabilities()
        #expect(qemu.logicalBlockSize == 512 && qemu.physicalBlockSize == 4096 && qemu.maximumTransferBytes == 32 << 20)
        let big = try export(Self.everything, sizes: NBDBlockSizes(minimum: 4096, preferred: 65536, maximumPayload: 1 << 30 | 4096)).deviceCapabilities()
        #expect(big.logicalBlockSize == 4096 && big.physicalBlockSize == 4096 && big.maximumTransferBytes == 32 << 20)
        #expect(big.maximumZeroingBytes == UInt32.max - 4095)
        let small = try export(Self.everything, sizes: NBDBlockSizes(minimum: 512, preferred: 512, maximumPayload: 65536 + 512)).deviceCapabilities()
        #expect(small.maximumTransferBytes == 65536 + 512)
        #expect(throws: NBDError.self) {
            try export(Self.everything, sizes: NBDBlockSizes(minimum: 8192, preferred: 8192, maximumPayload: 1 << 20)).deviceCapabilities()
        }
        // Less than a page per request: ublk's buffers would be none (it rounds down to pages).
        #expect(throws: NBDError.self) {
            try export(Self.everything, sizes: NBDBlockSizes(minimum: 512, preferred: 512, maximumPayload: 2048)).deviceCapabilities()
        }
    }
}
