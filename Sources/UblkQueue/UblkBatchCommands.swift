import CLiburing
import CUblk
import Glibc
import Logging
import UblkSystem

/// Requests from the ublk driver in batches (UBLK_F_BATCH_IO): one PREP_IO_CMDS hands
/// every tag to the kernel, one multishot FETCH_IO_CMDS delivers the tags of new requests
/// into provided buffers, many at a time, and the commits a turn of the queue gathered go
/// back in one COMMIT_IO_CMDS. Per request that is no SQE and no CQE of its own, where
/// `UblkCommands` pays one of each. A request with backing I/O has its commit linked behind
/// that operation instead (`linkCommit`): then the FETCH that brings the tag's next request
/// is the only completion the queue sees of it, as with one COMMIT_AND_FETCH per request.
///
/// The kernel reads a PREP's or COMMIT's element array when it issues the command, which
/// it does inline in the submitting `io_uring_enter`, and answers at once; the array is
/// still kept until the answer, since a refused element leaves the ones after it ours
/// to send again. So there are two arrays: one gathers while the other is with the kernel.
public final class UblkBatchCommands: DriverCommandSource {
    @usableFromInline let descriptors: DescriptorArray
    @usableFromInline let queueID: UInt16
    @usableFromInline let depth: Int
    @usableFromInline let prepareOpcode: UInt32
    @usableFromInline let commitOpcode: UInt32
    @usableFromInline let fetchOpcode: UInt32
    /// `UBLK_BATCH_F_*` of every PREP and COMMIT: HAS_BUF_ADDR in copy mode (each element
    /// then carries the tag's buffer), AUTO_BUF_REG_FALLBACK with zero copy where asked.
    @usableFromInline let elementFlags: UInt16
    /// 16 bytes with a buffer address, else the 8-byte header alone.
    @usableFromInline let elementBytes: Int
    /// The two element arrays, `depth` elements each (a tag is in at most one, once), then
    /// an element per tag for a commit linked behind the request's backing operation.
    @usableFromInline let elements: UnsafeMutableRawPointer
    /// Per tag: a commit is linked behind its request's backing operation (`linkCommit`),
    /// and the queue has not yet learnt that it went (or did not).
    @usableFromInline let linked: UnsafeMutableBufferPointer<Bool>
    @usableFromInline let tagBuffers: IORing.BufferRing
    @usableFromInline let logger: Logger
    // Only the queue's thread touches these, never with overlapping accesses.
    /// Which array gathers, and how many elements it holds.
    @usableFromInline @exclusivity(unchecked) var gathering = 0
    @usableFromInline @exclusivity(unchecked) var gathered = 0
    /// Elements of the other array the kernel has not answered for yet (0: none sent).
    @usableFromInline @exclusivity(unchecked) var sent = 0
    /// PREP went out: what is gathered from now on are commits.
    @usableFromInline @exclusivity(unchecked) var prepared = false
    /// The multishot fetch is armed: the kernel will post at least one more completion for it.
    @usableFromInline @exclusivity(unchecked) var fetchArmed = false

    /// The provided-buffer group FETCH_IO_CMDS takes its tag buffers from.
    static let tagBufferGroup: UInt16 = 0
    /// The kernel delivers at most 128 tags per FETCH completion.
    static let tagsPerCompletion = 128

