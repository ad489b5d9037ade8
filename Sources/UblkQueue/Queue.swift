import CLiburing
import CUblk
import Glibc
import Logging
import UblkSystem

/// Everything a queue thread needs to serve one hardware queue of a device.
public struct QueueConfiguration: Sendable {
    public var deviceID: UInt32
    public var queueID: UInt16
    public var depth: Int
    /// Size of each tag's buffer (the device's max_io_buf_bytes).
    public var bufferSize: Int
    public var limits: DeviceLimits
    public var encoding: OpcodeEncoding
    /// Pin the thread to these CPUs (a kernel cpumask, from GET_QUEUE_AFFINITY), if set.
    public var cpuMask: [UInt8]?
    /// The device size as it changes while the queue runs (`ublk resize`); overrides
    /// `limits.sectors` when set.
    public var capacity: DeviceCapacity?

    public init(deviceID: UInt32, queueID: UInt16, depth: Int, bufferSize: Int, limits: DeviceLimits,
                encoding: OpcodeEncoding, cpuMask: [UInt8]? = nil) {
        self.deviceID = deviceID
        self.queueID = queueID
        self.depth = depth
        self.bufferSize = bufferSize
        self.limits = limits
        self.encoding = encoding
        self.cpuMask = cpuMask
    }
}

/// The ublk I/O commands a queue sends on /dev/ublkcN.
public enum IOCommand: UInt32, Sendable {
    case fetch = 0x20
    case commitAndFetch = 0x21

    public var opcode: UblkOpcode {
        UblkOpcode(number: rawValue, direction: .readWrite, payloadSize: MemoryLayout<ublksrv_io_cmd>.size)
    }
}

/// Where each tag is in its life: waiting in the kernel for a request (after FETCH or
/// COMMIT_AND_FETCH), in the target's hands (backing I/O in flight), or finished for
/// good (the kernel aborted the fetch: the device is stopping).
enum TagState: UInt8 {
    case awaitingRequest
    case inTarget
    case retired
}

/// One hardware queue of a ublk device: its ring, descriptor array, tag buffers and
/// target handler, all owned by the one thread that runs `run()`.
///
/// The kernel requires that a queue's FETCH/COMMIT commands come from the task that
/// issued its first FETCH, so nothing here is shared or locked.
public final class Queue {
    public let configuration: QueueConfiguration
    private let ring: IORing
    private let descriptors: DescriptorArray
    private let buffers: AlignedBuffer
    private let handler: any QueueHandler
    private let states: UnsafeMutableBufferPointer<TagState>
    private let requests: UnsafeMutableBufferPointer<IORequest>
    private let fetchOpcode: UInt32
    private let commitOpcode: UInt32
    private let logger: Logger
    private var live: Int

    /// Sets the queue up on the calling thread: ring, fixed files (the character device,
    /// then the target's files), descriptor mapping, buffers and the target's handler.
    public init(_ configuration: QueueConfiguration, characterDevice: Int32, target: any Target, logger: Logger) throws {
        self.configuration = configuration
        let depth = configuration.depth
        let ring = try IORing(entries: UInt32(depth), preferredFlags: IORing.singleThreadFlags)
        try ring.registerFiles([characterDevice] + target.fixedFiles)
        self.ring = ring
        descriptors = try DescriptorArray(characterDevice: characterDevice, queueID: Int(configuration.queueID), depth: depth)
        buffers = try AlignedBuffer(count: depth * configuration.bufferSize)
        handler = try target.makeQueueHandler(queueID: Int(configuration.queueID), depth: depth)
        states = .allocate(capacity: depth)
        states.initialize(repeating: .awaitingRequest)
        requests = .allocate(capacity: depth)
        for tag in 0..<depth {
            (requests.baseAddress! + tag).initialize(to: IORequest(
                tag: UInt16(tag), descriptor: IODescriptor(operation: .flush, startSector: 0, sectorCount: 0),
                buffer: buffers.base + tag * configuration.bufferSize))
        }
        fetchOpcode = IOCommand.fetch.opcode.encoded(configuration.encoding)
        commitOpcode = IOCommand.commitAndFetch.opcode.encoded(configuration.encoding)
        self.logger = logger
        live = depth
    }

