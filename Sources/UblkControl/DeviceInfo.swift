import CUblk

/// ublk feature flags (`UBLK_F_*`), as GET_FEATURES reports them and ADD_DEV takes them.
public struct FeatureFlags: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let zeroCopy = FeatureFlags(rawValue: UBLK_F_SUPPORT_ZERO_COPY)
    public static let commandCompletionInTask = FeatureFlags(rawValue: UBLK_F_URING_CMD_COMP_IN_TASK)
    public static let needGetData = FeatureFlags(rawValue: UBLK_F_NEED_GET_DATA)
    public static let userRecovery = FeatureFlags(rawValue: UBLK_F_USER_RECOVERY)
    public static let userRecoveryReissue = FeatureFlags(rawValue: UBLK_F_USER_RECOVERY_REISSUE)
    public static let unprivileged = FeatureFlags(rawValue: UBLK_F_UNPRIVILEGED_DEV)
    public static let ioctlEncoding = FeatureFlags(rawValue: UBLK_F_CMD_IOCTL_ENCODE)
    public static let userCopy = FeatureFlags(rawValue: UBLK_F_USER_COPY)
    public static let zoned = FeatureFlags(rawValue: UBLK_F_ZONED)
    public static let userRecoveryFailIO = FeatureFlags(rawValue: UBLK_F_USER_RECOVERY_FAIL_IO)
    public static let updateSize = FeatureFlags(rawValue: UBLK_F_UPDATE_SIZE)
    public static let autoBufferRegistration = FeatureFlags(rawValue: UBLK_F_AUTO_BUF_REG)
    public static let quiesce = FeatureFlags(rawValue: UBLK_F_QUIESCE)
    public static let perIODaemon = FeatureFlags(rawValue: UBLK_F_PER_IO_DAEMON)
    public static let bufferRegistrationOffDaemon = FeatureFlags(rawValue: UBLK_F_BUF_REG_OFF_DAEMON)
    public static let batchIO = FeatureFlags(rawValue: UBLK_F_BATCH_IO)
    public static let integrity = FeatureFlags(rawValue: UBLK_F_INTEGRITY)
    public static let safeStop = FeatureFlags(rawValue: UBLK_F_SAFE_STOP_DEV)
    public static let noAutoPartitionScan = FeatureFlags(rawValue: UBLK_F_NO_AUTO_PART_SCAN)
    public static let sharedMemoryZeroCopy = FeatureFlags(rawValue: UBLK_F_SHMEM_ZC)
    public static let ioDescriptorSize = FeatureFlags(rawValue: UBLK_F_IO_DESC_SIZE)

    /// Every flag with its uapi name, lowest bit first.
    public static let named: [(FeatureFlags, String)] = [
        (.zeroCopy, "SUPPORT_ZERO_COPY"), (.commandCompletionInTask, "URING_CMD_COMP_IN_TASK"),
        (.needGetData, "NEED_GET_DATA"), (.userRecovery, "USER_RECOVERY"),
        (.userRecoveryReissue, "USER_RECOVERY_REISSUE"), (.unprivileged, "UNPRIVILEGED_DEV"),
        (.ioctlEncoding, "CMD_IOCTL_ENCODE"), (.userCopy, "USER_COPY"), (.zoned, "ZONED"),
        (.userRecoveryFailIO, "USER_RECOVERY_FAIL_IO"), (.updateSize, "UPDATE_SIZE"),
        (.autoBufferRegistration, "AUTO_BUF_REG"), (.quiesce, "QUIESCE"), (.perIODaemon, "PER_IO_DAEMON"),
        (.bufferRegistrationOffDaemon, "BUF_REG_OFF_DAEMON"), (.batchIO, "BATCH_IO"), (.integrity, "INTEGRITY"),
        (.safeStop, "SAFE_STOP_DEV"), (.noAutoPartitionScan, "NO_AUTO_PART_SCAN"), (.sharedMemoryZeroCopy, "SHMEM_ZC"),
        (.ioDescriptorSize, "IO_DESC_SIZE"),
    ]

    /// `UBLK_F_` names of the set flags; unknown bits as `BIT_n`.
    public var names: [String] {
        var names: [String] = []
        for bit in 0..<64 {
            let flag = FeatureFlags(rawValue: 1 << UInt64(bit))
            guard contains(flag) else { continue }
            names.append(Self.named.first { $0.0 == flag }?.1 ?? "BIT_\(bit)")
        }
        return names
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: ",") }
}

