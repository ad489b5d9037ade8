import CLiburing
import Glibc
import UblkSystem

/// Drives a target's queue handler with synthetic requests on a ring of its own, with
/// no ublk driver involved: the same `start`/`complete` path a `Queue` takes, minus
/// FETCH/COMMIT. For tests on machines without ublk, and to measure what the target
/// path costs above io_uring itself.
public final class OfflineQueue {
    private let ring: IORing
    private let placeholder: FileDescriptor
    private let buffers: AlignedBuffer
    private let handler: any QueueHandler
    private let requests: UnsafeMutableBufferPointer<IORequest>
    public let depth: Int
    public let bufferSize: Int
    private let limits: DeviceLimits
    /// Requests started and not yet completed.
    public private(set) var inFlight = 0

    public init(target: any Target, depth: Int, bufferSize: Int = 512 * 1024) throws {
        self.depth = depth
        self.bufferSize = bufferSize
        ring = try IORing(entries: UInt32(depth), preferredFlags: IORing.singleThreadFlags)
        // Fixed file 0 is /dev/ublkcN in a real queue; here a stand-in keeps the numbering.
        placeholder = try FileDescriptor(path: "/dev/null", flags: O_RDWR)
        try ring.registerFiles([placeholder.rawValue] + target.fixedFiles)
        buffers = try AlignedBuffer(count: depth * bufferSize)
        handler = try target.makeQueueHandler(queueID: 0, depth: depth)
        requests = .allocate(capacity: depth)
        for tag in 0..<depth {
            (requests.baseAddress! + tag).initialize(to: IORequest(
                tag: UInt16(tag), descriptor: IODescriptor(operation: .flush, startSector: 0, sectorCount: 0),
                buffer: buffers.base + tag * bufferSize))
        }
        limits = DeviceLimits(sectors: target.properties.size >> 9, maxIOBytes: bufferSize)
    }

    deinit { requests.deallocate() }

    /// The buffer of `tag` (fill it before a write, read it after a read).
    public func buffer(tag: Int) -> UnsafeMutableRawPointer { requests[tag].buffer }

    /// Starts `descriptor` on `tag` (which must be idle). Refused descriptors and requests
    /// the handler finishes at once are reported through `completed` right away.
    public func start(tag: Int, _ descriptor: IODescriptor, completed: (Int, Int32) -> Void) throws {
        switch descriptor.validated(for: limits) {
        case .failure(let error):
            completed(tag, -error.errno)
        case .success(let descriptor):
            requests[tag].descriptor = descriptor
            if let result = handler.start(requests[tag], BackingSubmitter(ring: ring.handle, tag: UInt16(tag))) {
                completed(tag, result)
            } else {
                inFlight += 1
            }
        }
    }

    /// Submits what was started and reaps completions until at least one request finished
    /// (or nothing is in flight); `completed` gets each finished tag and its result.
    public func reap(completed: (Int, Int32) -> Void) throws {
        var finished = 0
        while inFlight > 0 && finished == 0 {
            _ = try ring.submit(waitingFor: 1)
            while let cqe = ring.peekCompletion() {
                let tag = Int(UInt16(truncatingIfNeeded: cqe.pointee.user_data))
                let result = cqe.pointee.res
                ring.markSeen(cqe)
                let io = BackingSubmitter(ring: ring.handle, tag: UInt16(tag))
                if let done = handler.complete(requests[tag], backingResult: result, io) {
                    inFlight -= 1
                    finished += 1
                    completed(tag, done)
                }
            }
        }
    }

    /// Runs one request to completion and returns its result.
    public func perform(_ descriptor: IODescriptor, tag: Int = 0) throws -> Int32 {
        var result: Int32?
        try start(tag: tag, descriptor) { _, value in result = value }
        while result == nil { try reap { _, value in result = value } }
        return result!
    }
}
