import CLiburing
import CUblk
import Glibc
import Logging
import UblkSystem

/// Everything a queue thread needs to serve one hardware queue of a device.
public struct QueueConfiguration: Sendable {
    public var queueID: UInt16
    public var depth: Int
    /// Where each tag's data lives.
    public var buffers: TagBufferMode
    public var limits: DeviceLimits
    public var encoding: OpcodeEncoding
    /// Pin the thread to these CPUs (a kernel cpumask, from GET_QUEUE_AFFINITY), if set.
    public var cpuMask: [UInt8]?
    /// The device size as it changes while the queue runs (`ublk resize`); overrides
    /// `limits.sectors` when set.
    public var capacity: DeviceCapacity?
    /// The device has UBLK_F_BATCH_IO: requests come and go in batches (`UblkBatchCommands`)
    /// rather than by one command per tag (`UblkCommands`).
    public var batchedCommands = false
    /// Busy polling: while at most one request is in its hands, the queue thread spins this
    /// long for the next completion before it sleeps in the kernel (`--poll-us`); 0 never spins.
    public var pollMicroseconds = 0
    /// The queue's tags this thread serves: all of them, unless several threads share the
    /// queue (UBLK_F_PER_IO_DAEMON, `Target.threadsPerQueue`).
    public var share = TagShare.all

    public init(queueID: UInt16, depth: Int, buffers: TagBufferMode, limits: DeviceLimits,
                encoding: OpcodeEncoding, cpuMask: [UInt8]? = nil) {
        self.queueID = queueID
        self.depth = depth
        self.buffers = buffers
        self.limits = limits
        self.encoding = encoding
        self.cpuMask = cpuMask
    }
}

/// Which of a queue's tags one thread serves. A queue has one thread for all its tags,
/// unless the device has UBLK_F_PER_IO_DAEMON: then each tag's commands may come from a
/// thread of its own (the one that fetched it; the driver runs the tag's requests there),
/// and `count` threads share the queue, thread `index` serving tags `index`, `index +
/// count`, ... Interleaved, not in blocks: the block layer hands a queue's tags out in
/// turn, so each thread gets its part of the requests at any depth above one.
public struct TagShare: Sendable, Equatable {
    public var index: Int
    public var count: Int

    public init(index: Int, count: Int) {
        precondition(count > 0 && (0..<count).contains(index))
        (self.index, self.count) = (index, count)
    }

    /// One thread serves every tag.
    public static let all = TagShare(index: 0, count: 1)

    /// The tags of a queue of `depth` this share serves.
    public func tags(depth: Int) -> StrideTo<Int> { stride(from: index, to: depth, by: count) }

    /// How many tags of a queue of `depth` this share serves.
    public func tagCount(depth: Int) -> Int { depth > index ? (depth - index + count - 1) / count : 0 }

    /// Where `tag`'s per-tag memory (its data buffer, a bounce buffer) lies among the
    /// share's: the share's tags take consecutive slots, so a thread's buffers cover only
    /// its tags. (Spaced a tag apart in a region for every tag, each thread's tags fell in
    /// every 2 MiB transparent huge page of it: with 5 threads sharing a queue, each thread
    /// came to hold the whole region.) A tag outside the share maps to a slot one of the
    /// share's own tags uses: harmless, as the thread never fetches such a tag.
    @inlinable public func slot(of tag: Int) -> Int { tag / count }

    /// Slots for a queue of `depth`: every share's tags fit.
    public func slotCount(depth: Int) -> Int { (depth + count - 1) / count }
}

/// Where a tag's request is, as the queue sees it.
public enum TagState: UInt8, Sendable {
    /// The kernel's: a FETCH or COMMIT_AND_FETCH (or a batched fetch) waits for the next request.
    case withKernel
    /// The queue's: it arrived and is not committed yet (the handler may have I/O in flight).
    case held
    /// The queue registers its pages (REGISTER_IO_BUF, the zero-copy fallback) or gives
    /// them back before its commit (UNREGISTER_IO_BUF): that command's completion carries
    /// it on, and nothing else may commit it meanwhile (the kernel would not end a request
    /// whose pages are still registered).
    case registering
    /// Its commit is linked behind its last backing operation: the kernel commits it when
    /// that completes, unless it fails or ends short (then the completion brings it back).
    case linked
}

