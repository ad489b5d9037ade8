import CLiburing
import CUblk
import Glibc

/// An io_uring instance (liburing's `struct io_uring`), torn down when its owner goes away.
///
/// The submission and completion rings are memory shared with the kernel. The
/// owner is `~Copyable` and keeps `struct io_uring` on the heap so that pointers
/// liburing hands out (SQEs, CQEs) stay valid and only one owner calls
/// `io_uring_queue_exit`. A ring is used by the one thread that created it
/// (`IORING_SETUP_SINGLE_ISSUER` where the kernel has it), so no locking.
///
/// Everything that touches the rings goes through `IORing.Handle`, the one SQE layer
/// of the project (control plane, queues and targets alike).
public struct IORing: ~Copyable {
    /// The ring's operations, for code that cannot hold the owner (a target's submitter).
    public let handle: Handle
    /// Memory of a provided-buffer ring (`registerBufferRing`), shared with the kernel
    /// for as long as the ring exists: freed only after `io_uring_queue_exit`.
    private var bufferRingMemory: UnsafeMutableRawPointer?

    /// The setup flags the ring was created with (the kernel may have refused the preferred ones).
    public var flags: UInt32 { handle.ring.pointee.flags }

    /// The ring's descriptor: where another ring's MSG_RING posts a completion to this one.
    public var descriptor: Int32 { handle.descriptor }

    /// Flags that make a single-thread ring cheaper when the kernel knows them: one
    /// submitter, completions run when we enter the kernel to wait instead of by IPI.
    public static let singleThreadFlags: UInt32 =
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_DEFER_TASKRUN

    /// With `singleThreadFlags`, for a ring whose thread busy-polls (`submit(waitingFor:
    /// spinningFor:)`): the kernel says in the SQ ring when completions wait as task work.
    public static let pollingFlags: UInt32 = singleThreadFlags | IORING_SETUP_TASKRUN_FLAG

    /// One submitter only (a thread that posts and reaps on its own ring), without deferring
    /// completions: another ring's MSG_RING then posts straight into the CQ, no task work.
    public static let singleIssuerFlag: UInt32 = IORING_SETUP_SINGLE_ISSUER

    /// Sets up a ring with `entries` submission slots. `flags` are `IORING_SETUP_*`;
    /// if the kernel rejects `preferredFlags` (older kernel: EINVAL) the ring is set up
    /// without them.
    public init(entries: UInt32, flags required: UInt32 = 0, preferredFlags: UInt32 = 0) throws(SystemError) {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var result = io_uring_queue_init(entries, ring, required | preferredFlags)
        if result == -EINVAL && preferredFlags != 0 {
            result = io_uring_queue_init(entries, ring, required)
        }
        guard result == 0 else {
            ring.deallocate()
            throw SystemError("io_uring_queue_init", errno: result)
        }
        handle = Handle(ring: ring)
    }

    deinit {
        io_uring_queue_exit(handle.ring)
        handle.ring.deallocate()
        bufferRingMemory?.deallocate()
    }

    /// Registers `descriptors` as fixed files 0..<n (saves a file lookup per operation).
    public func registerFiles(_ descriptors: [Int32]) throws(SystemError) {
        let result = descriptors.withUnsafeBufferPointer {
            io_uring_register_files(handle.ring, $0.baseAddress, UInt32($0.count))
        }
        guard result == 0 else { throw SystemError("io_uring_register_files", errno: result) }
    }

    /// An empty buffer table of `count` slots, for buffers the kernel registers itself
    /// (ublk's UBLK_F_AUTO_BUF_REG puts each request's pages at its tag's slot).
    public func registerSparseBuffers(_ count: Int) throws(SystemError) {
        let result = io_uring_register_buffers_sparse(handle.ring, UInt32(count))
        guard result == 0 else { throw SystemError("io_uring_register_buffers_sparse", errno: result) }
    }