    public init(_ configuration: QueueConfiguration, characterDevice: Int32, ring: inout IORing,
                logger: Logger) throws(SystemError) {
        let depth = configuration.depth
        descriptors = try DescriptorArray(characterDevice: characterDevice, queueID: Int(configuration.queueID),
                                          depth: depth)
        queueID = configuration.queueID
        self.depth = depth
        // Batched commands exist only in ioctl encoding.
        prepareOpcode = IOCommand.prepareBatch.opcode.encoded(.ioctl)
        commitOpcode = IOCommand.commitBatch.opcode.encoded(.ioctl)
        fetchOpcode = IOCommand.fetchBatch.opcode.encoded(.ioctl)
        switch configuration.buffers {
        case .copy:
            (elementFlags, elementBytes) = (UInt16(UBLK_BATCH_F_HAS_BUF_ADDR), 16)
        case .autoRegister(let fallback):
            (elementFlags, elementBytes) = (fallback ? UInt16(UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK) : 0, 8)
        }
        elements = .allocate(byteCount: 3 * depth * elementBytes, alignment: 16)
        linked = .allocate(capacity: depth)
        linked.initialize(repeating: false)
        // A completion fills one buffer; enough of them that every tag could arrive alone
        // before the queue reaps (fewer would end the fetch with -ENOBUFS, and re-arm it).
        let bufferCount = 1 << (Int.bitWidth - (depth - 1).leadingZeroBitCount)
        let bufferBytes = 2 * min(depth, Self.tagsPerCompletion)
        tagBuffers = try ring.registerBufferRing(group: Self.tagBufferGroup, count: max(bufferCount, 2), size: bufferBytes)
        self.logger = logger
    }

    deinit {
        elements.deallocate()
        linked.deallocate()
    }

    /// The one FETCH_IO_CMDS, which ends (-ENODEV) when the queue stops.
    @inlinable public func commandsAtStart(depth: Int) -> Int { 1 }

    /// Gathered into the PREP that `flush` sends.
    @inlinable
    public func fetch(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        gather(request, result: 0)
    }

    @inlinable
    public func descriptor(tag: Int) -> ublksrv_io_desc { descriptors[tag] }

    /// Gathered into the COMMIT that `flush` sends before the queue's next submission.
    @inlinable
    public func commit(_ request: IORequest, result: Int32, step: UInt16, _ ring: IORing.Handle) throws(SystemError) {
        gather(request, result: result)
    }

    @inlinable
    func gather(_ request: IORequest, result: Int32) {
        write(request, result: result, at: elements + (gathering * depth + gathered) * elementBytes)
        gathered += 1
    }

    /// One element: the tag, its buffer-table slot (zero copy), the result, and in copy mode
    /// the tag's buffer (where the driver copies a read's data from, and the next request's to).
    @inlinable
    func write(_ request: IORequest, result: Int32, at element: UnsafeMutableRawPointer) {
        element.storeBytes(of: ublk_elem_header(tag: request.tag, buf_index: request.tag, result: result),
                           as: ublk_elem_header.self)
        if case .buffer(let address) = request.data, elementBytes == 16 {
            element.storeBytes(of: UInt64(UInt(bitPattern: address)), toByteOffset: 8, as: UInt64.self)
        }
    }

    /// The commit of a request is linked behind its backing operation, as a COMMIT of that
    /// one element; neither completes unless it fails. Why at any depth, not only for a
    /// request alone: backing I/O that completes later (a disk's write) would otherwise cost
    /// the queue thread a wake-up for its completion and a COMMIT in a turn of its own,
    /// besides the FETCH that brings the next request (7.3 test VM, 4k random writes at
    /// depth 32, one run: 0.92 of the kernel loop driver gathered against 1.00 with one
    /// command per request; linked, two runs: 0.93 against 0.89, 0.88 against 0.87).
    /// Linked, the kernel commits as it completes the I/O. Gathered are the requests
    /// that finish without backing I/O (the null target, refusals), where batching pays.
    ///
    /// The queue learns that a linked commit went when the FETCH hands the tag out again,
    /// which the kernel does only after it. Those still unaccounted for when the fetch ends
    /// for good are settled then (`fetched`): the driver ends it on STOP_DEV (and DEL_DEV)
    /// only after `del_gendisk`, which waits for every request, so their commits went.
    /// (QUIESCE_DEV would end it earlier; `ublk upgrade` refuses batched devices. A drain
    /// cannot tell: io_uring refuses IOSQE_IO_DRAIN once a ring used IOSQE_CQE_SKIP_SUCCESS.)
    @inlinable
    public func linkCommit(_ request: IORequest, result: Int32, _ ring: IORing.Handle) throws(SystemError) -> Bool {
        guard fetchArmed, ring.linkLastPrepared() else { return false }
        let tag = Int(request.tag)
        let element = elements + (2 * depth + tag) * elementBytes
        write(request, result: result, at: element)
        try prepare(commitOpcode, UserData(.command, tag: request.tag, step: CommandStep.batchLinkedCommit),
                    elements: element, count: 1, ring, skippingSuccess: true)
        linked[tag] = true
        return true
    }