/// How a queue gives each tag room for its data.
public enum TagBufferMode: Sendable, Equatable {
    /// The driver copies request data to and from a buffer per tag of `bytesPerTag`
    /// (the device's max_io_buf_bytes), whose address FETCH and COMMIT carry. The
    /// buffers are one anonymous mapping: pages are allocated when first touched.
    case copy(bytesPerTag: Int)
    /// Zero copy (UBLK_F_AUTO_BUF_REG): no buffers. Before a FETCH or COMMIT_AND_FETCH
    /// completes, the driver registers the request's pages in the ring's buffer table at
    /// the tag's index; targets reach them with READ_FIXED/WRITE_FIXED. With `fallback`
    /// (the device also has UBLK_F_SUPPORT_ZERO_COPY) a request the driver could not
    /// register arrives flagged, and the queue registers it itself (REGISTER_IO_BUF).
    case autoRegister(fallback: Bool)

    /// The buffer each tag needs in this mode (none with zero copy).
    public var bytesPerTag: Int {
        switch self {
        case .copy(let bytes): bytes
        case .autoRegister: 0
        }
    }
}

/// Where a queue's requests come from and where their results go: the one seam between
/// the queue engine and the ublk driver. `UblkCommands` speaks to /dev/ublkcN; tests and
/// benchmarks hand requests in themselves.
public protocol CommandSource: AnyObject {
    /// Asks for the first request of `request.tag` (FETCH_REQ); START_DEV waits for these.
    func fetch(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError)
    /// The raw descriptor of the request that has just arrived on `tag`.
    func descriptor(tag: Int) -> ublksrv_io_desc
    /// Completes `request` with `result` and asks for the tag's next (COMMIT_AND_FETCH_REQ).
    /// `step` goes into the completion's user data: `CommandStep.fetch`, or `.linkedCommit`
    /// for a commit linked behind the request's last backing operation.
    func commit(_ request: IORequest, result: Int32, step: UInt16, _ ring: IORing.Handle) throws(SystemError)
    /// Zero-copy fallback: registers the request's pages at its tag's index (REGISTER_IO_BUF;
    /// completes as a `.command` with step `CommandStep.registered`).
    func registerBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError)
    /// Gives the pages registered by `registerBuffer` back (UNREGISTER_IO_BUF; step
    /// `CommandStep.unregistered`), before the request is committed.
    func unregisterBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError)
    /// A FETCH or COMMIT_AND_FETCH of `tag` completed with UBLK_IO_RES_OK: is there a new
    /// request to start? The driver completes one only with the tag's next request (true);
    /// the offline source's stand-in commit completes without one (the caller starts the
    /// tag's next request itself).
    func requestArrived(tag: Int) -> Bool
    /// `RequestStep.finishing`: links the commit of `request` with `result` behind the
    /// backing operation just prepared (the queue asks only where the kernel copies a linked
    /// command's SQE at submission). False, changing nothing, leaves the request to that
    /// operation's completion, as after `.submitted`.
    func linkCommit(_ request: IORequest, result: Int32, _ ring: IORing.Handle) throws(SystemError) -> Bool
    /// A backing operation of `tag` completed, and the request goes on. (Behind a linked
    /// commit, one completes visibly only when it failed or ended short: the commit was
    /// cancelled.)
    func backingCompleted(tag: Int)
    /// How many of the source's commands the kernel must end before the queue may stop:
    /// every tag's fetch, or (batched) the one multishot fetch.
    func commandsAtStart(depth: Int) -> Int
    /// Sends what the source gathered since the last submission (batched PREP or COMMIT);
    /// the queue calls it before each. Returns how many of the completions the submission
    /// waits for are answers the kernel posts during it (so the wait is for one more).
    func flush(_ ring: IORing.Handle) throws(SystemError) -> UInt32
    /// A completion of one of the source's batched commands (a `CommandStep.isBatch` step).
    /// Calls `arrived` with each tag the kernel delivered; returns how many commands the
    /// kernel still holds more (+) or fewer (-) than before: one per request delivered,
    /// minus those committed, minus one when the fetch ended for good.
    func batchCompleted(step: UInt16, tag: UInt16, result: Int32, flags: UInt32, _ ring: IORing.Handle,
                        arrived: (Int) throws(SystemError) -> Void) throws(SystemError) -> Int
}

