import CLiburing
import Glibc
import Logging
import UblkNBD
import UblkQueue
import UblkSystem

/// One queue's connection to an NBD export: requests go out and replies come back on
/// the queue's own ring, as `.queue` operations (a reply may answer any tag).
///
/// - Sends are one at a time, in arrival order: a request header (and a WRITE's data)
///   must reach the stream whole, and two sends in flight on one socket could interleave
///   when one is short.
/// - One receive is always in flight: the next reply header, or the data of a READ
///   straight into that request's buffer (`NBDReplyParser.pendingReadData`). Replies
///   are matched by cookie: the tag, and in the upper bits a per-tag sequence, so a
///   stale or duplicate reply is an unknown cookie.
/// - A FLUSH is held until every write, trim and write-zeroes that arrived before it
///   has been answered: a FLUSH covers only answered writes.
/// - A connection that dies with answered writes no FLUSH answer covered may have lost
///   them in the server's cache: the next FLUSH fails with EIO, once (`durability`).
/// - If the connection drops (an error, the end of the stream, or a reply that breaks
///   the protocol), the socket is shut down and, once its operations are back, closed;
///   then reconnects are tried with backoff (a timeout SQE between attempts, so the
///   ring keeps turning and a stopping device is noticed), and every unanswered
///   request is sent again on the new connection, but for a write (trim, write-zeroes)
///   sent on a connection we gave up while the server may live on (a silent server, a
///   broken reply): that fails with EIO (`drop`). The reconnect timeout bounds an
///   outage: from the first drop until every request it left waiting is answered, over
///   any number of drops (a request that makes the server hang up is not resent
///   forever). Past it the waiting requests fail with EIO, as does new I/O, while
///   retries go on.
/// - A connection on which requests wait while nothing moves (no reply comes, no send
///   goes out) for the reconnect timeout, and at least 30 s, is given up too
///   (`watchdogFired`): a server that hangs with its TCP connection up is noticed, as the
///   kernel's nbd times out (with `nbd-client -t`). So is one on which a request has
///   waited that long for its reply while one sent after it was answered (a reply the
///   server lost); not for a FLUSH, which may take long over a big cache, nor for a server
///   that answers in order over a slow link. (Not as a crash: its answered writes are not
///   taken as lost.)
/// - Once the device is stopping (`NBDTarget.stopRequested`), nothing waits for a server
///   that is down: its requests fail with EIO at once, as the kernel's nbd fails them on
///   `nbd-client -d`, and no reconnect is tried (for `NBDTarget.stopExpiry`, in case the
///   stop never comes).
public final class NBDQueueHandler: QueueHandler {
    /// The `.queue` operations, told apart by their step.
    enum Step: UInt16 {
        case send = 1, receive, retry, watchdog
        /// The target's `stopping` latch was raised.
        case stop
        /// Stopping mode outlived `stopExpiry`.
        case stopExpired
    }

    enum Phase: Equatable {
        case idle
        /// A FLUSH waiting for the mutations numbered below `barrier` to be answered.
        case heldFlush(barrier: UInt64)
        /// Waiting for its turn to be sent (or for a connection).
        case queued
        case sending
        case awaitingReply
        /// The reply came before the send's own completion was reaped: finished then.
        case repliedWhileSending(errno: Int32)
    }

    struct Slot {
        var phase = Phase.idle
        var request: IORequest?
        var command = NBDRequest(.read, cookie: 0)
        /// Bumped per request on the tag: the upper bits of the cookie.
        var sequence: UInt64 = 0
        /// For writes, trims and write-zeroes: their arrival number (FLUSH barriers).
        var mutation: UInt64 = 0
        var isMutation = false
        /// Bytes of header and data already sent.
        var sent = 0
        /// Left waiting by a lost connection: belongs to the current outage.
        var caught = false
        /// For a FLUSH: the count of answered writes on its connection when it was sent.
        var covers: UInt64 = 0
        /// When it was sent whole (`awaitingReply` since): the watchdog's measure of one request.
        var sentAt = ContinuousClock.now
        var cookie: UInt64 { UInt64(command.cookie) }
    }