    /// A linked request's backing operation completes visibly only when it failed or ended
    /// short; the commit behind it was then cancelled, and the request goes on.
    @inlinable
    public func backingCompleted(tag: Int) {
        linked[tag] = false
    }

    /// How many tags have a linked commit the queue has not accounted for; counted only when
    /// the fetch ends, so no counter is kept beside `linked` on the request path.
    @usableFromInline var linkedCommits: Int { linked.reduce(0) { $0 + ($1 ? 1 : 0) } }

    /// Sends what is gathered: the PREP of every tag (then arms the fetch), or a COMMIT.
    /// While the kernel has not answered the last one, what is gathered waits for the next turn.
    ///
    /// The answer comes during the submission; were the queue's wait satisfied by it, a
    /// request at queue depth 1 would cost a turn more (commit, then wait again for the
    /// next). So it says to wait for one completion more, as long as the fetch is armed:
    /// then another is sure to come (a request, or the fetch's end when the queue stops).
    @inlinable
    public func flush(_ ring: IORing.Handle) throws(SystemError) -> UInt32 {
        guard gathered > 0, sent == 0 else { return 0 }
        try send(ring)
        return fetchArmed ? 1 : 0
    }

    /// The PREP or COMMIT of what is gathered; the first (PREP) also arms the fetch.
    @usableFromInline
    func send(_ ring: IORing.Handle) throws(SystemError) {
        let array = elements + gathering * depth * elementBytes
        let step = prepared ? CommandStep.batchCommit : CommandStep.batchPrepare
        try prepare(prepared ? commitOpcode : prepareOpcode, UserData(.command, tag: UInt16(gathering), step: step),
                    elements: array, count: gathered, ring)
        (sent, gathered, gathering) = (gathered, 0, 1 - gathering)
        if !prepared {
            prepared = true
            try armFetch(ring)
        }
    }

    /// The multishot FETCH_IO_CMDS: each completion names the tags of new requests in a
    /// buffer of `tagBuffers`. The kernel queues PREP before it, in submission order.
    @usableFromInline
    func armFetch(_ ring: IORing.Handle) throws(SystemError) {
        try prepare(fetchOpcode, UserData(.command, tag: 0, step: CommandStep.batchFetch), elements: nil, count: depth,
                    ring, multishotBuffers: Self.tagBufferGroup)
        fetchArmed = true
    }

    /// One batched command: its 16-byte `ublk_batch_io` in the SQE's command area and the
    /// element array at `sqe->addr`. A FETCH has no array: its elements are the 2-byte tags
    /// the kernel writes into the provided buffers, and it carries no element flags.
    @usableFromInline
    func prepare(_ opcode: UInt32, _ userData: UserData, elements: UnsafeMutableRawPointer?, count: Int,
                 _ ring: IORing.Handle, skippingSuccess: Bool = false,
                 multishotBuffers group: UInt16? = nil) throws(SystemError) {
        let command = ublk_batch_io(q_id: queueID, flags: elements == nil ? 0 : elementFlags, nr_elem: UInt16(count),
                                    elem_bytes: elements == nil ? 2 : UInt8(elementBytes), reserved: 0, reserved2: 0)
        try ring.prepareCommand(fd: 0, fixedFile: true, opcode: opcode, userData: userData.rawValue,
                                address: UInt64(UInt(bitPattern: elements)), skippingSuccess: skippingSuccess,
                                multishotBuffers: group)
            .storeBytes(of: command, as: ublk_batch_io.self)
    }