/// The `step` of a `.command` completion (`UserData`): which ublk command of the tag it was.
public enum CommandStep {
    /// FETCH_REQ or COMMIT_AND_FETCH_REQ.
    public static let fetch: UInt16 = 0
    public static let registered: UInt16 = 1
    public static let unregistered: UInt16 = 2
    /// A COMMIT_AND_FETCH_REQ linked behind the request's backing operation
    /// (`RequestStep.finishing`): as `fetch`, except that -ECANCELED means the link broke.
    public static let linkedCommit: UInt16 = 3
    /// UBLK_F_BATCH_IO: PREP_IO_CMDS, COMMIT_IO_CMDS (user data tag: which element
    /// buffer), the multishot FETCH_IO_CMDS.
    public static let batchPrepare: UInt16 = 4
    public static let batchCommit: UInt16 = 5
    public static let batchFetch: UInt16 = 6
    /// A COMMIT_IO_CMDS of one request linked behind its backing operation; it completes
    /// only if it failed (user data tag: the request's).
    public static let batchLinkedCommit: UInt16 = 7

    @inlinable public static func isBatch(_ step: UInt16) -> Bool { step >= batchPrepare }
}

extension CommandSource {
    /// Sources without zero copy never see a request that needs registering.
    public func registerBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        throw SystemError("REGISTER_IO_BUF", errno: EOPNOTSUPP)
    }

    public func unregisterBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        throw SystemError("UNREGISTER_IO_BUF", errno: EOPNOTSUPP)
    }

    /// The ublk driver's case: a command completes when the tag's next request is there.
    @inlinable
    public func requestArrived(tag: Int) -> Bool { true }

    /// One command per request: COMMIT_AND_FETCH linked as is (its completion, the tag's
    /// next request, comes to the queue as any other).
    @inlinable
    public func linkCommit(_ request: IORequest, result: Int32, _ ring: IORing.Handle) throws(SystemError) -> Bool {
        guard ring.linkLastPrepared() else { return false }
        try commit(request, result: result, step: CommandStep.linkedCommit, ring)
        return true
    }

    @inlinable public func backingCompleted(tag: Int) {}

    // One command per request, sent as it is prepared: nothing gathered, no batch steps.
    @inlinable public func commandsAtStart(depth: Int) -> Int { depth }
    @inlinable public func flush(_ ring: IORing.Handle) throws(SystemError) -> UInt32 { 0 }
    public func batchCompleted(step: UInt16, tag: UInt16, result: Int32, flags: UInt32, _ ring: IORing.Handle,
                               arrived: (Int) throws(SystemError) -> Void) throws(SystemError) -> Int { 0 }
}

