import CLiburing
import CUblk
import Glibc
import UblkSystem

/// Why `/dev/ublk-control` could not be opened, phrased as what to do about it.
public enum ControlDeviceError: Error, CustomStringConvertible, Equatable {
    case driverNotLoaded
    case permissionDenied
    case system(SystemError)

    public var description: String {
        switch self {
        case .driverNotLoaded: "ublk_drv is not loaded: run modprobe ublk_drv"
        case .permissionDenied: "permission denied on /dev/ublk-control: run as root"
        case .system(let error): "\(error)"
        }
    }
}

/// The ublk driver's control device, `/dev/ublk-control`.
///
/// Commands travel as `IORING_OP_URING_CMD` on a ring of 128-byte SQEs: the
/// 32-byte `ublksrv_ctrl_cmd` goes into the SQE's 80-byte command area. Each call
/// submits one command and waits for its completion; the kernel serialises them
/// per device. One `ControlDevice` belongs to one thread.
public struct ControlDevice: ~Copyable {
    public static let path = "/dev/ublk-control"

    private let file: FileDescriptor
    private let ring: IORing
    /// How opcodes are encoded for this kernel.
    public let encoding: OpcodeEncoding
    /// What GET_FEATURES reported; nil when the kernel predates the command (before 6.5)
    /// or legacy opcodes were forced.
    public let features: FeatureFlags?

    /// Opens the control device. With `encoding` nil the kernel is probed: GET_FEATURES
    /// in ioctl encoding answers on 6.5+; if it is refused the legacy opcodes are used.
    /// The environment variable `UBLK_FORCE_LEGACY_OPCODES=1` forces the legacy path
    /// (how an old kernel is emulated in tests).
    public init(path: String = ControlDevice.path, encoding: OpcodeEncoding? = nil) throws(ControlDeviceError) {
        let file: FileDescriptor
        do {
            file = try FileDescriptor(path: path, flags: O_RDWR)
        } catch {
            switch error.errno {
            case ENOENT, ENODEV, ENXIO: throw .driverNotLoaded
            case EACCES, EPERM: throw .permissionDenied
            default: throw .system(error)
            }
        }
        let ring: IORing
        do { ring = try IORing(entries: 4, flags: IORING_SETUP_SQE128) }
        catch { throw .system(error) }

        let forced = encoding ?? (getenv("UBLK_FORCE_LEGACY_OPCODES").map { String(cString: $0) == "1" } == true ? .legacy : nil)
        let probed = forced == .legacy ? nil : try? Self.queryFeatures(ring: ring, fd: file.rawValue, encoding: .ioctl)
        self.encoding = forced ?? (probed?.contains(.ioctlEncoding) == true ? .ioctl : .legacy)
        self.features = probed
        self.file = file
        self.ring = ring
    }

    // MARK: Commands

    /// ADD_DEV: creates `/dev/ublkcN`. Returns the device as the kernel made it
    /// (id picked if none was asked for; queue count clamped to the CPU count).
    public func addDevice(_ request: DeviceInfo) throws(ControlError) -> DeviceInfo {
        var flags = request.flags
        if encoding == .ioctl { flags.insert(.ioctlEncoding) }
        var raw = request.raw
        raw.flags = flags.rawValue
        try withUnsafeMutableBytes(of: &raw) { (buffer) throws(ControlError) in
            _ = try execute(.addDevice, device: request.id, buffer: buffer)
        }
        return DeviceInfo(raw: raw)
    }

    /// DEL_DEV: removes the device; the kernel waits until its server closed /dev/ublkcN.
    public func deleteDevice(_ id: UInt32) throws(ControlError) {
        _ = try execute(.deleteDevice, device: id)
    }

    /// START_DEV: the kernel waits for every queue's FETCH_REQs, then adds /dev/ublkbN.
    public func startDevice(_ id: UInt32, serverPID: Int32) throws(ControlError) {
        _ = try execute(.startDevice, device: id, data: UInt64(UInt32(bitPattern: serverPID)))
    }

    /// STOP_DEV: removes /dev/ublkbN and completes the pending fetches with an abort result.
    public func stopDevice(_ id: UInt32) throws(ControlError) {
        _ = try execute(.stopDevice, device: id)
    }

    /// GET_DEV_INFO.
    public func deviceInfo(_ id: UInt32) throws(ControlError) -> DeviceInfo {
        var raw = ublksrv_ctrl_dev_info()
        try withUnsafeMutableBytes(of: &raw) { (buffer) throws(ControlError) in
            _ = try execute(.getDeviceInfo, device: id, buffer: buffer)
        }
        return DeviceInfo(raw: raw)
    }

    /// SET_PARAMS (before START_DEV).
    public func setParameters(_ id: UInt32, _ parameters: DeviceParameters) throws(ControlError) {
        var raw = parameters.raw
        try withUnsafeMutableBytes(of: &raw) { (buffer) throws(ControlError) in
            _ = try execute(.setParameters, device: id, buffer: buffer)
        }
    }

    /// GET_PARAMS.
    public func parameters(_ id: UInt32) throws(ControlError) -> DeviceParameters {
        var raw = ublk_params()
        raw.len = UInt32(MemoryLayout<ublk_params>.size)
        try withUnsafeMutableBytes(of: &raw) { (buffer) throws(ControlError) in
            _ = try execute(.getParameters, device: id, buffer: buffer)
        }
        return DeviceParameters(raw: raw)
    }

