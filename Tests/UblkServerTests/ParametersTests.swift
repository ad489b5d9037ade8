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
}
