import CUblk
import Glibc
import Testing
@testable import UblkQueue

/// Descriptors come from kernel memory; the runtime refuses any that would reach
/// outside the device or the tag's buffer (a forged or corrupted descriptor).
@Suite struct DescriptorTests {
    let limits = DeviceLimits(sectors: 2048, maxIOBytes: 64 * 1024)

    func raw(op: Int, flags: UInt32 = 0, start: UInt64, count: UInt32) -> ublksrv_io_desc {
        var raw = ublksrv_io_desc()
        raw.op_flags = UInt32(op) | flags
        raw.start_sector = start
        raw.nr_sectors = count
        raw.addr = 0xdead_beef
        return raw
    }

    @Test func decodesOperationAndFlags() {
        let d = IODescriptor(raw: raw(op: Int(UBLK_IO_OP_WRITE), flags: UBLK_IO_F_FUA, start: 10, count: 8))
        #expect(d.operation == .write)
        #expect(d.flags.contains(.fua))
        #expect(d.byteOffset == 5120 && d.byteCount == 4096)
        #expect(IODescriptor(raw: raw(op: Int(UBLK_IO_OP_WRITE_ZEROES), flags: UBLK_IO_F_NOUNMAP, start: 0, count: 1)).flags.contains(.noUnmap))
        #expect(IODescriptor(raw: raw(op: Int(UBLK_IO_OP_ZONE_APPEND), start: 0, count: 1)).operation == .unsupported(13))
    }

    @Test func acceptsRequestsInsideTheDevice() {
        let d = IODescriptor(raw: raw(op: Int(UBLK_IO_OP_READ), start: 2048 - 128, count: 128))
        #expect((try? d.validated(for: limits).get()) == d)
        let flush = IODescriptor(raw: raw(op: Int(UBLK_IO_OP_FLUSH), start: 0, count: 0))
        #expect((try? flush.validated(for: limits).get()) == flush)
    }

    @Test func refusesForgedDescriptors() {
        let forged: [(ublksrv_io_desc, DescriptorError)] = [
            (raw(op: Int(UBLK_IO_OP_READ), start: 2048, count: 1), .beyondDevice(start: 2048, count: 1, deviceSectors: 2048)),
            (raw(op: Int(UBLK_IO_OP_WRITE), start: 2000, count: 64), .beyondDevice(start: 2000, count: 64, deviceSectors: 2048)),
            (raw(op: Int(UBLK_IO_OP_WRITE), start: UInt64.max - 2, count: 8), .beyondDevice(start: UInt64.max - 2, count: 8, deviceSectors: 2048)),
            (raw(op: Int(UBLK_IO_OP_READ), start: 0, count: 129), .longerThanBuffer(bytes: 129 * 512, buffer: 65536)),
            (raw(op: Int(UBLK_IO_OP_READ), start: 0, count: 0), .emptyTransfer),
            (raw(op: Int(UBLK_IO_OP_DISCARD), start: 1, count: 2048), .beyondDevice(start: 1, count: 2048, deviceSectors: 2048)),
            (raw(op: Int(UBLK_IO_OP_WRITE_ZEROES), start: 4096, count: 8), .beyondDevice(start: 4096, count: 8, deviceSectors: 2048)),
            (raw(op: 0x7f, start: 0, count: 1), .unsupported(0x7f)),
        ]
        for (descriptor, expected) in forged {
            let result = IODescriptor(raw: descriptor).validated(for: limits)
            guard case .failure(let error) = result else {
                Issue.record("accepted forged descriptor \(descriptor)")
                continue
            }
            #expect(error == expected)
        }
    }

    @Test func largeDiscardNeedsNoBuffer() {
        let d = IODescriptor(raw: raw(op: Int(UBLK_IO_OP_DISCARD), start: 0, count: 2048))
        #expect((try? d.validated(for: limits).get()) == d)
    }

    @Test func descriptorArraysAreSpacedByTheDeepestQueue() {
        #expect(DescriptorArray.offset(queueID: 0) == 0)
        #expect(DescriptorArray.offset(queueID: 1) == 4096 * 24)
        #expect(DescriptorArray.offset(queueID: 3) == 3 * 4096 * 24)
    }
}