    /// Registers a ring of `count` provided buffers of `size` bytes each as buffer group
    /// `group` (IORING_REGISTER_PBUF_RING), every buffer handed to the kernel. Operations
    /// with IOSQE_BUFFER_SELECT on that group take one per completion and say which in the
    /// completion's flags; `BufferRing.recycle` gives it back. One per ring.
    public mutating func registerBufferRing(group: UInt16, count: Int, size: Int) throws(SystemError) -> BufferRing {
        precondition(bufferRingMemory == nil && count > 0 && count & (count - 1) == 0 && count <= 32768)
        // The kernel wants the ring of `io_uring_buf` entries page-aligned; the buffers follow it.
        let entriesBytes = MappedRegion.roundUp(count * MemoryLayout<io_uring_buf>.stride, to: MappedRegion.pageSize)
        let memory = UnsafeMutableRawPointer.allocate(byteCount: entriesBytes + count * size,
                                                      alignment: MappedRegion.pageSize)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: entriesBytes)
        var registration = io_uring_buf_reg()
        registration.ring_addr = UInt64(UInt(bitPattern: memory))
        registration.ring_entries = UInt32(count)
        registration.bgid = group
        let result = io_uring_register_buf_ring(handle.ring, &registration, 0)
        guard result == 0 else {
            memory.deallocate()
            throw SystemError("io_uring_register_buf_ring", errno: result)
        }
        bufferRingMemory = memory
        let ring = BufferRing(entries: memory.assumingMemoryBound(to: io_uring_buf_ring.self),
                              buffers: memory + entriesBytes, count: count, size: size)
        for id in 0..<count { ring.recycle(UInt16(id)) }
        return ring
    }

    /// A provided-buffer ring registered on an `IORing`, which owns its memory; valid
    /// while that ring lives, on its thread.
    public struct BufferRing {
        @usableFromInline let entries: UnsafeMutablePointer<io_uring_buf_ring>
        @usableFromInline let buffers: UnsafeMutableRawPointer
        @usableFromInline let count: Int
        public let size: Int

        init(entries: UnsafeMutablePointer<io_uring_buf_ring>, buffers: UnsafeMutableRawPointer, count: Int, size: Int) {
            (self.entries, self.buffers, self.count, self.size) = (entries, buffers, count, size)
        }

        /// Buffer `id`, as a completion's flags name it (`IORING_CQE_F_BUFFER`, id in bits 16-31).
        @inlinable
        public func buffer(_ id: UInt16) -> UnsafeRawPointer {
            precondition(Int(id) < count)
            return UnsafeRawPointer(buffers + Int(id) * size)
        }

        /// Hands buffer `id` back to the kernel once its contents were read.
        @inlinable
        public func recycle(_ id: UInt16) {
            io_uring_buf_ring_add(entries, buffers + Int(id) * size, UInt32(size), id,
                                  io_uring_buf_ring_mask(UInt32(count)), 0)
            io_uring_buf_ring_advance(entries, 1)
        }
    }
}

extension IORing {
    /// A non-owning view of an `IORing`: prepares SQEs, submits, reaps completions.
    ///
    /// Valid while its `IORing` lives, on the ring's own thread; the owner (a queue, the
    /// control device) hands it out only to code that runs inside its own lifetime.
    public struct Handle {
        @usableFromInline let ring: UnsafeMutablePointer<io_uring>

        init(ring: UnsafeMutablePointer<io_uring>) { self.ring = ring }

        /// The ring's descriptor (the target of another ring's MSG_RING).
        @inlinable public var descriptor: Int32 { ring.pointee.ring_fd }