    deinit {
        states.deallocate()
        requests.deallocate()
    }

    /// Queues FETCH_REQ for every tag and hands them to the kernel. START_DEV waits
    /// for exactly this.
    public func fetchAll() throws {
        for tag in 0..<configuration.depth {
            try queueCommand(fetchOpcode, tag: tag, result: 0)
        }
        _ = try ring.submit()
    }

    /// Serves requests until the kernel aborts every tag (STOP_DEV or device removal).
    public func run() throws {
        while live > 0 {
            _ = try ring.submit(waitingFor: 1)
            while let cqe = ring.peekCompletion() {
                let userData = cqe.pointee.user_data
                let result = cqe.pointee.res
                ring.markSeen(cqe)
                let tag = Int(UInt16(truncatingIfNeeded: userData))
                guard tag < configuration.depth else { continue }
                if userData & BackingSubmitter.targetBit != 0 {
                    let io = BackingSubmitter(ring: ring.handle, tag: UInt16(tag))
                    if let done = handler.complete(requests[tag], backingResult: result, io) {
                        try commit(tag: tag, result: done)
                    }
                } else {
                    try commandCompleted(tag: tag, result: result)
                }
            }
        }
    }

    /// A FETCH or COMMIT_AND_FETCH completed: a new request, or the end of the tag.
    @inline(__always)
    private func commandCompleted(tag: Int, result: Int32) throws {
        guard result == Int32(UBLK_IO_RES_OK) else {
            if result != -ENODEV {
                // Not the abort of a stopping device: the kernel refused the command itself.
                logger.error("queue \(configuration.queueID) tag \(tag): ublk command failed: \(SystemError("", errno: result).reason)")
            }
            states[tag] = .retired
            live -= 1
            return
        }
        let descriptor = IODescriptor(raw: descriptors[tag])
        var limits = configuration.limits
        if let capacity = configuration.capacity { limits.sectors = capacity.sectors }
        switch descriptor.validated(for: limits) {
        case .failure(let error):
            logger.error("queue \(configuration.queueID) tag \(tag): refused request: \(error)")
            try commit(tag: tag, result: -error.errno)
        case .success(let descriptor):
            requests[tag].descriptor = descriptor
            states[tag] = .inTarget
            let io = BackingSubmitter(ring: ring.handle, tag: UInt16(tag))
            if let done = handler.start(requests[tag], io) {
                try commit(tag: tag, result: done)
            }
        }
    }

    /// Completes the tag's request with `result` and asks for the next one.
    @inline(__always)
    private func commit(tag: Int, result: Int32) throws {
        if result < 0 { logFailure(tag: tag, result: result) }
        states[tag] = .awaitingRequest
        try queueCommand(commitOpcode, tag: tag, result: result)
    }

    private func logFailure(tag: Int, result: Int32) {
        let d = requests[tag].descriptor
        logger.error("queue \(configuration.queueID) tag \(tag): \(d.operation) of sectors \(d.startSector)+\(d.sectorCount) failed: \(SystemError("", errno: result).reason)")
    }

    @inline(__always)
    private func queueCommand(_ opcode: UInt32, tag: Int, result: Int32) throws {
        let sqe = try ring.nextSubmission()
        UnsafeMutableRawPointer(sqe).initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<io_uring_sqe>.size)
        // Fixed file 0 is /dev/ublkcN.
        io_uring_prep_rw(Int32(IORING_OP_URING_CMD.rawValue), sqe, 0, nil, 0, 0)
        sqe.pointee.cmd_op = opcode
        sqe.pointee.flags |= UInt8(1 << IOSQE_FIXED_FILE_BIT)
        io_uring_sqe_set_data64(sqe, UInt64(tag))
        var command = ublksrv_io_cmd()
        command.q_id = configuration.queueID
        command.tag = UInt16(tag)
        command.result = result
        command.addr = UInt64(UInt(bitPattern: requests[tag].buffer))
        sqe.commandArea.storeBytes(of: command, as: ublksrv_io_cmd.self)
    }
}
