import CUblk
import Glibc
import UblkSystem

/// The commands `/dev/ublk-control` accepts.
public enum ControlCommand: String, Sendable, CaseIterable {
    case getQueueAffinity = "GET_QUEUE_AFFINITY"
    case getDeviceInfo = "GET_DEV_INFO"
    case addDevice = "ADD_DEV"
    case deleteDevice = "DEL_DEV"
    case startDevice = "START_DEV"
    case stopDevice = "STOP_DEV"
    case setParameters = "SET_PARAMS"
    case getParameters = "GET_PARAMS"
    case startUserRecovery = "START_USER_RECOVERY"
    case endUserRecovery = "END_USER_RECOVERY"
    case getFeatures = "GET_FEATURES"
    case deleteDeviceAsync = "DEL_DEV_ASYNC"
    case updateSize = "UPDATE_SIZE"
    case quiesceDevice = "QUIESCE_DEV"
    case tryStopDevice = "TRY_STOP_DEV"

    /// What tells that the kernel takes this command. Newer commands each come with a
    /// feature bit; GET_FEATURES answers for itself; DEL_DEV_ASYNC (6.9) has no bit, so it
    /// is tried and DEL_DEV used where it is refused.
    public enum Requirement: Sendable, Equatable {
        case always
        case getFeatures
        case feature(FeatureFlags)
        case unflagged
    }

    public var requirement: Requirement {
        switch self {
        case .startUserRecovery, .endUserRecovery: .feature(.userRecovery)
        case .getFeatures: .getFeatures
        case .deleteDeviceAsync: .unflagged
        case .updateSize: .feature(.updateSize)
        case .quiesceDevice: .feature(.quiesce)
        case .tryStopDevice: .feature(.safeStop)
        default: .always
        }
    }

    /// Whether a kernel reporting `features` (nil: no GET_FEATURES) takes this command;
    /// nil for a command that no feature bit announces.
    public func isAccepted(features: FeatureFlags?) -> Bool? {
        switch requirement {
        case .always: true
        case .getFeatures: features != nil
        case .feature(let flag): features?.contains(flag) ?? false
        case .unflagged: nil
        }
    }

    /// The command's number and ioctl direction, as in `ublk_cmd.h`.
    public var opcode: UblkOpcode {
        let (number, direction): (Int, IoctlDirection) = switch self {
        case .getQueueAffinity: (UBLK_CMD_GET_QUEUE_AFFINITY, .read)
        case .getDeviceInfo: (UBLK_CMD_GET_DEV_INFO, .read)
        case .addDevice: (UBLK_CMD_ADD_DEV, .readWrite)
        case .deleteDevice: (UBLK_CMD_DEL_DEV, .readWrite)
        case .startDevice: (UBLK_CMD_START_DEV, .readWrite)
        case .stopDevice: (UBLK_CMD_STOP_DEV, .readWrite)
        case .setParameters: (UBLK_CMD_SET_PARAMS, .readWrite)
        case .getParameters: (UBLK_CMD_GET_PARAMS, .read)
        case .startUserRecovery: (UBLK_CMD_START_USER_RECOVERY, .readWrite)
        case .endUserRecovery: (UBLK_CMD_END_USER_RECOVERY, .readWrite)
        case .getFeatures: (UBLK_CMD_GET_FEATURES, .read)
        case .deleteDeviceAsync: (UBLK_CMD_DEL_DEV_ASYNC, .read)
        case .updateSize: (UBLK_CMD_UPDATE_SIZE, .readWrite)
        case .quiesceDevice: (UBLK_CMD_QUIESCE_DEV, .readWrite)
        case .tryStopDevice: (UBLK_CMD_TRY_STOP_DEV, .readWrite)
        }
        return UblkOpcode(number: UInt32(number), direction: direction,
                          payloadSize: MemoryLayout<ublksrv_ctrl_cmd>.size)
    }
}

/// The I/O commands (sent to /dev/ublkcN) by name, with the feature that brings each:
/// for `ublk features`.
public enum IOCommandCatalog {
    public static let commands: [(name: String, feature: FeatureFlags?)] = [
        ("FETCH_REQ", nil), ("COMMIT_AND_FETCH_REQ", nil), ("NEED_GET_DATA", .needGetData),
        ("REGISTER_IO_BUF", .zeroCopy), ("UNREGISTER_IO_BUF", .zeroCopy),
        ("PREP_IO_CMDS", .batchIO), ("COMMIT_IO_CMDS", .batchIO), ("FETCH_IO_CMDS", .batchIO),
    ]

    /// The I/O commands a kernel reporting `features` takes.
    public static func accepted(features: FeatureFlags?) -> [String] {
        commands.filter { $0.feature.map { features?.contains($0) ?? false } ?? true }.map(\.name)
    }
}

/// A control command the kernel refused.
public struct ControlError: Error, Equatable, CustomStringConvertible, Sendable {
    public var command: ControlCommand
    /// The device the command was for, if any.
    public var deviceID: UInt32?
    /// Positive errno.
    public var errno: Int32

    public init(command: ControlCommand, deviceID: UInt32?, errno: Int32) {
        self.command = command
        self.deviceID = deviceID
        self.errno = errno < 0 ? -errno : errno
    }

    /// The device is gone (ENODEV, or ENOENT from older kernels).
    public var isNoSuchDevice: Bool { errno == ENODEV || errno == ENOENT }

    public var description: String {
        let target = deviceID.map { " for device \($0)" } ?? ""
        let reason = SystemError("", errno: errno).reason
        if errno == ENODEV || errno == ENOENT, command != .addDevice, let id = deviceID {
            return "ublk device \(id) does not exist: see `ublk list`"
        }
        switch (command, errno) {
        case (.addDevice, EEXIST):
            return "device id \(deviceID.map(String.init) ?? "?") is already in use: pick another --id or leave it out"
        case (_, EPERM), (_, EACCES):
            return "UBLK_CMD_\(command.rawValue)\(target): permission denied: run as root"
        default:
            return "UBLK_CMD_\(command.rawValue)\(target) failed: \(reason)"
        }
    }
}