    enum Connection {
        case up
        /// Shut down; closed once its send and receive are back.
        case draining
        /// Closed; a retry timer is pending.
        case down
        /// Down past the reconnect timeout: I/O fails at once, retries go on.
        case failed
    }

    let target: NBDTarget
    let queueID: Int
    let logger = Logger(label: "ublk")
    let budget: Duration
    var socket: FileDescriptor?
    var socketNumber: Int32
    var connection = Connection.up
    var parser = NBDReplyParser()
    var slots: [Slot]
    /// Tags waiting to be sent, oldest first (a ring of `depth` entries).
    var sendQueue: [UInt16]
    var sendHead = 0, sendCount = 0
    var sending = false, receiving = false, receivingReadData = false
    /// Header bytes the parser still needs for the reply it is reading.
    var headerMissing = NBDSimpleReplyHeader.size
    var nextMutation: UInt64 = 0
    var heldFlushes = 0
    /// The current outage's waits and deadline: kept across drops until no request it
    /// caught is still waiting, so the budget bounds a wait however often the server hangs up.
    var outage: NBDReconnectBackoff?
    /// Requests the outage caught that still wait.
    var caughtCount = 0
    /// The export has a write cache (SEND_FLUSH): an answered write is not yet durable.
    let volatileCache: Bool
    /// Writes, trims and write-zeroes answered on this connection (without FUA), and how
    /// many of them an answered FLUSH covers.
    var answeredWrites: UInt64 = 0, flushedWrites: UInt64 = 0
    /// A connection the server did not crash ended with answered writes no FLUSH covered
    /// (a FLUSH on another connection need not cover them, without CAN_MULTI_CONN).
    var unflushedCarried = false
    /// A connection died with answered writes no FLUSH covered (or the server before this
    /// one lost some: `NBDTarget.writesWereLost`): the next FLUSH fails. Counted in the
    /// target's `lossPending`, so that a server taking the device over is told.
    var lostWrites = false {
        didSet { if lostWrites != oldValue { target.lossPending.add(lostWrites ? 1 : -1, ordering: .relaxed) } }
    }
    // Memory the kernel reads or writes while an operation is in flight: never moves.
    let headers: UnsafeMutableRawPointer
    let replyHeader: UnsafeMutableRawPointer
    let message: UnsafeMutablePointer<msghdr>
    let vectors: UnsafeMutablePointer<iovec>
    let timer: UnsafeMutablePointer<__kernel_timespec>
    var started = false
    /// When the connection last moved: a reply came in, a send went out, or it came up.
    var lastProgress = ContinuousClock.now
    /// The latest `sentAt` of a request answered on this connection: one sent before it
    /// and still unanswered was passed over.
    var latestAnswered: ContinuousClock.Instant?
    /// The watchdog's timer is pending (`watchdogTimer`, armed while requests are sent).
    var watchdogArmed = false
    let watchdogTimer: UnsafeMutablePointer<__kernel_timespec>
    /// The device is stopping: no reconnects, and waits for a server that is down are cut
    /// short (`stopRequested`).
    var stopping = false
    let stopTimer: UnsafeMutablePointer<__kernel_timespec>

    init(socket: consuming FileDescriptor, target: NBDTarget, queueID: Int, depth: Int) {
        socketNumber = socket.rawValue
        self.socket = consume socket
        self.target = target
        self.queueID = queueID
        budget = .seconds(target.configuration.reconnectTimeout)
        volatileCache = target.properties.volatileCache
        slots = Array(repeating: Slot(), count: depth)
        sendQueue = Array(repeating: 0, count: depth)
        headers = .allocate(byteCount: depth * 32, alignment: 8)
        replyHeader = .allocate(byteCount: NBDSimpleReplyHeader.size, alignment: 8)
        message = .allocate(capacity: 1)
        message.initialize(to: msghdr())
        vectors = .allocate(capacity: 2)
        vectors.initialize(repeating: iovec(), count: 2)
        timer = .allocate(capacity: 1)
        timer.initialize(to: __kernel_timespec())
        watchdogTimer = .allocate(capacity: 1)
        watchdogTimer.initialize(to: __kernel_timespec())
        stopTimer = .allocate(capacity: 1)
        stopTimer.initialize(to: __kernel_timespec())
        // (An initializer's assignment runs no `didSet`: counted here.)
        if target.lossInherited.load(ordering: .relaxed) {
            lostWrites = true
            target.lossPending.add(1, ordering: .relaxed)
        }
    }