/// The queue engine: one hardware queue's ring, per-tag requests and buffers, and its
/// target handler, all owned by the one thread that drives it.
///
/// The kernel requires that a queue's FETCH/COMMIT commands come from the task that
/// issued its first FETCH, so nothing here is shared or locked. Generic over the
/// handler and the command source, and `@inlinable`, so the daemon's queue (made in
/// `Target.serveQueue`) and the host tests' and benchmark's queue are this same code,
/// specialised: no existential call per request.
public final class Queue<Handler: QueueHandler, Source: CommandSource> {
    @usableFromInline let ring: IORing
    @usableFromInline let source: Source
    let handler: Handler
    /// `handler` again, called through `_withUnsafeGuaranteedRef`: the field above keeps
    /// it alive for the queue's lifetime, and a call through the strong field costs a
    /// retain/release pair per request (the optimiser cannot see that it need not).
    @usableFromInline let handlerReference: Unmanaged<Handler>
    @usableFromInline let buffers: AlignedBuffer
    @usableFromInline let requests: UnsafeMutableBufferPointer<IORequest>
    /// Zero-copy fallback, per tag: the queue registered the request's pages itself, and
    /// the result to commit once they are unregistered.
    @usableFromInline let registeredByQueue: UnsafeMutableBufferPointer<Bool>
    @usableFromInline let resultAfterUnregister: UnsafeMutableBufferPointer<Int32>
    @usableFromInline let limits: DeviceLimits
    /// The device size as `ublk resize` changes it; overrides `limits.sectors` when set.
    @usableFromInline let capacity: DeviceCapacity?
    @usableFromInline let queueID: UInt16
    @usableFromInline let logger: Logger
    /// Commands the kernel has not ended yet (`CommandSource.commandsAtStart`, then
    /// `batchCompleted`): the queue runs until there are none. (Only the queue's thread
    /// touches it, never with overlapping accesses: no dynamic exclusivity check needed.)
    @usableFromInline @exclusivity(unchecked) var live: Int
    /// Room for the requests one `.queue` completion finishes (`FinishedRequests`).
    @usableFromInline let finishedStorage: UnsafeMutableBufferPointer<(tag: UInt16, result: Int32)>
    /// Commits are linked behind a request's last backing operation (`RequestStep.finishing`)
    /// only where the kernel copies a linked command's SQE at submission.
    @usableFromInline let linksCommits = IORing.copiesLinkedCommands
    /// How long a turn spins for a completion before it sleeps (`QueueConfiguration.pollMicroseconds`).
    @usableFromInline @exclusivity(unchecked) var poll: BusyPoll
    /// Per tag: where its request is (`TagState`). With busy polling `busyTags` counts the
    /// `.held` ones: turns spin only while there is at most one (with more in flight the
    /// wait is short anyway, and a sleep gathers their completions into one turn).
    @usableFromInline let tagStates: UnsafeMutableBufferPointer<TagState>
    @usableFromInline @exclusivity(unchecked) var busyTags = 0
    /// Set when a turn failed (`fail`): the queue then answers every request it holds or
    /// gets with EIO until the kernel ends its commands, and `run` throws this at the end.
    @usableFromInline @exclusivity(unchecked) var failure: SystemError?
    /// `failure != nil`, as one byte the hot path tests.
    @usableFromInline @exclusivity(unchecked) var failed = false
    /// Told once, at once, when the queue fails (the server stops the device there).
    public var onFailure: (SystemError) -> Void = { _ in }
    public let depth: Int
    /// The tags this queue's thread serves (`fetchAll` fetches only these).
    @usableFromInline let share: TagShare

