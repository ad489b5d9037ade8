import CUblk
import Glibc
import Logging
import UblkQueue
import UblkSystem

/// Drives a target through the production queue engine (`UblkQueue.Queue`) with
/// requests handed in by the caller instead of fetched from the ublk driver: the same
/// decode, validation, start/complete dispatch and ring. A commit is an `IORING_OP_NOP`
/// carrying the tag's `.command` user data, so each request also costs what a
/// COMMIT_AND_FETCH costs the engine (one command SQE, its completion dispatched and
/// the tag's next request looked for); the request counts as finished when that
/// completion is reaped. For tests on machines without ublk, and to measure what the
/// target path costs above io_uring.
///
/// Its methods are `@inlinable` so that a benchmark specialises the engine for its target,
/// as `Target.serveQueue` does in the daemon.
public final class OfflineQueue<T: Target> {
    @usableFromInline let commands: OfflineCommands
    @usableFromInline let queue: Queue<T.Handler, OfflineCommands>
    /// Stands in for /dev/ublkcN as fixed file 0, so the target's files keep their numbers.
    private let placeholder: FileDescriptor
    public var depth: Int { queue.depth }
    /// Requests started and not yet reported finished.
    public var inFlight: Int { pending }
    /// (Touched only by the owning thread, never with overlapping accesses: no dynamic
    /// exclusivity check needed.)
    @usableFromInline @exclusivity(unchecked) var pending = 0

    /// `logger` gets the engine's lines (refused and failed requests); by default they are dropped.
    public init(target: T, depth: Int, bufferSize: Int = 512 * 1024,
                logger: Logger = Logger(label: "ublk-offline", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        placeholder = try FileDescriptor(path: "/dev/null", flags: O_RDWR)
        let ring = try Queue<T.Handler, OfflineCommands>.ring(depth: depth, firstFile: placeholder.rawValue, target: target)
        commands = OfflineCommands(depth: depth)
        let limits = DeviceLimits(sectors: target.properties.size >> 9, maxIOBytes: bufferSize)
        queue = try Queue(ring: ring, source: commands, handler: try target.makeQueueHandler(queueID: 0, depth: depth, share: .all),
                          queueID: 0, depth: depth, buffers: .copy(bytesPerTag: bufferSize), limits: limits,
                          logger: logger)
    }

    /// The buffer of `tag` (fill it before a write, read it after a read).
    public func buffer(tag: Int) -> UnsafeMutableRawPointer { queue.buffer(tag: tag) }

    /// Starts `descriptor` on `tag` (which must be idle): what the driver's FETCH completion
    /// does. Every request, refused ones too, is reported by a later `reap`. Always inlined,
    /// like `reap`: in the daemon `Queue.arrived` runs inlined in the turn loop, not as a call.
    @inlinable @inline(__always)
    public func start(tag: Int, _ descriptor: IODescriptor) throws {
        commands.descriptors[tag] = descriptor.raw
        pending += 1
        try queue.arrived(tag: tag)
    }

    /// Submits what was pending and reaps completions until at least one request finished
    /// (or nothing is in flight); `completed` gets each finished tag and its result, one at
    /// a time, so it may start new requests (and throw what starting them threw). Always
    /// inlined, as `Queue.run` inlines the turns: then `completed` is too, and capturing
    /// the caller's state costs no closure context or retain per call.
    @inlinable @inline(__always)
    public func reap(completed: (Int, Int32) throws -> Void) throws {
        while pending > 0 && commands.finishedCount == 0 { try queue.turn() }
        while commands.finishedCount > 0 {
            commands.finishedCount -= 1
            pending -= 1
            let tag = commands.finished[commands.finishedCount]
            try completed(tag, commands.results[tag])
        }
    }

    /// Runs one request to completion and returns its result.
    public func perform(_ descriptor: IODescriptor, tag: Int = 0) throws -> Int32 {
        var result: Int32?
        try start(tag: tag, descriptor)
        while result == nil { try reap { _, value in result = value } }
        return result!
    }
}

/// The offline command source: descriptors come from the caller; a commit keeps the
/// result and submits a NOP in place of COMMIT_AND_FETCH, whose completion finishes the
/// request. Raw buffers rather than arrays, as in the targets' handlers: a class's array
/// property pays an exclusivity check per access, which the benchmark would count
/// against the engine.
@usableFromInline
final class OfflineCommands: CommandSource {
    @usableFromInline let descriptors: UnsafeMutableBufferPointer<ublksrv_io_desc>
    /// Each tag's committed result, reported once its NOP completes.
    @usableFromInline let results: UnsafeMutableBufferPointer<Int32>
    /// Tags whose commit completed since the caller last looked (`finishedCount` of them).
    @usableFromInline let finished: UnsafeMutableBufferPointer<Int>
    @usableFromInline @exclusivity(unchecked) var finishedCount = 0

    init(depth: Int) {
        descriptors = .allocate(capacity: depth)
        descriptors.initialize(repeating: ublksrv_io_desc())
        results = .allocate(capacity: depth)
        results.initialize(repeating: 0)
        finished = .allocate(capacity: depth)
        finished.initialize(repeating: 0)
    }

    deinit {
        descriptors.deallocate()
        results.deallocate()
        finished.deallocate()
    }

    /// Requests are handed in by `OfflineQueue.start`, never fetched.
    @inlinable
    func fetch(_ request: IORequest, _ ring: IORing.Handle) {}

    @inlinable
    func descriptor(tag: Int) -> ublksrv_io_desc { descriptors[tag] }

    @inlinable
    func commit(_ request: IORequest, result: Int32, step: UInt16, _ ring: IORing.Handle) throws(SystemError) {
        results[Int(request.tag)] = result
        try ring.prepareNop(userData: UserData(.command, tag: request.tag, step: step).rawValue)
    }

    // The commit's NOP completed: the request is finished, and the tag idles until the
    // caller starts it again (a tag has at most one commit in flight: `depth` slots suffice).
    @inlinable
    func requestArrived(tag: Int) -> Bool {
        finished[finishedCount] = tag
        finishedCount += 1
        return false
    }
}
