import CUblk
import Glibc
import Logging
import UblkQueue
import UblkSystem

/// Drives a target through the production queue engine (`UblkQueue.Queue`) with
/// requests handed in by the caller instead of fetched from the ublk driver: the same
/// decode, validation, start/complete dispatch and ring, minus FETCH/COMMIT. For tests
/// on machines without ublk, and to measure what the target path costs above io_uring.
///
/// Its methods are `@inlinable` so that a benchmark specialises the engine for its target,
/// as `Target.serveQueue` does in the daemon.
public final class OfflineQueue<T: Target> {
    @usableFromInline let commands: OfflineCommands
    @usableFromInline let queue: Queue<T.Handler, OfflineCommands>
    /// Stands in for /dev/ublkcN as fixed file 0, so the target's files keep their numbers.
    private let placeholder: FileDescriptor
    public var depth: Int { queue.depth }
    /// Requests started and not yet completed.
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
        queue = try Queue(ring: ring, source: commands, handler: try target.makeQueueHandler(queueID: 0, depth: depth),
                          queueID: 0, depth: depth, buffers: .copy(bytesPerTag: bufferSize), limits: limits,
                          logger: logger)
    }

    /// The buffer of `tag` (fill it before a write, read it after a read).
    public func buffer(tag: Int) -> UnsafeMutableRawPointer { queue.buffer(tag: tag) }

    /// Starts `descriptor` on `tag` (which must be idle). Refused descriptors and requests
    /// the handler finishes at once are reported through `completed` right away.
    @inlinable
    public func start(tag: Int, _ descriptor: IODescriptor, completed: (Int, Int32) -> Void) throws {
        commands.descriptors[tag] = descriptor.raw
        pending += 1
        try queue.arrived(tag: tag)
        deliver(completed)
    }

    /// Submits what was pending and reaps completions until at least one request finished
    /// (or nothing is in flight); `completed` gets each finished tag and its result.
    @inlinable
    public func reap(completed: (Int, Int32) -> Void) throws {
        while pending > 0 && commands.finishedCount == 0 { try queue.turn() }
        deliver(completed)
    }

    /// Runs one request to completion and returns its result.
    public func perform(_ descriptor: IODescriptor, tag: Int = 0) throws -> Int32 {
        var result: Int32?
        try start(tag: tag, descriptor) { _, value in result = value }
        while result == nil { try reap { _, value in result = value } }
        return result!
    }

    /// Hands out the finished requests one at a time, so `completed` may start new ones.
    @inlinable
    func deliver(_ completed: (Int, Int32) -> Void) {
        while commands.finishedCount > 0 {
            commands.finishedCount -= 1
            pending -= 1
            let (tag, result) = commands.finished[commands.finishedCount]
            completed(tag, result)
        }
    }
}

/// The offline command source: descriptors come from the caller, commits are collected.
/// Raw buffers rather than arrays, as in the targets' handlers: a class's array property
/// pays an exclusivity check per access, which the benchmark would count against the engine.
@usableFromInline
final class OfflineCommands: CommandSource {
    @usableFromInline let descriptors: UnsafeMutableBufferPointer<ublksrv_io_desc>
    /// Requests committed since the caller last looked (`finishedCount` of them): tag and result.
    @usableFromInline let finished: UnsafeMutableBufferPointer<(tag: Int, result: Int32)>
    @usableFromInline @exclusivity(unchecked) var finishedCount = 0

    init(depth: Int) {
        descriptors = .allocate(capacity: depth)
        descriptors.initialize(repeating: ublksrv_io_desc())
        finished = .allocate(capacity: depth)
        finished.initialize(repeating: (0, 0))
    }

    deinit {
        descriptors.deallocate()
        finished.deallocate()
    }

    @inlinable
    func fetch(_ request: IORequest, _ ring: IORing.Handle) {}

    @inlinable
    func descriptor(tag: Int) -> ublksrv_io_desc { descriptors[tag] }

    // A tag is committed at most once per start, so `depth` slots always suffice.
    @inlinable
    func commit(_ request: IORequest, result: Int32, _ ring: IORing.Handle) {
        finished[finishedCount] = (Int(request.tag), result)
        finishedCount += 1
    }
}