    deinit {
        if volatileCache && (unflushedCarried || answeredWrites > flushedWrites) { target.unflushed.add(1, ordering: .relaxed) }
        if case .up = connection, let socket = socket.take() { try? NBDTarget.disconnect(socket) }
        headers.deallocate()
        replyHeader.deallocate()
        message.deallocate()
        vectors.deallocate()
        timer.deallocate()
        watchdogTimer.deallocate()
        stopTimer.deallocate()
    }

    // MARK: Requests

    public func start(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        if !started {
            // The first request is the first chance to use the ring: start receiving, and
            // watching for the device to stop.
            started = true
            try receiveNext(io.forQueue(step: Step.receive.rawValue))
            try io.forQueue(step: Step.stop.rawValue).poll(file: target.stopping.descriptor, events: Int16(POLLIN))
        }
        if case .failed = connection { return .done(-EIO) }
        let tag = Int(request.tag)
        guard let command = command(for: request, tag: tag) else {
            return .done(request.descriptor.operation == .write && target.properties.readOnly ? -EROFS : -EOPNOTSUPP)
        }
        slots[tag].request = request
        slots[tag].command = command
        slots[tag].isMutation = command.command != .read && command.command != .flush
        if slots[tag].isMutation {
            slots[tag].mutation = nextMutation
            nextMutation += 1
        }
        if command.command == .flush && oldestMutationInFlight() != nil {
            slots[tag].phase = .heldFlush(barrier: nextMutation)
            heldFlushes += 1
            return .submitted
        }
        try enqueue(tag: tag, io.forQueue(step: Step.send.rawValue))
        return .submitted
    }

    public func complete(_ request: IORequest, backingResult: Int32, _ io: BackingSubmitter) -> RequestStep {
        .done(backingResult) // no per-request operations: everything goes through the connection
    }

    /// The NBD request for a ublk request, with a fresh cookie; nil when the export cannot take it.
    func command(for request: IORequest, tag: Int) -> NBDRequest? {
        let d = request.descriptor
        let operation: BlockRequest.Operation
        switch d.operation {
        case .read: operation = .read
        case .write: operation = .write
        case .flush: operation = .flush
        case .discard: operation = .discard
        case .writeZeroes: operation = .writeZeroes
        case .unsupported: return nil
        }
        if operation != .read && target.properties.readOnly { return nil }
        guard d.byteCount <= Int(UInt32.max) else { return nil }
        var flags: BlockRequest.Flags = []
        if d.flags.contains(.fua) { flags.insert(.fua) }
        if d.flags.contains(.noUnmap) { flags.insert(.noUnmap) }
        slots[tag].sequence &+= 1
        let cookie = UInt64(tag) | slots[tag].sequence << 16
        let block = BlockRequest(operation, flags: flags, offset: UInt64(bitPattern: d.byteOffset), length: UInt32(d.byteCount))
        return target.export.request(for: block, cookie: cookie)
    }

    /// The arrival number of the oldest write, trim or write-zeroes not yet answered.
    func oldestMutationInFlight() -> UInt64? {
        var oldest: UInt64?
        for slot in slots where slot.isMutation && slot.phase != .idle {
            oldest = min(oldest ?? slot.mutation, slot.mutation)
        }
        return oldest
    }

    /// Marks `tag` ready to send and sends it if the connection is idle.
    func enqueue(tag: Int, _ io: BackingSubmitter) throws(SystemError) {
        slots[tag].phase = .queued
        guard case .up = connection else { return catchWaiting(tag: tag) } // sent when the connection is back
        sendQueue[(sendHead + sendCount) % sendQueue.count] = UInt16(tag)
        sendCount += 1
        try sendNext(io)
    }