    /// A queue on `ring` (its fixed files already registered: 0 is /dev/ublkcN, then the target's).
    public init(ring: consuming IORing, source: Source, handler: Handler, queueID: UInt16, depth: Int,
                buffers mode: TagBufferMode, limits: DeviceLimits, capacity: DeviceCapacity? = nil,
                pollMicroseconds: Int = 0, share: TagShare = .all, logger: Logger) throws(SystemError) {
        let bytesPerTag = mode.bytesPerTag
        buffers = try AlignedBuffer(count: share.slotCount(depth: depth) * bytesPerTag)
        requests = .allocate(capacity: depth)
        for tag in 0..<depth {
            let data: RequestData = bytesPerTag > 0
                ? .buffer(buffers.base + share.slot(of: tag) * bytesPerTag) : .registered(index: UInt16(tag), offset: 0)
            (requests.baseAddress! + tag).initialize(to: IORequest(
                tag: UInt16(tag), descriptor: IODescriptor(operation: .flush, startSector: 0, sectorCount: 0),
                data: data))
        }
        registeredByQueue = .allocate(capacity: depth)
        registeredByQueue.initialize(repeating: false)
        resultAfterUnregister = .allocate(capacity: depth)
        resultAfterUnregister.initialize(repeating: 0)
        tagStates = .allocate(capacity: depth)
        tagStates.initialize(repeating: .withKernel)
        self.ring = ring
        self.source = source
        self.handler = handler
        handlerReference = .passUnretained(handler)
        self.queueID = queueID
        self.depth = depth
        self.share = share
        self.limits = limits
        self.capacity = capacity
        poll = BusyPoll(microseconds: pollMicroseconds)
        self.logger = logger
        live = source.commandsAtStart(depth: share.tagCount(depth: depth))
        finishedStorage = .allocate(capacity: depth)
    }

    deinit {
        // First, while the ring and the tag buffers are still there.
        handler.queueEnding()
        requests.deallocate()
        registeredByQueue.deallocate()
        resultAfterUnregister.deallocate()
        tagStates.deallocate()
        finishedStorage.deallocate()
    }

    /// The buffer of `tag` (copy mode).
    public func buffer(tag: Int) -> UnsafeMutableRawPointer { requests[tag].buffer }

    /// Fetches every tag of the thread's share and hands the fetches to the kernel. START_DEV
    /// waits for exactly this.
    /// A command the kernel answers at once (a batched PREP) is looked at here, so a
    /// refused one fails the queue's setup rather than its first turn.
    @inlinable
    public func fetchAll() throws(SystemError) {
        for tag in share.tags(depth: depth) { try source.fetch(requests[tag], ring.handle) }
        _ = try source.flush(ring.handle)
        try ring.handle.submit()
        try reapReady()
    }

    /// Serves requests until the kernel retires every tag (STOP_DEV, device removal).
    /// Throws what made a turn fail, once the queue has wound down after it (`fail`).
    @inlinable
    public func run() throws(SystemError) {
        while live > 0 { try turn() }
        if let failure { throw failure }
    }

    /// One turn of the loop: one `io_uring_enter` that submits what is queued and waits
    /// for a completion (spinning for it first, with busy polling), then every ready
    /// completion, reaped in batches. Always inlined into the loop that repeats it (`run`,
    /// the offline queue's `reap`): at queue depth 1 there are one or two turns per request
    /// (two where commits are not linked), and a call per turn costs its prologue and spills.
    @inlinable @inline(__always)
    public func turn() throws(SystemError) {
        do {
            let answeredDuring = try source.flush(ring.handle)
            if poll.nanoseconds > 0 {
                try submitPolling(waitingFor: 1 + answeredDuring)
            } else {
                try ring.handle.submit(waitingFor: 1 + answeredDuring)
            }
            try reapReady()
        } catch {
            try fail(error)
        }
    }

    /// A turn failed: the ring refused a submission, the kernel a batched command, or the
    /// handler lost track of its state. The queue cannot serve on, but it must not leave
    /// with requests in its hands: 7.x fails those only when /dev/ublkcN closes (6.12 also
    /// when the ring's commands are cancelled), so STOP_DEV, which waits for them, would
    /// wait forever. So every request it holds is answered with EIO now, every
    /// one that arrives later at once, and the queue runs on until the kernel ends its
    /// commands. A second failure ends it at once: the ring itself is lost.
    /// (A request whose backing I/O is still in flight is answered too, without waiting for
    /// it: a network target's may never come. Such a write may then take a later request's
    /// data from the tag's buffer: its range is undefined, as a failed write's is on a disk.)
    @usableFromInline
    func fail(_ error: SystemError) throws(SystemError) {
        guard !failed else { throw error }
        (failure, failed) = (error, true)
        logger.error("queue \(queueID) failed: \(error); its requests fail with EIO until the device stops")
        onFailure(error)
        for tag in share.tags(depth: depth) where tagStates[tag] == .held { try finish(tag: tag, result: -EIO) }
    }

