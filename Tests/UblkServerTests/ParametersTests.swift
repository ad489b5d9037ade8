import Testing
import UblkControl
import UblkQueue
@testable import UblkServer

/// What SET_PARAMS announces for a target's properties.
@Suite struct ParametersTests {
    @Test func loopLikeTarget() {
        var properties = TargetProperties(size: 256 << 20)
        properties.logicalBlockSize = 4096
        properties.physicalBlockSize = 4096
        properties.supportsDiscard = true
        properties.supportsWriteZeroes = true
        let parameters = DeviceServer.parameters(for: properties, maxIOBytes: 512 * 1024)
        #expect(parameters.sectors == (256 << 20) / 512)
        #expect(parameters.logicalBlockShift == 12 && parameters.physicalBlockShift == 12)
        #expect(parameters.maxSectors == 1024)
        #expect(parameters.volatileCache && parameters.fua && !parameters.readOnly)
        #expect(parameters.discard?.granularity == 4096)
        #expect((parameters.discard?.maxWriteZeroesSectors ?? 0) > 0)
    }

    @Test func readOnlyTargetWithoutHoles() {
        var properties = TargetProperties(size: 1 << 20)
        properties.readOnly = true
        properties.volatileCache = false
        let parameters = DeviceServer.parameters(for: properties, maxIOBytes: 64 * 1024)
        #expect(parameters.readOnly)
        #expect(!parameters.volatileCache && !parameters.fua)
        #expect(parameters.discard == nil)
        #expect(parameters.logicalBlockShift == 9 && parameters.maxSectors == 128)
    }

    /// Write-zeroes without discard (an NBD export with SEND_WRITE_ZEROES but not SEND_TRIM)
    /// is announced alone, and discard alone likewise.
    @Test func writeZeroesAndDiscardAreAnnouncedEachOnItsOwn() {
        var properties = TargetProperties(size: 1 << 20)
        properties.supportsWriteZeroes = true
        let zeroes = DeviceServer.parameters(for: properties, maxIOBytes: 64 * 1024).discard
        #expect(zeroes?.maxDiscardSectors == 0 && zeroes?.maxWriteZeroesSectors == UInt32.max >> 9)
        #expect(zeroes?.granularity == 4096)
        properties.supportsWriteZeroes = false
        properties.supportsDiscard = true
        let discard = DeviceServer.parameters(for: properties, maxIOBytes: 64 * 1024).discard
        #expect(discard?.maxDiscardSectors == UInt32.max >> 9 && discard?.maxWriteZeroesSectors == 0)
    }

    /// Recovery keeps the device: a target that no longer fits it is refused, one that
    /// grew (or is the same) serves it.
    @Test func aRecoveringTargetMustFitTheDevice() {
        let device = DeviceServer.parameters(for: TargetProperties(size: 64 << 20), maxIOBytes: 512 * 1024)
        #expect(DeviceServer.mismatch(TargetProperties(size: 64 << 20), device: device) == nil)
        #expect(DeviceServer.mismatch(TargetProperties(size: 128 << 20), device: device) == nil)
        #expect(DeviceServer.mismatch(TargetProperties(size: 32 << 20), device: device)?.contains("holds") == true)
        var blocks = TargetProperties(size: 64 << 20)
        blocks.logicalBlockSize = 4096
        #expect(DeviceServer.mismatch(blocks, device: device)?.contains("block size") == true)
        var readOnly = TargetProperties(size: 64 << 20)
        readOnly.readOnly = true
        #expect(DeviceServer.mismatch(readOnly, device: device)?.contains("read-only") == true)
    }

    /// An NBD export a recovery finds must keep what the kept device announces: several
    /// connections for several queues, FLUSH under a write cache, FUA, the request size.
    @Test func aRecoveringTargetMustKeepWhatTheDeviceAnnounces() {
        let properties = TargetProperties(size: 64 << 20)
        let device = DeviceServer.parameters(for: properties, maxIOBytes: 512 * 1024)
        #expect(device.volatileCache && device.fua)
        #expect(DeviceServer.mismatch(properties, queueLimit: 1, device: device, queues: 1) == nil)
        #expect(DeviceServer.mismatch(properties, queueLimit: 1, device: device, queues: 4)?.contains("CAN_MULTI_CONN") == true)
        var noFlush = properties
        noFlush.volatileCache = false
        #expect(DeviceServer.mismatch(noFlush, device: device)?.contains("SEND_FLUSH") == true)
        var noFUA = properties
        noFUA.supportsFUA = false
        #expect(DeviceServer.mismatch(noFUA, device: device)?.contains("SEND_FUA") == true)
        var smaller = properties
        smaller.maximumTransferBytes = 256 * 1024
        #expect(DeviceServer.mismatch(smaller, device: device)
            == "it takes requests of 262144 bytes at most, the device sends 524288")
        // A device that announced none of it takes a target that has none of it.
        let plain = DeviceServer.parameters(for: noFlush, maxIOBytes: 256 * 1024)
        #expect(!plain.volatileCache && !plain.fua)
        noFlush.supportsFUA = false
        noFlush.maximumTransferBytes = 256 * 1024
        #expect(DeviceServer.mismatch(noFlush, device: plain) == nil)
        // A read-only device (from before --read-only stopped announcing a cache) flushes nothing.
        var readOnlyDevice = device
        readOnlyDevice.readOnly = true
        var readOnlyTarget = properties
        readOnlyTarget.readOnly = true
        readOnlyTarget.volatileCache = false
        #expect(DeviceServer.mismatch(readOnlyTarget, device: readOnlyDevice) == nil)
    }
}
