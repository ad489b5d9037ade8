import CUblk
import Glibc
import Testing
@testable import UblkQueue

/// More forged and corrupted descriptors: exact boundaries, arithmetic overflow, junk
/// in the flag bits, every opcode byte, and a seeded fuzz run checking that whatever
/// `validated(for:)` accepts stays inside the device and the tag's buffer.
@Suite struct ForgedDescriptorTests {
    let limits = DeviceLimits(sectors: 2048, maxIOBytes: 64 * 1024)

    func raw(op: UInt32, start: UInt64, count: UInt32) -> ublksrv_io_desc {
        var raw = ublksrv_io_desc()
        raw.op_flags = op
        raw.start_sector = start
        raw.nr_sectors = count
        raw.addr = 0xdead_beef
        return raw
    }

    func verdict(_ op: UInt32, _ start: UInt64, _ count: UInt32) -> Result<IODescriptor, DescriptorError> {
        IODescriptor(raw: raw(op: op, start: start, count: count)).validated(for: limits)
    }

    @Test func exactBoundariesAreAcceptedOneMoreIsNot() {
        let read = UInt32(UBLK_IO_OP_READ), write = UInt32(UBLK_IO_OP_WRITE)
        // The last sector, and a whole buffer ending exactly at the device's end.
        #expect((try? verdict(read, 2047, 1).get()) != nil)
        #expect((try? verdict(write, 2048 - 128, 128).get()) != nil)
        // One sector further, one sector longer than the buffer.
        #expect(verdict(read, 2047, 2) == .failure(.beyondDevice(start: 2047, count: 2, deviceSectors: 2048)))
        #expect(verdict(write, 0, 129) == .failure(.longerThanBuffer(bytes: 129 * 512, buffer: 64 * 1024)))
        #expect(verdict(read, 2048, 0) == .failure(.emptyTransfer))
        #expect(verdict(read, 2049, 0) == .failure(.beyondDevice(start: 2049, count: 0, deviceSectors: 2048)))
    }

    @Test func sectorArithmeticCannotWrap() {
        let write = UInt32(UBLK_IO_OP_WRITE)
        for (start, count) in [(UInt64.max, UInt32(1)), (UInt64.max - 7, UInt32(8)), (UInt64.max, UInt32.max),
                               (UInt64(1) << 55, UInt32(8)), (UInt64(1) << 63, UInt32(1)), (0, UInt32.max)] {
            let result = verdict(write, start, count)
            guard case .failure(let error) = result else {
                Issue.record("accepted a write of sectors \(start)+\(count)")
                continue
            }
            #expect(error.errno == EIO)
        }
        // Discard and write-zeroes use no buffer, but the range is still checked.
        #expect(verdict(UInt32(UBLK_IO_OP_DISCARD), UInt64.max, 2).isFailure)
        #expect(verdict(UInt32(UBLK_IO_OP_WRITE_ZEROES), 1, UInt32.max).isFailure)
    }

    @Test func flagBitsDoNotChangeTheOperation() {
        let junk: UInt32 = 0xffff_ff00
        let read = verdict(UInt32(UBLK_IO_OP_READ) | junk, 8, 8)
        #expect((try? read.get())?.operation == .read)
        #expect((try? read.get())?.flags.contains(.fua) == true)
        // A FLUSH's range is junk: it is dropped, whatever it says.
        let flush = verdict(UInt32(UBLK_IO_OP_FLUSH) | UBLK_IO_F_FUA, UInt64.max, UInt32.max)
        #expect((try? flush.get()) == IODescriptor(operation: .flush, flags: .fua, startSector: 0, sectorCount: 0))
    }

    @Test func everyOpcodeByteIsDecodedOrRefused() {
        let known: [UInt32: IOOperation] = [
            UInt32(UBLK_IO_OP_READ): .read, UInt32(UBLK_IO_OP_WRITE): .write, UInt32(UBLK_IO_OP_FLUSH): .flush,
            UInt32(UBLK_IO_OP_DISCARD): .discard, UInt32(UBLK_IO_OP_WRITE_ZEROES): .writeZeroes,
        ]
        for op in UInt32(0)...255 {
            let result = verdict(op, 0, 8)
            if let operation = known[op] {
                #expect((try? result.get())?.operation == operation, "opcode \(op)")
            } else {
                #expect(result == .failure(.unsupported(UInt8(op))), "opcode \(op)")
                if case .failure(let error) = result { #expect(error.errno == EOPNOTSUPP) }
            }
        }
    }

    /// A deterministic generator (SplitMix64), so a failure can be replayed.
    struct SplitMix: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9e37_79b9_7f4a_7c15
            var z = state
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
    }

    @Test func fuzzedDescriptorsStayInsideTheDeviceAndTheBuffer() {
        var random = SplitMix(state: 0x75626c6b)
        let interesting: [UInt64] = [0, 1, 2047, 2048, 2049, 1 << 32, 1 << 54, 1 << 55, UInt64.max - 1, UInt64.max]
        var accepted = 0
        for _ in 0..<20_000 {
            let op = UInt32.random(in: 0...7, using: &random) | (UInt32.random(in: 0...UInt32.max, using: &random) & 0xffff_ff00)
            let start = Bool.random(using: &random) ? interesting.randomElement(using: &random)! : UInt64.random(in: 0...2100, using: &random)
            let count = Bool.random(using: &random) ? UInt32.random(in: 0...200, using: &random) : UInt32.random(in: 0...UInt32.max, using: &random)
            guard case .success(let d) = verdict(op, start, count) else { continue }
            accepted += 1
            if d.operation == .flush {
                #expect(d.startSector == 0 && d.sectorCount == 0)
                continue
            }
            #expect(d.startSector + UInt64(d.sectorCount) <= limits.sectors, "accepted \(d)")
            #expect(d.byteOffset >= 0 && d.byteOffset + Int64(d.byteCount) <= Int64(limits.sectors) * 512, "accepted \(d)")
            if d.operation.usesBuffer { #expect(d.byteCount > 0 && d.byteCount <= limits.maxIOBytes, "accepted \(d)") }
        }
        #expect(accepted > 1000) // the run did exercise the accepting side too
    }
}

extension Result {
    var isFailure: Bool { if case .failure = self { true } else { false } }
}