    /// The result a finished request completes with.
    func result(tag: Int, errno: Int32) -> Int32 {
        if errno != 0 { return -errno }
        let command = slots[tag].command.command
        return command == .read || command == .write ? Int32(slots[tag].command.length) : 0
    }

    /// Finishes `tag`: its request completes, and FLUSHes it held back may go.
    func finish(tag: Int, errno: Int32, _ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        let errno = volatileCache ? durability(tag: tag, errno: errno) : errno
        finished.append(tag: UInt16(tag), result: result(tag: tag, errno: errno))
        slots[tag].phase = .idle
        slots[tag].request = nil
        if slots[tag].caught { answeredAfterOutage(tag: tag) }
        if slots[tag].isMutation && heldFlushes > 0 { try releaseFlushes(io) }
    }

    /// The errno `tag` finishes with, counting what a crash of the server could lose:
    /// writes answered on this connection that no answered FLUSH covers. After a connection
    /// died with some, the next FLUSH fails with EIO, once, as the kernel fails a flush
    /// after a lost write-back: the file system learns of it rather than trusting the FLUSH.
    func durability(tag: Int, errno: Int32) -> Int32 {
        let command = slots[tag].command
        switch command.command {
        case .flush where lostWrites:
            lostWrites = false
            return EIO
        case .flush where errno == 0:
            flushedWrites = max(flushedWrites, slots[tag].covers)
        case .write, .trim, .writeZeroes:
            if errno == 0 && !command.flags.contains(.fua) { answeredWrites += 1 }
        default: break
        }
        return errno
    }

    /// Sends the held FLUSHes whose writes have all been answered.
    func releaseFlushes(_ io: BackingSubmitter) throws(SystemError) {
        let oldest = oldestMutationInFlight() ?? .max
        for tag in slots.indices {
            guard case .heldFlush(let barrier) = slots[tag].phase, oldest >= barrier else { continue }
            heldFlushes -= 1
            try enqueue(tag: tag, io.forQueue(step: Step.send.rawValue))
        }
    }

    // MARK: The connection's operations

    public func queueOperationCompleted(step: UInt16, result: Int32, _ io: BackingSubmitter,
                                        finished: inout FinishedRequests) throws(SystemError) {
        switch Step(rawValue: step) {
        case .send: try sendCompleted(result, io, &finished)
        case .receive: try receiveCompleted(result, io, &finished)
        case .retry: try retry(io, &finished)
        case .watchdog: try watchdogFired(result, io, &finished)
        case .stop: try stopRequested(result, io, &finished)
        case .stopExpired: try stopExpired(io, &finished)
        case nil: break
        }
    }

    /// Starts sending the oldest queued request, unless a send is in flight.
    func sendNext(_ io: BackingSubmitter) throws(SystemError) {
        guard case .up = connection, !sending, sendCount > 0 else { return }
        let tag = Int(sendQueue[sendHead])
        let header = headers + tag * 32
        slots[tag].command.encode(into: UnsafeMutableRawBufferPointer(start: header, count: NBDRequest.headerSize))
        slots[tag].phase = .sending
        slots[tag].sent = 0
        slots[tag].covers = answeredWrites
        try submitSend(tag: tag, io.forQueue(step: Step.send.rawValue))
        if !watchdogArmed { try armWatchdog(after: watchdogPeriod, io) }
    }

    /// Sends what is left of `tag`'s header and data.
    func submitSend(tag: Int, _ io: BackingSubmitter) throws(SystemError) {
        let command = slots[tag].command
        let sent = slots[tag].sent
        var count = 0
        if sent < NBDRequest.headerSize {
            vectors[0] = iovec(iov_base: headers + tag * 32 + sent, iov_len: NBDRequest.headerSize - sent)
            count = 1
        }
        if command.carriesData, let buffer = slots[tag].request?.buffer {
            let dataSent = max(0, sent - NBDRequest.headerSize)
            vectors[count] = iovec(iov_base: buffer + dataSent, iov_len: Int(command.length) - dataSent)
            count += 1
        }
        message.pointee = msghdr()
        message.pointee.msg_iov = vectors
        message.pointee.msg_iovlen = count
        sending = true
        try io.sendMessage(socket: socketNumber, message, flags: Int32(MSG_WAITALL))
    }