    @inlinable
    public func batchCompleted(step: UInt16, tag: UInt16, result: Int32, flags: UInt32, _ ring: IORing.Handle,
                               arrived: (Int) throws(SystemError) -> Void) throws(SystemError) -> Int {
        switch step {
        case CommandStep.batchFetch: return try fetched(result: result, flags: flags, ring, arrived: arrived)
        case CommandStep.batchCommit: return committed(result: result, array: Int(tag))
        case CommandStep.batchLinkedCommit:
            // Cancelled: its head failed, and the head's completion carries the request on.
            guard result != -ECANCELED, linked[Int(tag)] else { return 0 }
            // Refused (or the queue is going away): the request is dropped, as a refused
            // element of a gathered COMMIT is.
            if result != -ENODEV {
                logger.error("queue \(queueID) tag \(tag): COMMIT_IO_CMDS: \(SystemError("", errno: result).reason)")
            }
            linked[Int(tag)] = false
            return -1
        default:
            sent = 0
            if result < 0 { throw SystemError("PREP_IO_CMDS of queue \(queueID)", errno: result) }
            return 0
        }
    }

    /// A FETCH completion: the tags in its buffer arrived (each is now held until committed;
    /// a tag whose commit was linked replaces its settled request in the count). Without
    /// IORING_CQE_F_MORE the fetch has ended: for good when the queue stops (-ENODEV; the
    /// linked commits not yet accounted for are settled), else (-ENOBUFS: no buffer was
    /// free) it is armed again.
    @inlinable
    func fetched(result: Int32, flags: UInt32, _ ring: IORing.Handle,
                 arrived: (Int) throws(SystemError) -> Void) throws(SystemError) -> Int {
        var delivered = 0
        if flags & IORING_CQE_F_BUFFER != 0 {
            let id = UInt16(truncatingIfNeeded: flags >> IORING_CQE_BUFFER_SHIFT)
            let tags = tagBuffers.buffer(id)
            for index in 0..<max(0, Int(result)) / 2 {
                let tag = Int(tags.load(fromByteOffset: 2 * index, as: UInt16.self))
                guard tag < depth else {
                    logger.error("queue \(queueID): FETCH_IO_CMDS delivered tag \(tag) of a queue of depth \(depth)")
                    continue
                }
                // A linked commit went: the new request takes its request's place in the count.
                if linked[tag] { linked[tag] = false } else { delivered += 1 }
                try arrived(tag)
            }
            tagBuffers.recycle(id)
        }
        guard flags & IORING_CQE_F_MORE == 0 else { return delivered }
        fetchArmed = false
        switch result {
        case -ENODEV:
            let settled = linkedCommits
            linked.update(repeating: false)
            return delivered - 1 - settled
        case -ENOBUFS, 0...: try armFetch(ring)
        default: throw SystemError("FETCH_IO_CMDS of queue \(queueID)", errno: result)
        }
        return delivered
    }

    /// A COMMIT's answer: the bytes of elements the kernel took, which stops at the first
    /// it refused (a tag it did not hand out, or a queue going away). That one is logged
    /// and dropped; those after it are gathered again. Returns -(elements settled).
    @usableFromInline
    func committed(result: Int32, array: Int) -> Int {
        let count = sent
        sent = 0
        if result == Int32(count * elementBytes) { return -count }
        let taken = max(0, Int(result)) / elementBytes
        let base = elements + array * depth * elementBytes
        let refused = base.load(fromByteOffset: taken * elementBytes, as: ublk_elem_header.self)
        if result != -ENODEV {
            let reason = result < 0 ? SystemError("", errno: result).reason : "refused"
            logger.error("queue \(queueID) tag \(refused.tag): COMMIT_IO_CMDS: \(reason)")
        }
        for index in min(taken + 1, count)..<count {
            (elements + (gathering * depth + gathered) * elementBytes)
                .copyMemory(from: base + index * elementBytes, byteCount: elementBytes)
            gathered += 1
        }
        return -(taken + 1)
    }

    /// Zero-copy fallback: the per-tag REGISTER_IO_BUF, which batched devices keep.
    public func registerBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        try UblkCommands.bufferCommand(.registerBuffer, queueID: queueID, request, step: CommandStep.registered, ring)
    }

    public func unregisterBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        try UblkCommands.bufferCommand(.unregisterBuffer, queueID: queueID, request, step: CommandStep.unregistered,
                                       ring)
    }
}
