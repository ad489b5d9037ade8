import CUblk
import Testing
@testable import UblkSystem

/// The uapi structs must match the kernel's layout byte for byte (include/uapi/linux/ublk_cmd.h).
@Suite struct UAPILayoutTests {
    @Test func structSizes() {
        #expect(MemoryLayout<ublksrv_ctrl_cmd>.size == 32)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.size == 64)
        #expect(MemoryLayout<ublksrv_io_desc>.size == 24)
        #expect(MemoryLayout<ublksrv_io_cmd>.size == 16)
        #expect(MemoryLayout<ublk_param_basic>.size == 32)
        #expect(MemoryLayout<ublk_param_discard>.size == 20)
        #expect(MemoryLayout<ublk_param_devt>.size == 16)
        #expect(MemoryLayout<ublk_param_zoned>.size == 32)
        #expect(MemoryLayout<ublk_params>.size == 120)
        #expect(MemoryLayout<ublk_batch_io>.size == 16)
        #expect(MemoryLayout<ublk_elem_header>.size == 8)
    }

    @Test func batchCommandOffsets() {
        #expect(MemoryLayout<ublk_batch_io>.offset(of: \.flags) == 2)
        #expect(MemoryLayout<ublk_batch_io>.offset(of: \.nr_elem) == 4)
        #expect(MemoryLayout<ublk_batch_io>.offset(of: \.elem_bytes) == 6)
        #expect(MemoryLayout<ublk_elem_header>.offset(of: \.buf_index) == 2)
        #expect(MemoryLayout<ublk_elem_header>.offset(of: \.result) == 4)
    }

    @Test func controlCommandOffsets() {
        #expect(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.dev_id) == 0)
        #expect(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.queue_id) == 4)
        #expect(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.len) == 6)
        #expect(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.addr) == 8)
        #expect(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.data) == 16)
        #expect(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.dev_path_len) == 24)
    }

    @Test func deviceInfoOffsets() {
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.nr_hw_queues) == 0)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.queue_depth) == 2)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.state) == 4)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.max_io_buf_bytes) == 8)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.dev_id) == 12)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.ublksrv_pid) == 16)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.flags) == 24)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.ublksrv_flags) == 32)
        #expect(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.owner_uid) == 40)
    }

    @Test func ioStructOffsets() {
        #expect(MemoryLayout<ublksrv_io_desc>.offset(of: \.op_flags) == 0)
        #expect(MemoryLayout<ublksrv_io_desc>.offset(of: \.nr_sectors) == 4)
        #expect(MemoryLayout<ublksrv_io_desc>.offset(of: \.start_sector) == 8)
        #expect(MemoryLayout<ublksrv_io_desc>.offset(of: \.addr) == 16)
        #expect(MemoryLayout<ublksrv_io_cmd>.offset(of: \.q_id) == 0)
        #expect(MemoryLayout<ublksrv_io_cmd>.offset(of: \.tag) == 2)
        #expect(MemoryLayout<ublksrv_io_cmd>.offset(of: \.result) == 4)
        #expect(MemoryLayout<ublksrv_io_cmd>.offset(of: \.addr) == 8)
    }

    @Test func paramsOffsets() {
        #expect(MemoryLayout<ublk_params>.offset(of: \.basic) == 8)
        #expect(MemoryLayout<ublk_params>.offset(of: \.discard) == 40)
        #expect(MemoryLayout<ublk_params>.offset(of: \.devt) == 60)
        #expect(MemoryLayout<ublk_params>.offset(of: \.zoned) == 76)
        #expect(MemoryLayout<ublk_params>.offset(of: \.dma) == 108)
        #expect(MemoryLayout<ublk_param_basic>.offset(of: \.max_sectors) == 8)
        #expect(MemoryLayout<ublk_param_basic>.offset(of: \.dev_sectors) == 16)
    }

    @Test func ioctlEncodedOpcodes() {
        let ctrl = MemoryLayout<ublksrv_ctrl_cmd>.size
        let io = MemoryLayout<ublksrv_io_cmd>.size
        // _IOWR('u', 0x04, struct ublksrv_ctrl_cmd) and _IOWR('u', 0x20, struct ublksrv_io_cmd)
        #expect(UblkOpcode(number: 0x04, direction: .readWrite, payloadSize: ctrl).encoded(.ioctl) == 0xc020_7504)
        #expect(UblkOpcode(number: 0x20, direction: .readWrite, payloadSize: io).encoded(.ioctl) == 0xc010_7520)
        // _IOR('u', 0x02, struct ublksrv_ctrl_cmd)
        #expect(UblkOpcode(number: 0x02, direction: .read, payloadSize: ctrl).encoded(.ioctl) == 0x8020_7502)
        #expect(UblkOpcode(number: 0x04, direction: .readWrite, payloadSize: ctrl).encoded(.legacy) == 0x04)
    }
}
