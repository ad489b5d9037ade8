/// How ublk command numbers are written into `sqe->cmd_op`.
///
/// The first ublk kernels took bare command numbers (`UBLK_CMD_ADD_DEV = 0x04`);
/// since Linux 6.4 commands are encoded like ioctls (`_IOWR('u', 0x04, struct
/// ublksrv_ctrl_cmd)`), and kernels built without `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES`
/// accept only those.
public enum OpcodeEncoding: String, Sendable, CaseIterable {
    case ioctl
    case legacy
}

/// Which way data moves, in ioctl terms (as `_IOR` / `_IOWR`).
public enum IoctlDirection: UInt32, Sendable {
    case read = 2
    case readWrite = 3
}

/// A ublk command: its number and how its ioctl encoding is built.
public struct UblkOpcode: Sendable, Equatable {
    public var number: UInt32
    public var direction: IoctlDirection
    /// Size of the command struct (`ublksrv_ctrl_cmd` or `ublksrv_io_cmd`).
    public var payloadSize: Int

    public init(number: UInt32, direction: IoctlDirection, payloadSize: Int) {
        self.number = number
        self.direction = direction
        self.payloadSize = payloadSize
    }

    /// The value for `sqe->cmd_op`: `_IOC(dir, 'u', nr, size)` or the bare number.
    public func encoded(_ encoding: OpcodeEncoding) -> UInt32 {
        switch encoding {
        case .legacy:
            return number
        case .ioctl:
            let type = UInt32(UInt8(ascii: "u"))
            return direction.rawValue << 30 | UInt32(payloadSize) << 16 | type << 8 | number
        }
    }
}