        /// The next free SQE, zeroed, with `userData` set (the only place that sets it).
        /// When the ring is full, what is queued is submitted first; a failure of that
        /// submission is thrown, not ignored.
        /// `zeroed: false` is for callers that fill the SQE with a liburing `io_uring_prep_*`
        /// call, which writes every field of the 64-byte SQE but `user_data` itself (they all
        /// go through `io_uring_prep_rw`): clearing it first would store each word twice.
        /// Always inlined: every SQE of the hot path comes from here, and a call per SQE
        /// (with the spills around it) costs more than its body.
        @inlinable @inline(__always)
        public func prepare(userData: UInt64, zeroed: Bool = true) throws(SystemError) -> UnsafeMutablePointer<io_uring_sqe> {
            var sqe = io_uring_get_sqe(ring)
            if sqe == nil {
                _ = try submit()
                sqe = io_uring_get_sqe(ring)
            }
            guard let sqe else { throw SystemError("io_uring_get_sqe", errno: EBUSY) }
            // 64 bytes, 128 on `IORING_SETUP_SQE128` rings: eight (or sixteen) stores the
            // compiler unrolls, where a count known only at run time is a memset call per SQE.
            if zeroed {
                let words = UnsafeMutableRawPointer(sqe).assumingMemoryBound(to: UInt64.self)
                for word in 0..<8 { words[word] = 0 }
                if ring.pointee.flags & IORING_SETUP_SQE128 != 0 { for word in 8..<16 { words[word] = 0 } }
            }
            sqe.pointee.user_data = userData
            return sqe
        }

        /// Prepares an `IORING_OP_URING_CMD` SQE for `fd` (a fixed-file index when `fixedFile`)
        /// and returns its command area: 16 bytes at byte 48 of the SQE (80 with SQE128),
        /// written inline here rather than through a C helper on the hot path.
        /// With `multishotBuffers`, the command is multishot (IORING_URING_CMD_MULTISHOT) and
        /// takes each completion's buffer from that provided-buffer group (IOSQE_BUFFER_SELECT).
        /// With `skippingSuccess`, only a failed command completes (IOSQE_CQE_SKIP_SUCCESS).
        @inlinable
        public func prepareCommand(fd: Int32, fixedFile: Bool, opcode: UInt32, userData: UInt64,
                                   address: UInt64 = 0, skippingSuccess: Bool = false,
                                   multishotBuffers group: UInt16? = nil) throws(SystemError) -> UnsafeMutableRawPointer {
            let sqe = try prepare(userData: userData)
            sqe.pointee.opcode = UInt8(IORING_OP_URING_CMD.rawValue)
            sqe.pointee.fd = fd
            sqe.pointee.cmd_op = opcode
            sqe.pointee.addr = address
            if fixedFile { sqe.pointee.flags = UInt8(1 << IOSQE_FIXED_FILE_BIT) }
            if skippingSuccess { sqe.pointee.flags |= UInt8(1 << IOSQE_CQE_SKIP_SUCCESS_BIT) }
            if let group {
                sqe.pointee.flags |= UInt8(1 << IOSQE_BUFFER_SELECT_BIT)
                sqe.pointee.buf_group = group
                // `uring_cmd_flags`, the same word as `rw_flags`.
                sqe.pointee.rw_flags = IORing.uringCommandMultishot
            }
            return UnsafeMutableRawPointer(sqe) + IORing.commandAreaOffset
        }

        /// Prepares an `IORING_OP_NOP`, which completes with result 0 and `userData`
        /// (the offline queue's stand-in for a ublk command, and ring tests).
        @inlinable @inline(__always)
        public func prepareNop(userData: UInt64) throws(SystemError) {
            try prepare(userData: userData).pointee.opcode = UInt8(IORING_OP_NOP.rawValue)
        }

        /// Prepares an `IORING_OP_MSG_RING` that posts a completion with `data` as its user
        /// data and `result` as its result on the ring `ring` (a descriptor), from any thread:
        /// no lock, no extra system call (it goes out with the next submit). With
        /// IOSQE_CQE_SKIP_SUCCESS, so only a failed send completes here, with `userData`.
        ///
        /// Memory written before the submit is visible to the thread that reaps the posted
        /// completion: the kernel publishes a CQE with a release store of the CQ tail, and
        /// liburing reads the tail with an acquire load.
        @inlinable
        public func prepareMessage(toRing ring: Int32, data: UInt64, result: Int32, userData: UInt64) throws(SystemError) {
            let sqe = try prepare(userData: userData)
            io_uring_prep_msg_ring(sqe, ring, UInt32(bitPattern: result), data, 0)
            sqe.pointee.flags |= UInt8(1 << IOSQE_CQE_SKIP_SUCCESS_BIT)
        }