    /// The submission of a turn with busy polling, out of line: it keeps the turn loop
    /// small enough for the optimiser to inline the reaping into it. Spins only for a
    /// request alone in the queue's hands (`busyTags`), and as the back-off allows.
    @usableFromInline
    func submitPolling(waitingFor count: UInt32) throws(SystemError) {
        let window = busyTags <= 1 ? poll.window() : 0
        let found = try ring.handle.submit(waitingFor: count, spinningFor: window)
        if window > 0 { poll.spun(found: found) }
    }

    /// Handles every completion that is ready, without waiting.
    @inlinable @inline(__always)
    func reapReady() throws(SystemError) {
        try ring.handle.reapWithFlags { (userData, result, flags) throws(SystemError) in
            try self.completed(UserData(rawValue: userData), result: result, flags: flags)
        }
    }

    @inlinable @inline(__always)
    func completed(_ userData: UserData, result: Int32, flags: UInt32) throws(SystemError) {
        let tag = Int(userData.tag)
        switch userData.kind {
        case .command where CommandStep.isBatch(userData.step):
            live += try source.batchCompleted(step: userData.step, tag: userData.tag, result: result, flags: flags,
                                              ring.handle) { (tag) throws(SystemError) in try self.arrived(tag: tag) }
        case .command where tag < depth && userData.step == CommandStep.fetch:
            try commandCompleted(tag: tag, result: result)
        case .command where tag < depth && userData.step == CommandStep.linkedCommit:
            // Canceled: the backing operation ended short or failed, and its own completion
            // carries the request on. (Kernels post none for the canceled commit: the skip
            // of the failed operation's completion passes on to its links.)
            if result != -ECANCELED { try commandCompleted(tag: tag, result: result) }
        case .command where tag < depth:
            try bufferCommandCompleted(tag: tag, step: userData.step, result: result)
        case .target where tag < depth:
            source.backingCompleted(tag: tag)
            // A completion behind a linked commit: the link broke, the request is back.
            if tagStates[tag] == .linked { setState(tag, .held) }
            try step(tag: tag, backingResult: result)
        case .queue where !failed:
            try queueOperationCompleted(step: userData.step, result: result)
        case .queue:
            break  // The handler is abandoned (`fail`): its requests were answered.
        case .command, .target, nil:
            break
        }
    }

    /// A handler's operation of the queue itself completed: the handler says which
    /// requests it finished, and they are committed here.
    @inlinable
    func queueOperationCompleted(step: UInt16, result: Int32) throws(SystemError) {
        let io = BackingSubmitter(ring: ring.handle, userData: UserData(.queue, tag: 0, step: step))
        var finished = FinishedRequests(storage: finishedStorage)
        let outcome = handlerReference._withUnsafeGuaranteedRef { handler in
            Result { () throws(SystemError) in
                try handler.queueOperationCompleted(step: step, result: result, io, finished: &finished)
            }
        }
        for index in 0..<finished.count {
            let (tag, value) = finished.storage[index]
            if value < 0 { logFailure(tag: Int(tag), result: value) }
            try commit(tag: Int(tag), result: value)
        }
        try outcome.get()
    }

    /// A FETCH or COMMIT_AND_FETCH completed: a new request, or the end of the tag
    /// (-ENODEV: the device stops, or is quiesced for a new server to take it over).
    @inlinable
    func commandCompleted(tag: Int, result: Int32) throws(SystemError) {
        guard result == Int32(UBLK_IO_RES_OK) else {
            if result != -ENODEV { logCommandFailure(tag: tag, result: result) }
            live -= 1
            return
        }
        if source.requestArrived(tag: tag) { try arrived(tag: tag) }
    }

