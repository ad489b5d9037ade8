import CUblk
import Logging
import UblkSystem

/// The ublk I/O commands a queue sends on /dev/ublkcN.
public enum IOCommand: UInt32, Sendable {
    case fetch = 0x20
    case commitAndFetch = 0x21
    /// Zero copy by hand (UBLK_F_SUPPORT_ZERO_COPY): only in ioctl encoding.
    case registerBuffer = 0x23
    case unregisterBuffer = 0x24
    /// UBLK_F_BATCH_IO (ioctl encoding only): many tags per command.
    case prepareBatch = 0x25
    case commitBatch = 0x26
    case fetchBatch = 0x27

    public var opcode: UblkOpcode {
        UblkOpcode(number: rawValue, direction: .readWrite, payloadSize: MemoryLayout<ublksrv_io_cmd>.size)
    }
}

/// A command source that speaks to the ublk driver on /dev/ublkcN (fixed file 0 of the
/// queue's ring), set up on the queue's own thread with what the device's flags say.
public protocol DriverCommandSource: CommandSource {
    init(_ configuration: QueueConfiguration, characterDevice: Int32, ring: inout IORing,
         logger: Logger) throws(SystemError)
}

/// Requests from the ublk driver one command per request: FETCH_REQ and
/// COMMIT_AND_FETCH_REQ as URING_CMDs on /dev/ublkcN (fixed file 0), and the queue's
/// descriptor array the driver fills.
public final class UblkCommands: DriverCommandSource {
    @usableFromInline let descriptors: DescriptorArray
    @usableFromInline let queueID: UInt16
    @usableFromInline let fetchOpcode: UInt32
    @usableFromInline let commitOpcode: UInt32
    /// Zero copy: the `ublk_auto_buf_reg` flags every FETCH/COMMIT carries (with the tag as
    /// index) in the SQE's own `addr`; nil in copy mode, where the command's `addr` is the buffer.
    @usableFromInline let autoRegistration: UInt64?

    public convenience init(_ configuration: QueueConfiguration, characterDevice: Int32, ring: inout IORing,
                            logger: Logger) throws(SystemError) {
        try self.init(characterDevice: characterDevice, queueID: configuration.queueID, depth: configuration.depth,
                      encoding: configuration.encoding, buffers: configuration.buffers)
    }

    public init(characterDevice: Int32, queueID: UInt16, depth: Int, encoding: OpcodeEncoding,
                buffers: TagBufferMode = .copy(bytesPerTag: 0)) throws(SystemError) {
        descriptors = try DescriptorArray(characterDevice: characterDevice, queueID: Int(queueID), depth: depth)
        self.queueID = queueID
        fetchOpcode = IOCommand.fetch.opcode.encoded(encoding)
        commitOpcode = IOCommand.commitAndFetch.opcode.encoded(encoding)
        if case .autoRegister(let fallback) = buffers {
            // struct ublk_auto_buf_reg: index u16 (bits 0-15), flags u8 (16-23), reserved zero.
            autoRegistration = fallback ? UInt64(UBLK_AUTO_BUF_REG_FALLBACK) << 16 : 0
        } else {
            autoRegistration = nil
        }
    }

    @inlinable
    public func fetch(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        try send(fetchOpcode, request, result: 0, step: CommandStep.fetch, ring)
    }

    @inlinable
    public func descriptor(tag: Int) -> ublksrv_io_desc { descriptors[tag] }

    @inlinable
    public func commit(_ request: IORequest, result: Int32, step: UInt16, _ ring: IORing.Handle) throws(SystemError) {
        try send(commitOpcode, request, result: result, step: step, ring)
    }

    public func registerBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        try Self.bufferCommand(.registerBuffer, queueID: queueID, request, step: CommandStep.registered, ring)
    }

    public func unregisterBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        try Self.bufferCommand(.unregisterBuffer, queueID: queueID, request, step: CommandStep.unregistered, ring)
    }

    /// The 16-byte `ublksrv_io_cmd`, written straight into the SQE's command area. With zero
    /// copy the command's `addr` must be 0 and the SQE's carries the registration instead.
    @inlinable
    func send(_ opcode: UInt32, _ request: IORequest, result: Int32, step: UInt16,
              _ ring: IORing.Handle) throws(SystemError) {
        let buffer: UInt64
        let registration: UInt64
        if let autoRegistration {
            (buffer, registration) = (0, autoRegistration | UInt64(request.tag))
        } else {
            (buffer, registration) = (UInt64(UInt(bitPattern: request.buffer)), 0)
        }
        let command = ublksrv_io_cmd(q_id: queueID, tag: request.tag, result: result, addr: buffer)
        try ring.prepareCommand(fd: 0, fixedFile: true, opcode: opcode,
                                userData: UserData(.command, tag: request.tag, step: step).rawValue, address: registration)
            .storeBytes(of: command, as: ublksrv_io_cmd.self)
    }

    /// REGISTER_IO_BUF / UNREGISTER_IO_BUF of the request's pages at its tag's index (the
    /// same per-tag command with batched commands too).
    static func bufferCommand(_ command: IOCommand, queueID: UInt16, _ request: IORequest, step: UInt16,
                              _ ring: IORing.Handle) throws(SystemError) {
        let payload = ublksrv_io_cmd(q_id: queueID, tag: request.tag, result: 0, addr: UInt64(request.tag))
        try ring.prepareCommand(fd: 0, fixedFile: true, opcode: command.opcode.encoded(.ioctl),
                                userData: UserData(.command, tag: request.tag, step: step).rawValue)
            .storeBytes(of: payload, as: ublksrv_io_cmd.self)
    }
}