        /// Links the SQE prepared last to the one prepared next, in the same submission
        /// (IOSQE_IO_LINK: the next starts only once this one completed with its full
        /// result), and skips this one's completion unless it fails (IOSQE_CQE_SKIP_SUCCESS).
        /// A failed or short read or write posts this one's completion and cancels the next,
        /// without a completion of its own (the skip passes on to the link). Other
        /// operations do not break a link when they fail (fsync, fallocate: the next runs,
        /// and this one's failed completion is skipped too): link only behind reads and writes. Returns false,
        /// changing nothing, when the submission queue has no slot left for that next SQE:
        /// a link may not be split across submissions (the SQE preparing it would submit).
        @inlinable @inline(__always)
        public func linkLastPrepared() -> Bool {
            guard io_uring_sq_space_left(ring) > 0 else { return false }
            let sq = ring.pointee.sq
            let shift: UInt32 = ring.pointee.flags & IORING_SETUP_SQE128 != 0 ? 1 : 0
            let sqe = sq.sqes + Int(((sq.sqe_tail &- 1) & sq.ring_mask) << shift)
            sqe.pointee.flags |= UInt8(1 << IOSQE_IO_LINK_BIT | 1 << IOSQE_CQE_SKIP_SUCCESS_BIT)
            return true
        }

        /// Hands every prepared SQE to the kernel.
        @inlinable @discardableResult
        public func submit() throws(SystemError) -> Int {
            try submit(waitingFor: 0)
        }

        /// `submit()`, only if an SQE is prepared: no system call for nothing.
        @inlinable
        public func submitPrepared() throws(SystemError) {
            if io_uring_sq_ready(ring) > 0 { try submit() }
        }

        /// Submits prepared SQEs and waits until at least `count` completions are ready:
        /// one `io_uring_enter` for both.
        @inlinable @discardableResult
        public func submit(waitingFor count: UInt32) throws(SystemError) -> Int {
            var busy = 0
            while true {
                let result = count == 0 ? io_uring_submit(ring) : io_uring_submit_and_wait(ring, count)
                if result >= 0 { return Int(result) }
                if result == -EINTR { continue }
                if result == -EBUSY || result == -EAGAIN {
                    // The completion queue is full: the caller must reap first.
                    if io_uring_cq_ready(ring) > 0 { return 0 }
                    if Self.waitOutRefusal(&busy) { continue }
                }
                throw SystemError("io_uring_enter", errno: result)
            }
        }

        /// The kernel could not take a submission for now (no memory for its requests): it
        /// passes. A queue thread that gave up at once would leave its requests held, and on
        /// 7.x the device's STOP_DEV would wait for them. True after a millisecond's pause,
        /// while `busy` (the pauses so far) is below `IORing.busyRetries`. Out of line: the
        /// turn loop's submission stays small.
        @usableFromInline
        static func waitOutRefusal(_ busy: inout Int) -> Bool {
            guard busy < IORing.busyRetries else { return false }
            busy += 1
            usleep(1000)
            return true
        }

        /// `submit(waitingFor:)`, busy-polling first: submits, then spins for up to
        /// `nanoseconds` until `count` completions are ready, and only then sleeps in the
        /// kernel. Where a request's round trip is shorter than a sleep and a wake-up, this
        /// saves both, at the price of the CPU time spun. 0 goes straight to sleep. Returns
        /// whether the spin found the completions (false when it slept).
        @inlinable @discardableResult
        public func submit(waitingFor count: UInt32, spinningFor nanoseconds: Int) throws(SystemError) -> Bool {
            if nanoseconds > 0 {
                try submit()
                if try spin(untilReady: count, nanoseconds: nanoseconds) { return true }
            }
            try submit(waitingFor: count)
            return false
        }