    func sendCompleted(_ result: Int32, _ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        sending = false
        guard case .up = connection else { return try closeIfDrained(io, &finished) }
        if result < 0 {
            return try drop("send failed: \(SystemError("", errno: -result).reason)", io, &finished,
                            serverHungUp: Self.isHangUp(-result))
        }
        if result > 0 { lastProgress = .now }
        let tag = Int(sendQueue[sendHead])
        slots[tag].sent += Int(result)
        let total = NBDRequest.headerSize + (slots[tag].command.carriesData ? Int(slots[tag].command.length) : 0)
        if slots[tag].sent < total {
            if case .repliedWhileSending = slots[tag].phase {
                return try drop("the server answered a request before it was sent whole", io, &finished)
            }
            return try submitSend(tag: tag, io)
        }
        sendHead = (sendHead + 1) % sendQueue.count
        sendCount -= 1
        if case .repliedWhileSending(let errno) = slots[tag].phase {
            try finish(tag: tag, errno: errno, io, &finished)
        } else {
            slots[tag].phase = .awaitingReply
            slots[tag].sentAt = .now
        }
        try sendNext(io)
    }

    /// Receives the rest of the current reply header, or the current READ's data.
    func receiveNext(_ io: BackingSubmitter) throws(SystemError) {
        guard case .up = connection, !receiving else { return }
        receiving = true
        if let data = parser.pendingReadData {
            receivingReadData = true
            try io.receive(socket: socketNumber, into: data.baseAddress!, count: data.count, flags: Int32(MSG_WAITALL))
        } else {
            receivingReadData = false
            let offset = NBDSimpleReplyHeader.size - headerMissing
            try io.receive(socket: socketNumber, into: replyHeader + offset, count: headerMissing, flags: Int32(MSG_WAITALL))
        }
    }

    func receiveCompleted(_ result: Int32, _ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        receiving = false
        guard case .up = connection else { return try closeIfDrained(io, &finished) }
        if result < 0 {
            return try drop("receive failed: \(SystemError("", errno: -result).reason)", io, &finished,
                            serverHungUp: Self.isHangUp(-result))
        }
        if result == 0 {
            do throws(NBDProtocolViolation) { try parser.endOfStream() } catch {
                return try drop("\(error)", io, &finished, serverHungUp: true)
            }
            return try drop("the server closed the connection", io, &finished, serverHungUp: true)
        }
        lastProgress = .now
        var replies = Replies(handler: self)
        do {
            if receivingReadData {
                parser.readDataArrived(Int(result), to: &replies)
            } else {
                let offset = NBDSimpleReplyHeader.size - headerMissing
                headerMissing -= Int(result)
                if headerMissing == 0 { headerMissing = NBDSimpleReplyHeader.size }
                try parser.feed(UnsafeRawBufferPointer(start: replyHeader + offset, count: Int(result)), to: &replies)
            }
        } catch {
            try complete(replies.answered, io, &finished)
            return try drop("\(error)", io, &finished)
        }
        try complete(replies.answered, io, &finished)
        try receiveNext(io)
    }

    /// Finishes the requests a receive answered (at most one: a receive ends at a reply's end).
    func complete(_ answered: (tag: Int, errno: Int32)?, _ io: BackingSubmitter,
                  _ finished: inout FinishedRequests) throws(SystemError) {
        guard let (tag, errno) = answered else { return }
        if errno == Int32(NBDErrorNumber.eshutdown) { return try serverShuttingDown(io, &finished) }
        if slots[tag].phase == .awaitingReply { latestAnswered = max(latestAnswered ?? slots[tag].sentAt, slots[tag].sentAt) }
        if slots[tag].phase == .sending {
            slots[tag].phase = .repliedWhileSending(errno: errno)
        } else {
            try finish(tag: tag, errno: errno, io, &finished)
        }
    }

    /// The parser's view of the requests in flight.
    struct Replies: NBDInFlightRequests {
        unowned let handler: NBDQueueHandler
        var answered: (tag: Int, errno: Int32)?