    /// The request the source holds for `tag` is new: decode it, refuse what the device
    /// cannot hold, else hand it to the target. Always inlined: once per request, into the
    /// command completion of the turn loop (and the offline queue's `start`).
    @inlinable @inline(__always)
    public func arrived(tag: Int) throws(SystemError) {
        setState(tag, .held)
        var limits = self.limits
        if let capacity { limits.sectors = capacity.sectors }
        switch IODescriptor(raw: source.descriptor(tag: tag)).validated(for: limits) {
        case .failure(let error):
            logRefusal(tag: tag, error)
            try commit(tag: tag, result: -error.errno)
        case .success(let descriptor):
            requests[tag].descriptor = descriptor
            // (A failed queue answers at once, pages registered or not.)
            if descriptor.flags.contains(.needsBufferRegistration) && !failed {
                try source.registerBuffer(requests[tag], ring.handle)
                setState(tag, .registering)
                return
            }
            try step(tag: tag, backingResult: nil)
        }
    }

    /// Zero-copy fallback: the queue's own REGISTER_IO_BUF (then the request starts) or
    /// UNREGISTER_IO_BUF (then it is committed) completed.
    @usableFromInline
    func bufferCommandCompleted(tag: Int, step commandStep: UInt16, result: Int32) throws(SystemError) {
        if commandStep == CommandStep.registered {
            setState(tag, .held)
            if result < 0 {
                logger.error("queue \(queueID) tag \(tag): REGISTER_IO_BUF failed: \(SystemError("", errno: result).reason)")
                return try commit(tag: tag, result: result)
            }
            registeredByQueue[tag] = true
            return try step(tag: tag, backingResult: nil)
        }
        if result < 0 {
            logger.error("queue \(queueID) tag \(tag): UNREGISTER_IO_BUF failed: \(SystemError("", errno: result).reason)")
        }
        try commit(tag: tag, result: resultAfterUnregister[tag])
    }

    /// Sends the commit of `tag`'s request, which leaves the queue's hands.
    @inlinable @inline(__always)
    func commit(tag: Int, result: Int32) throws(SystemError) {
        // Once the commit is prepared: one that could not be stays the queue's to answer.
        try source.commit(requests[tag], result: result, step: CommandStep.fetch, ring.handle)
        setState(tag, .withKernel)
    }

    /// Moves `tag` to `state`, keeping `busyTags` the count of `.held` tags (only with busy
    /// polling, its one reader).
    @inlinable @inline(__always)
    func setState(_ tag: Int, _ state: TagState) {
        if poll.nanoseconds > 0, (tagStates[tag] == .held) != (state == .held) {
            busyTags += state == .held ? 1 : -1
        }
        tagStates[tag] = state
    }

    /// Completes the tag's request: a commit, after unregistering pages the queue registered
    /// itself. The request leaves the handler's hands here, before the unregistering.
    @inlinable
    func finish(tag: Int, result: Int32) throws(SystemError) {
        if registeredByQueue[tag] {
            resultAfterUnregister[tag] = result
            try source.unregisterBuffer(requests[tag], ring.handle)
            registeredByQueue[tag] = false
            return setState(tag, .registering)
        }
        try commit(tag: tag, result: result)
    }

    /// Runs one step of the tag's request: its start (`backingResult` nil) or the
    /// completion of its backing I/O. Commits the request if the step finished it, or links
    /// the commit behind the backing operation that will; a step that could not get an SQE
    /// finishes the request with that errno.
    @inlinable @inline(__always)
    func step(tag: Int, backingResult: Int32?) throws(SystemError) {
        if failed { return try abandon(tag: tag) }
        let io = BackingSubmitter(ring: ring.handle, tag: UInt16(tag))
        let requests = self.requests
        let outcome = handlerReference._withUnsafeGuaranteedRef { handler in
            Result { () throws(SystemError) -> RequestStep in
                if let backingResult { return try handler.complete(requests[tag], backingResult: backingResult, io) }
                return try handler.start(requests[tag], io)
            }
        }
        let result: Int32
        switch outcome {
        case .success(.submitted): return
        case .success(.finishing(let expected)):
            // Pages the queue registered itself go back before the commit: no link then.
            guard linksCommits, !registeredByQueue[tag] else { return }
            // The rest is the kernel's: the link commits when the operation completes.
            if try source.linkCommit(requests[tag], result: expected, ring.handle) { setState(tag, .linked) }
            return
        case .success(.done(let value)): result = value
        case .failure(let error):
            logSubmissionFailure(tag: tag, error)
            result = -error.errno
        }
        if result < 0 { logFailure(tag: tag, result: result) }
        try finish(tag: tag, result: result)
    }