/// The state of a ublk device in the kernel.
public enum DeviceState: Sendable, Equatable, CustomStringConvertible {
    case dead, live, quiesced, failIO
    case unknown(UInt16)

    init(_ raw: UInt16) {
        switch Int(raw) {
        case UBLK_S_DEV_DEAD: self = .dead
        case UBLK_S_DEV_LIVE: self = .live
        case UBLK_S_DEV_QUIESCED: self = .quiesced
        case UBLK_S_DEV_FAIL_IO: self = .failIO
        default: self = .unknown(raw)
        }
    }

    public var description: String {
        switch self {
        case .dead: "dead"
        case .live: "live"
        case .quiesced: "quiesced"
        case .failIO: "fail-io"
        case .unknown(let raw): "state-\(raw)"
        }
    }
}

/// A device as ADD_DEV creates it and GET_DEV_INFO describes it (`ublksrv_ctrl_dev_info`).
public struct DeviceInfo: Sendable, Equatable {
    /// The device number N of /dev/ublkcN and /dev/ublkbN; nil asks the kernel to pick.
    public var id: UInt32?
    public var queueCount: UInt16
    public var queueDepth: UInt16
    public var state: DeviceState
    /// Largest single I/O, in bytes; each tag's buffer has this size.
    public var maxIOBufferBytes: UInt32
    /// The server's pid once START_DEV ran, else -1.
    public var serverPID: Int32
    public var flags: FeatureFlags
    /// Opaque to the kernel: the server may keep its own bits here.
    public var serverFlags: UInt64
    public var ownerUID: UInt32
    public var ownerGID: UInt32

    public init(id: UInt32? = nil, queueCount: UInt16, queueDepth: UInt16, maxIOBufferBytes: UInt32,
                flags: FeatureFlags = [], serverFlags: UInt64 = 0) {
        self.id = id
        self.queueCount = queueCount
        self.queueDepth = queueDepth
        self.state = .dead
        self.maxIOBufferBytes = maxIOBufferBytes
        self.serverPID = -1
        self.flags = flags
        self.serverFlags = serverFlags
        self.ownerUID = 0
        self.ownerGID = 0
    }

    public init(raw: ublksrv_ctrl_dev_info) {
        id = raw.dev_id
        queueCount = raw.nr_hw_queues
        queueDepth = raw.queue_depth
        state = DeviceState(raw.state)
        maxIOBufferBytes = raw.max_io_buf_bytes
        serverPID = raw.ublksrv_pid
        flags = FeatureFlags(rawValue: raw.flags)
        serverFlags = raw.ublksrv_flags
        ownerUID = raw.owner_uid
        ownerGID = raw.owner_gid
    }

    public var raw: ublksrv_ctrl_dev_info {
        var raw = ublksrv_ctrl_dev_info()
        raw.dev_id = id ?? UInt32.max
        raw.nr_hw_queues = queueCount
        raw.queue_depth = queueDepth
        raw.max_io_buf_bytes = maxIOBufferBytes
        raw.ublksrv_pid = serverPID
        raw.flags = flags.rawValue
        raw.ublksrv_flags = serverFlags
        return raw
    }

    /// `/dev/ublkbN`.
    public var blockDevicePath: String { "/dev/ublkb\(id ?? 0)" }
    /// `/dev/ublkcN`.
    public var characterDevicePath: String { "/dev/ublkc\(id ?? 0)" }
}