        mutating func expectedReply(cookie: UInt64) -> NBDExpectedReply? {
            let tag = Int(cookie & 0xffff)
            guard tag < handler.slots.count, handler.slots[tag].cookie == cookie,
                  handler.slots[tag].phase == .sending || handler.slots[tag].phase == .awaitingReply,
                  let request = handler.slots[tag].request else { return nil }
            let command = handler.slots[tag].command
            guard command.command == .read else { return .noData }
            return .readData(into: UnsafeMutableRawBufferPointer(start: request.buffer, count: Int(command.length)))
        }

        mutating func replyCompleted(cookie: UInt64, errno: Int32) {
            answered = (Int(cookie & 0xffff), errno)
        }
    }
}

// MARK: Losing and regaining the connection

extension NBDQueueHandler {
    /// The connection is unusable: shut it down (its pending operations come back) and
    /// keep every unanswered request for the next connection, within the outage's budget.
    /// `serverMayHaveCrashed` false: we hang up on a server that is alive, whose cache keeps
    /// the writes it answered (a FLUSH on the next connection covers them).
    /// `serverHungUp`: the server ended the connection (the end of the stream, a reset),
    /// so nothing sent on it is applied later. Otherwise (we give up on a silent server or a
    /// broken reply) a write, trim or write-zeroes sent on it fails with EIO, as the
    /// kernel's nbd fails it, rather than going again: the server may still apply the old
    /// copy (from its socket, or a proxy's) after a later write to the same blocks was
    /// answered on the new connection, and undo it.
    func drop(_ reason: String, _ io: BackingSubmitter, _ finished: inout FinishedRequests,
              serverMayHaveCrashed: Bool = true, serverHungUp: Bool = false) throws(SystemError) {
        guard case .up = connection else { return }
        logger.warning("queue \(queueID): connection to \(target.address.endpoint) lost: \(reason): \(stopping ? "not reconnecting, the device is stopping" : "reconnecting")")
        socket?.shutdown()
        connection = .draining
        sendCount = 0
        var failedMutations = 0
        for tag in slots.indices {
            switch slots[tag].phase {
            // Answered, but the send did not complete: a failure stands; a success is not
            // believed (a write's data may not all have gone), the request goes again.
            case .repliedWhileSending(let errno) where errno != 0:
                try finish(tag: tag, errno: errno, io, &finished)
                continue
            case .sending, .awaitingReply, .repliedWhileSending:
                if slots[tag].isMutation && !serverHungUp {
                    failedMutations += 1
                    try finish(tag: tag, errno: EIO, io, &finished)
                    continue
                }
                slots[tag].phase = .queued
            default: break
            }
            if slots[tag].phase != .idle { catchWaiting(tag: tag) }
        }
        if failedMutations > 0 {
            logger.error("queue \(queueID): \(failedMutations) write(s) sent to \(target.address.endpoint) failed with EIO: the server may still apply them, so they are not sent again")
        }
        if answeredWrites > flushedWrites {
            // A live server still holds them in its cache: the device's last sync flushes them.
            if serverMayHaveCrashed { lostWrites = true } else { unflushedCarried = true }
        }
        answeredWrites = 0
        flushedWrites = 0
        if outage == nil { outage = NBDReconnectBackoff(from: .now, budget: budget) }
        try closeIfDrained(io, &finished)
    }

    /// Whether a send or receive that failed with `errno` means the server's end is gone
    /// (reset, or closed under a send), rather than the path to it or our own shutdown.
    static func isHangUp(_ errno: Int32) -> Bool { errno == ECONNRESET || errno == EPIPE }

    /// `tag` waits for a connection: it belongs to the outage until answered.
    func catchWaiting(tag: Int) {
        guard !slots[tag].caught else { return }
        slots[tag].caught = true
        caughtCount += 1
    }

    /// A request the outage caught was answered: once none waits on a working connection,
    /// the outage is over and the next drop has the whole budget again.
    func answeredAfterOutage(tag: Int) {
        slots[tag].caught = false
        caughtCount -= 1
        if caughtCount == 0, case .up = connection { outage = nil }
    }