    /// A step of a failed queue (`fail`): a request that is the queue's (just arrived, its
    /// pages just registered, or back from a broken link) is answered with EIO; the
    /// completion of one answered already (or whose buffer command is in flight) is dropped.
    @usableFromInline
    func abandon(tag: Int) throws(SystemError) {
        if tagStates[tag] == .held { try finish(tag: tag, result: -EIO) }
    }

    @usableFromInline
    func logSubmissionFailure(tag: Int, _ error: SystemError) {
        logger.error("queue \(queueID) tag \(tag): \(error)")
    }

    @usableFromInline
    func logCommandFailure(tag: Int, result: Int32) {
        // Not the abort of a stopping device: the kernel refused the command itself.
        logger.error("queue \(queueID) tag \(tag): ublk command failed: \(SystemError("", errno: result).reason)")
    }

    @usableFromInline
    func logRefusal(tag: Int, _ error: DescriptorError) {
        logger.error("queue \(queueID) tag \(tag): refused request: \(error)")
    }

    @usableFromInline
    func logFailure(tag: Int, result: Int32) {
        let d = requests[tag].descriptor
        logger.error("queue \(queueID) tag \(tag): \(d.operation) of sectors \(d.startSector)+\(d.sectorCount) failed: \(SystemError("", errno: result).reason)")
    }
}

extension Queue {
    /// A queue's ring, with fixed file 0 (/dev/ublkcN, or a stand-in) and then the target's
    /// files; with zero copy, an empty buffer table with a slot per tag.
    /// With `polling`, the ring flags task work for a thread that busy-polls.
    public static func ring<T: Target>(depth: Int, firstFile: Int32, target: T,
                                       buffers: TagBufferMode = .copy(bytesPerTag: 0),
                                       polling: Bool = false) throws(SystemError) -> IORing {
        // Two SQEs per request: a backing operation and the commit linked behind it.
        let ring = try IORing(entries: UInt32(2 * depth),
                              preferredFlags: polling ? IORing.pollingFlags : IORing.singleThreadFlags)
        try ring.registerFiles([firstFile] + target.fixedFiles)
        if case .autoRegister = buffers { try ring.registerSparseBuffers(depth) }
        return ring
    }
}

extension Queue where Source: DriverCommandSource {
    /// Sets a device's queue up on the calling thread: ring, fixed files (the character
    /// device, then the target's), descriptor mapping, buffers and the target's handler.
    public convenience init<T: Target>(_ configuration: QueueConfiguration, characterDevice: Int32, target: T,
                                       logger: Logger) throws where T.Handler == Handler {
        let depth = configuration.depth
        var ring = try Self.ring(depth: depth, firstFile: characterDevice, target: target, buffers: configuration.buffers,
                                 polling: configuration.pollMicroseconds > 0)
        let source = try Source(configuration, characterDevice: characterDevice, ring: &ring, logger: logger)
        try self.init(ring: ring, source: source,
                      handler: try target.makeQueueHandler(queueID: Int(configuration.queueID), depth: depth,
                                                            share: configuration.share),
                      queueID: configuration.queueID, depth: depth, buffers: configuration.buffers,
                      limits: configuration.limits, capacity: configuration.capacity,
                      pollMicroseconds: configuration.pollMicroseconds, share: configuration.share, logger: logger)
    }
}