        /// Spins until `count` completions are ready (true) or `nanoseconds` have passed
        /// (false), without sleeping. With IORING_SETUP_DEFER_TASKRUN a completion first
        /// waits as task work until the ring's thread enters the kernel; the kernel flags
        /// that in the SQ ring (IORING_SQ_TASKRUN, on rings set up with
        /// IORING_SETUP_TASKRUN_FLAG), and only then does this enter (GETEVENTS, no wait),
        /// so a spin costs no system call while nothing happens.
        @usableFromInline
        func spin(untilReady count: UInt32, nanoseconds: Int) throws(SystemError) -> Bool {
            let deadline = ContinuousClock.now + .nanoseconds(nanoseconds)
            var polls = 0
            while io_uring_cq_ready(ring) < count {
                if cliburing_sq_flags(ring) & IORING_SQ_TASKRUN != 0 {
                    let result = io_uring_get_events(ring)
                    // EBUSY/EAGAIN: the completion queue is full; the caller reaps it.
                    if result == -EBUSY || result == -EAGAIN { return true }
                    if result < 0 && result != -EINTR { throw SystemError("io_uring_enter", errno: result) }
                    continue
                }
                polls &+= 1
                // The clock is read every 16 polls: a read costs more than a poll.
                if polls & 15 == 0 && ContinuousClock.now >= deadline { return false }
                cliburing_cpu_relax()
            }
            return true
        }

        /// Calls `body` with the user data and result of every ready completion, a batch
        /// at a time (`io_uring_peek_batch_cqe`), and returns the slots to the kernel with
        /// one `io_uring_cq_advance` per batch. Returns how many completions were handled.
        /// Always inlined: then `body` is too, and a queue's closure capturing `self` costs
        /// neither a context nor a retain/release per turn.
        @inlinable @inline(__always) @discardableResult
        public func reap<E: Error>(_ body: (_ userData: UInt64, _ result: Int32) throws(E) -> Void) throws(E) -> Int {
            try reapWithFlags { (userData, result, _) throws(E) in try body(userData, result) }
        }

        /// `reap`, with each completion's `IORING_CQE_F_*` flags as well (a multishot
        /// operation's F_MORE, a provided buffer's F_BUFFER and id).
        @inlinable @inline(__always) @discardableResult
        public func reapWithFlags<E: Error>(
            _ body: (_ userData: UInt64, _ result: Int32, _ flags: UInt32) throws(E) -> Void
        ) throws(E) -> Int {
            var total = 0
            while true {
                let count: Int = try withUnsafeTemporaryAllocation(
                    of: UnsafeMutablePointer<io_uring_cqe>?.self, capacity: IORing.reapBatch
                ) { (batch) throws(E) -> Int in
                    let ready = Int(io_uring_peek_batch_cqe(ring, batch.baseAddress, UInt32(batch.count)))
                    var handled = 0
                    // Slots already handled go back even if `body` throws on a later one.
                    defer { io_uring_cq_advance(ring, UInt32(handled)) }
                    while handled < ready {
                        let cqe = batch[handled].unsafelyUnwrapped
                        let (userData, result, flags) = (cqe.pointee.user_data, cqe.pointee.res, cqe.pointee.flags)
                        handled += 1
                        try body(userData, result, flags)
                    }
                    return ready
                }
                total += count
                if count < IORing.reapBatch { return total }
            }
        }
    }

    /// IORING_URING_CMD_MULTISHOT (Linux 6.18's io_uring.h; Debian 12's headers lack it).
    public static let uringCommandMultishot: UInt32 = 1 << 1
    /// Where the command area (`sqe->cmd`) of a URING_CMD SQE starts.
    public static let commandAreaOffset = 48
    /// Completions looked at per `io_uring_peek_batch_cqe`.
    public static let reapBatch = 32
    /// Submissions the kernel refuses for now (EAGAIN, EBUSY with nothing to reap) are tried
    /// again this many times, a millisecond apart, before the refusal is an error.
    public static let busyRetries = 1000
}