    /// START_USER_RECOVERY: a device whose server died (state quiesced) waits for a new one.
    public func startUserRecovery(_ id: UInt32) throws(ControlError) {
        _ = try execute(.startUserRecovery, device: id)
    }

    /// END_USER_RECOVERY: the new server's queues are fetching; the device is live again.
    public func endUserRecovery(_ id: UInt32, serverPID: Int32) throws(ControlError) {
        _ = try execute(.endUserRecovery, device: id, data: UInt64(UInt32(bitPattern: serverPID)))
    }

    /// DEL_DEV_ASYNC (6.9+): removes the device without waiting for its last opener (a
    /// mounted file system) to let go; the id is freed once that happens.
    public func deleteDeviceAsync(_ id: UInt32) throws(ControlError) {
        _ = try execute(.deleteDeviceAsync, device: id)
    }

    /// UPDATE_SIZE (UBLK_F_UPDATE_SIZE): the disk's capacity becomes `sectors` 512-byte
    /// sectors, announced with a RESIZE uevent. The kernel checks neither size nor alignment.
    public func updateSize(_ id: UInt32, sectors: UInt64) throws(ControlError) {
        _ = try execute(.updateSize, device: id, data: sectors)
    }

    /// QUIESCE_DEV (UBLK_F_QUIESCE, device added with USER_RECOVERY): waits up to
    /// `timeoutMilliseconds` (0: forever) until every queue is idle, then aborts the
    /// server's parked fetches; the device waits for a new server as after a crash.
    public func quiesceDevice(_ id: UInt32, timeoutMilliseconds: UInt64) throws(ControlError) {
        _ = try execute(.quiesceDevice, device: id, data: timeoutMilliseconds)
    }

    /// TRY_STOP_DEV (UBLK_F_SAFE_STOP_DEV): STOP_DEV only if nobody has the disk open,
    /// else EBUSY; the check and the stop are one step in the kernel (no race with an open).
    public func tryStopDevice(_ id: UInt32) throws(ControlError) {
        _ = try execute(.tryStopDevice, device: id)
    }

    /// GET_QUEUE_AFFINITY: the CPUs whose I/O lands on `queue`, as a kernel cpumask.
    public func queueAffinity(_ id: UInt32, queue: UInt16) throws(ControlError) -> [UInt8] {
        // Room for 1024 CPUs, a multiple of 8 bytes.
        let mask = UnsafeMutableRawBufferPointer.allocate(byteCount: 128, alignment: 8)
        defer { mask.deallocate() }
        mask.initializeMemory(as: UInt8.self, repeating: 0)
        // The driver takes the queue from data[0] (queue_id is for per-queue commands to come).
        _ = try execute(.getQueueAffinity, device: id, queue: queue, buffer: mask, data: UInt64(queue))
        return Array(mask)
    }

    /// The ids of the devices that exist (from /sys/class/ublk-char, where the driver lists them).
    public static func deviceIDs() -> [UInt32] {
        SmallFile.entries(of: "/sys/class/ublk-char").compactMap {
            $0.hasPrefix("ublkc") ? UInt32($0.dropFirst(5)) : nil
        }.sorted()
    }

    // MARK: Submission

    private static func queryFeatures(ring: borrowing IORing, fd: Int32, encoding: OpcodeEncoding) throws(ControlError) -> FeatureFlags {
        var features: UInt64 = 0
        try withUnsafeMutableBytes(of: &features) { (buffer) throws(ControlError) in
            _ = try submit(ring: ring, fd: fd, encoding: encoding, .getFeatures, device: nil, queue: .max,
                           buffer: buffer, data: 0)
        }
        return FeatureFlags(rawValue: features)
    }

    private func execute(_ command: ControlCommand, device: UInt32?, queue: UInt16 = .max,
                         buffer: UnsafeMutableRawBufferPointer? = nil, data: UInt64 = 0) throws(ControlError) -> Int32 {
        try Self.submit(ring: ring, fd: file.rawValue, encoding: encoding, command, device: device, queue: queue,
                        buffer: buffer, data: data)
    }

    private static func submit(ring: borrowing IORing, fd: Int32, encoding: OpcodeEncoding, _ command: ControlCommand,
                               device: UInt32?, queue: UInt16, buffer: UnsafeMutableRawBufferPointer?,
                               data: UInt64) throws(ControlError) -> Int32 {
        func fail(_ errno: Int32) -> ControlError { ControlError(command: command, deviceID: device, errno: errno) }
        var cmd = ublksrv_ctrl_cmd()
        cmd.dev_id = device ?? UInt32.max
        cmd.queue_id = queue
        if let buffer {
            cmd.addr = UInt64(UInt(bitPattern: buffer.baseAddress))
            cmd.len = UInt16(buffer.count)
        }
        cmd.data = data
        var result: Int32 = -EIO
        do {
            try ring.handle.prepareCommand(fd: fd, fixedFile: false, opcode: command.opcode.encoded(encoding), userData: 0)
                .storeBytes(of: cmd, as: ublksrv_ctrl_cmd.self)
            var reaped = 0
            while reaped == 0 {
                try ring.handle.submit(waitingFor: 1)
                reaped = ring.handle.reap { _, value in result = value }
            }
        } catch { throw fail(error.errno) }
        if result < 0 { throw fail(result) }
        return result
    }
}