    /// NBD_ESHUTDOWN: the server is going away and did not serve the request. The protocol
    /// asks for a soft disconnect: DISC (unless a send in flight could tangle with it),
    /// then the connection is dropped and the request waits for the next one, as for any
    /// lost connection, within the outage's budget.
    func serverShuttingDown(_ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        if !sending {
            withUnsafeTemporaryAllocation(byteCount: NBDRequest.headerSize, alignment: 8) { header in
                NBDRequest(.disconnect, cookie: 0).encode(into: header)
                _ = Glibc.send(socketNumber, header.baseAddress, header.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            }
        }
        // (It goes away, ending the connection: nothing sent on it is applied later.)
        try drop("the server is shutting down (NBD_ESHUTDOWN)", io, &finished, serverHungUp: true)
    }

    /// Once no operation uses the old socket: close it and wait before the next reconnect,
    /// or fail what waits if the outage's budget is spent.
    func closeIfDrained(_ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        guard case .draining = connection, !sending, !receiving else { return }
        socket = nil
        connection = .down
        guard !stopping, let delay = outage?.delay(at: .now) else { return try giveUp(io, &finished) }
        try schedule(after: delay, io)
    }

    func schedule(after delay: Duration, _ io: BackingSubmitter) throws(SystemError) {
        try start(timer, after: delay, step: .retry, io)
    }

    /// A timeout SQE on `timer` (which the kernel reads until it fires) for `delay`,
    /// completing as the queue operation `step`.
    func start(_ timer: UnsafeMutablePointer<__kernel_timespec>, after delay: Duration, step: Step,
               _ io: BackingSubmitter) throws(SystemError) {
        let (seconds, attoseconds) = delay.components
        timer.pointee = __kernel_timespec(tv_sec: seconds, tv_nsec: attoseconds / 1_000_000_000)
        try io.forQueue(step: step.rawValue).timeout(timer)
    }

    /// The retry timer fired: one connect (bounded, a few seconds at most), then either
    /// resend everything or wait again; past the budget, fail what waits.
    func retry(_ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        guard !stopping else { return } // (`giveUp` failed what waited: the device goes)
        let failed = if case .failed = connection { true } else { false }
        let left = outage.map { ContinuousClock.now.duration(to: $0.deadline) } ?? .seconds(2)
        do throws(NBDError) {
            reconnected(try target.connectAgain(timeout: max(.milliseconds(500), min(.seconds(2), left))))
        } catch {
            if !error.isTransient { logger.error("queue \(queueID): \(error)") }
        }
        if case .up = connection {
            logger.notice("queue \(queueID): reconnected to \(target.address.endpoint)")
            return try resend(io)
        }
        if failed { return try schedule(after: .seconds(5), io) }
        guard let delay = outage?.delay(at: .now) else { return try giveUp(io, &finished) }
        try schedule(after: delay, io)
    }

    /// How long requests may wait on a connection on which nothing moves: the reconnect
    /// timeout, and at least `NBDTarget.minimumSilence`.
    var watchdogPeriod: Duration { max(budget, target.minimumSilence) }

    func armWatchdog(after delay: Duration, _ io: BackingSubmitter) throws(SystemError) {
        try start(watchdogTimer, after: delay, step: .watchdog, io)
        watchdogArmed = true
    }

    /// The watchdog's timer fired: if requests wait on the connection and nothing moved on
    /// it for `watchdogPeriod`, or one request (not a FLUSH) passed over by the server's
    /// answers has waited that long for its reply, it is dropped (and the requests sent
    /// again on a new one, within the outage's budget); while some wait, it is armed again
    /// for the rest.
    func watchdogFired(_ result: Int32, _ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        watchdogArmed = false
        guard result == -ETIME, case .up = connection else { return }
        var waiting = false
        var oldestSent: ContinuousClock.Instant?  // of those passed over
        for slot in slots {
            switch slot.phase {
            case .awaitingReply:
                waiting = true
                guard slot.command.command != .flush, let latestAnswered, slot.sentAt < latestAnswered else { continue }
                oldestSent = min(oldestSent ?? slot.sentAt, slot.sentAt)
            case .sending, .repliedWhileSending: waiting = true
            default: break
            }
        }
        guard waiting else { return }
        let now = ContinuousClock.now
        let still = lastProgress.duration(to: now)
        let oldest = oldestSent.map { $0.duration(to: now) } ?? .zero
        if still >= watchdogPeriod {
            return try drop("no reply for \(still.components.seconds) s while requests wait", io, &finished,
                            serverMayHaveCrashed: false)
        }
        if oldest >= watchdogPeriod {
            return try drop("no reply to a request sent \(oldest.components.seconds) s ago, while later ones were answered",
                            io, &finished, serverMayHaveCrashed: false)
        }
        try armWatchdog(after: watchdogPeriod - max(still, oldest), io)
    }

    /// The outage outlasted the budget: every waiting request fails with EIO, and so does
    /// new I/O until a reconnect (every 5 s) succeeds.
    func giveUp(_ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        if stopping {
            logger.warning("queue \(queueID): the device is stopping: failing the requests that wait for \(target.address.endpoint) with EIO")
        } else {
            logger.error("queue \(queueID): no answer from \(target.address.endpoint) for \(budget): failing I/O with EIO until it is back")
        }
        connection = .failed
        outage = nil
        caughtCount = 0
        for tag in slots.indices where slots[tag].phase != .idle {
            if case .heldFlush = slots[tag].phase { heldFlushes -= 1 }
            if slots[tag].command.command == .flush { lostWrites = false } // told with this EIO
            finished.append(tag: UInt16(tag), result: -EIO)
            slots[tag].phase = .idle
            slots[tag].request = nil
            slots[tag].caught = false
        }
        if !stopping { try schedule(after: .seconds(5), io) }
    }

    func reconnected(_ newSocket: consuming FileDescriptor) {
        socketNumber = newSocket.rawValue
        socket = consume newSocket
        connection = .up
        lastProgress = .now
        latestAnswered = nil
        parser = NBDReplyParser()
        headerMissing = NBDSimpleReplyHeader.size
        sendHead = 0
        sendCount = 0
    }

    /// Sends again every request that was not answered, oldest mutation first.
    func resend(_ io: BackingSubmitter) throws(SystemError) {
        if caughtCount == 0 { outage = nil } // nothing waited: an idle connection came back
        let waiting = slots.indices.filter { slots[$0].phase == .queued }
            .sorted { (slots[$0].isMutation ? slots[$0].mutation : .max) < (slots[$1].isMutation ? slots[$1].mutation : .max) }
        for tag in waiting { try enqueue(tag: tag, io.forQueue(step: Step.send.rawValue)) }
        if heldFlushes > 0 { try releaseFlushes(io) }
        try receiveNext(io.forQueue(step: Step.receive.rawValue))
    }
}

// MARK: Stopping

extension NBDQueueHandler {
    /// The device is stopping (`NBDTarget.stopRequested`): what waits for a server that is
    /// down fails now, as `nbd-client -d` fails it, and new I/O fails at once while the
    /// server is down, with no reconnects. A connection that is up is left alone: its
    /// requests complete, a slow FLUSH too, or the watchdog gives it up as ever (and then
    /// it is not tried again).
    func stopRequested(_ result: Int32, _ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        guard result > 0 else { return } // (a poll canceled, or refused: the stop waits as before)
        stopping = true
        try start(stopTimer, after: target.stopExpiry, step: .stopExpired, io)
        if case .down = connection { try giveUp(io, &finished) } // (draining: `closeIfDrained` gives up)
    }

    /// Still serving long after the stop was asked for (`NBDTarget.stopExpiry`): it did
    /// not happen. Back to reconnecting, and watching for the next stop.
    func stopExpired(_ io: BackingSubmitter, _ finished: inout FinishedRequests) throws(SystemError) {
        stopping = false
        target.stopping.lower()
        logger.notice("queue \(queueID): the device was not stopped: reconnecting to \(target.address.endpoint) as before")
        try io.forQueue(step: Step.stop.rawValue).poll(file: target.stopping.descriptor, events: Int16(POLLIN))
        if case .failed = connection { try schedule(after: .milliseconds(100), io) }
    }
}
