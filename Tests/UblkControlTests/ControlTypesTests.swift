import CUblk
import Glibc
import Testing
@testable import UblkControl

@Suite struct ControlTypesTests {
    @Test func parametersRoundTrip() {
        var parameters = DeviceParameters(sectors: 524_288, maxSectors: 1024)
        parameters.logicalBlockShift = 12
        parameters.physicalBlockShift = 12
        parameters.readOnly = true
        parameters.discard = .init(granularity: 4096, maxDiscardSectors: 8192, maxWriteZeroesSectors: 8192)
        let raw = parameters.raw
        #expect(raw.len == 120)
        #expect(raw.types == UInt32(UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD))
        #expect(raw.basic.attrs & UInt32(UBLK_ATTR_READ_ONLY) != 0)
        #expect(raw.basic.dev_sectors == 524_288)
        #expect(DeviceParameters(raw: raw) == parameters)
        // Zero copy: the buffers' alignment goes with its own type bit.
        parameters.dmaAlignment = 511
        let aligned = parameters.raw
        #expect(aligned.types & UInt32(UBLK_PARAM_TYPE_DMA_ALIGN) != 0 && aligned.dma.alignment == 511)
        #expect(DeviceParameters(raw: aligned) == parameters)
    }

    @Test func noDiscardWhenUnsupported() {
        let raw = DeviceParameters(sectors: 8, maxSectors: 8).raw
        #expect(raw.types == UInt32(UBLK_PARAM_TYPE_BASIC))
    }

    @Test func deviceInfoRoundTrip() {
        let info = DeviceInfo(id: 7, queueCount: 2, queueDepth: 128, maxIOBufferBytes: 524_288, flags: [.userRecovery])
        let raw = info.raw
        #expect(raw.dev_id == 7 && raw.nr_hw_queues == 2 && raw.queue_depth == 128)
        #expect(DeviceInfo(raw: raw) == info)
        #expect(DeviceInfo(queueCount: 1, queueDepth: 1, maxIOBufferBytes: 4096).raw.dev_id == UInt32.max)
        #expect(info.blockDevicePath == "/dev/ublkb7")
    }

    @Test func featureNames() {
        let flags: FeatureFlags = [.userRecovery, .ioctlEncoding, FeatureFlags(rawValue: 1 << 40)]
        #expect(flags.names == ["USER_RECOVERY", "CMD_IOCTL_ENCODE", "BIT_40"])
    }

    /// 7.3 reports 0x1fffff: every one of bits 0-20 has its uapi name, none a placeholder.
    @Test func everyFeatureUpTo20IsNamed() {
        let names = FeatureFlags(rawValue: 0x1f_ffff).names
        #expect(names.count == 21)
        #expect(!names.contains { $0.hasPrefix("BIT_") })
        #expect(names[10] == "UPDATE_SIZE" && names[11] == "AUTO_BUF_REG" && names[12] == "QUIESCE")
        #expect(names[15] == "BATCH_IO" && names[17] == "SAFE_STOP_DEV" && names[20] == "IO_DESC_SIZE")
    }

    @Test func commandsFollowTheirFeatureBits() {
        let old: FeatureFlags = [.ioctlEncoding, .userRecovery]
        #expect(ControlCommand.updateSize.isAccepted(features: old) == false)
        #expect(ControlCommand.updateSize.isAccepted(features: [.updateSize]) == true)
        #expect(ControlCommand.startUserRecovery.isAccepted(features: old) == true)
        #expect(ControlCommand.getFeatures.isAccepted(features: nil) == false)
        #expect(ControlCommand.deleteDeviceAsync.isAccepted(features: old) == nil)
        #expect(IOCommandCatalog.accepted(features: old) == ["FETCH_REQ", "COMMIT_AND_FETCH_REQ"])
        #expect(IOCommandCatalog.accepted(features: [.batchIO]).contains("FETCH_IO_CMDS"))
    }

    @Test func errorsSayWhatToDo() {
        #expect(ControlError(command: .addDevice, deviceID: 3, errno: -EEXIST).description.contains("already in use"))
        #expect(ControlError(command: .getDeviceInfo, deviceID: 9, errno: ENODEV).description == "ublk device 9 does not exist: see `ublk list`")
        #expect(ControlDeviceError.driverNotLoaded.description == "ublk_drv is not loaded: run modprobe ublk_drv")
    }

    @Test func missingControlDeviceMeansDriverNotLoaded() {
        #expect(throws: ControlDeviceError.driverNotLoaded) {
            _ = try ControlDevice(path: "/nonexistent/ublk-control")
        }
    }

    @Test func opcodesMatchTheHeader() {
        #expect(ControlCommand.addDevice.opcode.encoded(.ioctl) == 0xc020_7504)
        #expect(ControlCommand.getFeatures.opcode.encoded(.ioctl) == 0x8020_7513)
        #expect(ControlCommand.stopDevice.opcode.encoded(.legacy) == 0x07)
        // Numbers from the notes on the 7.x header.
        #expect(ControlCommand.deleteDeviceAsync.opcode.encoded(.ioctl) == 0x8020_7514)
        #expect(ControlCommand.updateSize.opcode.encoded(.ioctl) == 0xc020_7515)
        #expect(ControlCommand.quiesceDevice.opcode.encoded(.ioctl) == 0xc020_7516)
        #expect(ControlCommand.tryStopDevice.opcode.encoded(.ioctl) == 0xc020_7517)
    }
}
