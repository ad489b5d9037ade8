import CLiburing
import Glibc
import Logging
import UblkSystem

/// What a target tells the device about itself: size, block sizes and capabilities.
/// The server turns it into the device's parameters (SET_PARAMS).
public struct TargetProperties: Sendable, Equatable {
    /// Device size in bytes (a multiple of `logicalBlockSize`).
    public var size: UInt64
    public var logicalBlockSize: Int = 512
    public var physicalBlockSize: Int = 4096
    public var readOnly = false
    public var rotational = false
    /// Writes may sit in a cache until FLUSH (true for files: the page cache or the disk's).
    public var volatileCache = true
    /// DISCARD is honoured (the backing can punch holes).
    public var supportsDiscard = false
    /// WRITE_ZEROES is honoured (the backing can zero ranges).
    public var supportsWriteZeroes = false
    /// Discard granularity in bytes.
    public var discardGranularity: Int = 4096
    /// FUA writes are honoured (with a volatile cache); without, the kernel sends a FLUSH instead.
    public var supportsFUA = true
    /// Largest read or write the backing takes in one piece; the device's requests are capped to it.
    public var maximumTransferBytes: Int = .max

    public init(size: UInt64) { self.size = size }
}

/// Where a request's data lives.
public enum RequestData {
    /// Copy mode: the tag's buffer, which the driver copies the request's pages to or from.
    case buffer(UnsafeMutableRawPointer)
    /// Zero copy: the request's own pages, registered in the queue ring's buffer table at
    /// `index`; ring operations reach them with READ_FIXED/WRITE_FIXED, `offset` bytes in.
    case registered(index: UInt16, offset: Int)

    /// Copy mode's tag buffer, not the request's own pages.
    @inlinable
    public var isBuffer: Bool {
        if case .buffer = self { true } else { false }
    }

    /// The same data, `bytes` further on (the rest of a short transfer).
    @inlinable
    public func advanced(by bytes: Int) -> RequestData {
        switch self {
        case .buffer(let address): .buffer(address + bytes)
        case .registered(let index, let offset): .registered(index: index, offset: offset + bytes)
        }
    }
}

/// A request handed to a target: the tag it arrived on, what it asks, and where its data is.
public struct IORequest {
    public var tag: UInt16
    public var descriptor: IODescriptor
    /// The request's data: the tag's buffer, or (zero copy) its registered pages.
    public var data: RequestData

    public init(tag: UInt16, descriptor: IODescriptor, data: RequestData) {
        self.tag = tag
        self.descriptor = descriptor
        self.data = data
    }

    public init(tag: UInt16, descriptor: IODescriptor, buffer: UnsafeMutableRawPointer) {
        self.init(tag: tag, descriptor: descriptor, data: .buffer(buffer))
    }

    /// The tag's buffer: data to write, or room for data read (`descriptor.byteCount` bytes
    /// used). Only in copy mode; a target that must see the data (encryption, a network
    /// protocol) does not take zero copy (`Target.supportsZeroCopy`).
    @inlinable
    public var buffer: UnsafeMutableRawPointer {
        guard case .buffer(let address) = data else { preconditionFailure("zero-copy requests have no buffer") }
        return address
    }
}

/// A block-device target: what the device is backed by.
///
/// A target is created once per device; each queue thread asks it for one `Handler`,
/// made on that thread, and the handler runs only there. The server holds targets as
/// `any Target`; the queue engine is specialised for the concrete `Handler` through
/// `serveQueue`, so no request pays for an existential call.
public protocol Target: AnyObject, Sendable {
    associatedtype Handler: QueueHandler
    /// Short name (`loop`, `null`).
    var name: String { get }
    /// Size, block sizes and capabilities.
    var properties: TargetProperties { get }
    /// Descriptors each queue registers as fixed files, after /dev/ublkcN; handlers refer
    /// to them by index (`BackingSubmitter.firstTargetFile` + position).
    var fixedFiles: [Int32] { get }
    /// Creates the handler of one queue's thread, which serves the tags of `share` (all of
    /// them unless several threads share the queue). Called on that thread.
    func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) throws -> Handler
    /// How many threads should share each queue where the device lets them
    /// (UBLK_F_PER_IO_DAEMON): a target whose requests need more CPU than one thread has
    /// (the cipher) spreads them over several this way, each thread serving its own tags
    /// start to finish. 1 by default.
    var threadsPerQueue: Int { get }
    /// Makes every completed write durable; called once when the device stops.
    func sync() throws
    /// The device is being stopped (a signal to the server, `ublk del`, a failed queue): a
    /// target whose requests may wait long on something outside (a network server that is
    /// down) fails them now, as the kernel's nbd does on `nbd-client -d`, instead of holding
    /// up the stop, which waits for every request. Called on another thread than the
    /// queues', perhaps more than once. Nothing by default.
    func stopRequested()
    /// Writes the device completed may be gone (a network server that crashed with them in
    /// its cache), and no FLUSH has failed yet to say so: a server taking the device over
    /// (`ublk upgrade`) must fail its first FLUSH instead (`writesWereLost`). False by default.
    var writesLost: Bool { get }
    /// The server this one takes the device over from could not make every completed write
    /// durable (`writesLost`, or its last sync failed): the next FLUSH fails with EIO, once,
    /// so the file system learns of it. Nothing by default.
    func writesWereLost()
    /// This server takes the device over from another (`ublk recover`, `ublk upgrade`), whose
    /// completed writes its own stop must make durable too, though it completed none itself.
    /// Nothing by default (a file's sync covers every write to it).
    func takesOverWrites()
    /// The handler moves data only with ring operations that take `RequestData`, never
    /// touching it, so requests may keep their own pages (zero copy).
    var supportsZeroCopy: Bool { get }
    /// Serves one queue on the calling thread until the device stops; `fetched` runs once
    /// every tag is fetched, `failing` at once if the queue fails (it then answers its
    /// requests with EIO until the device stops, and throws). Leave it to the default,
    /// which runs the queue engine specialised for `Handler`.
    func serveQueue(_ configuration: QueueConfiguration, characterDevice: Int32, logger: Logger,
                    fetched: () -> Void, failing: @escaping (any Error) -> Void) throws
}

extension Target {
    /// Most targets look at the data (or have not been checked for zero copy): copy mode.
    public var supportsZeroCopy: Bool { false }

    /// One thread per queue.
    public var threadsPerQueue: Int { 1 }

    /// A target whose requests end soon anyway (files, memory) has nothing to cut short.
    public func stopRequested() {}

    /// A target whose completed writes are where its sync finds them (a file, memory).
    public var writesLost: Bool { false }
    public func writesWereLost() {}
    public func takesOverWrites() {}

    @inlinable
    public func serveQueue(_ configuration: QueueConfiguration, characterDevice: Int32, logger: Logger,
                           fetched: () -> Void, failing: @escaping (any Error) -> Void) throws {
        if configuration.batchedCommands {
            try serve(Queue<Handler, UblkBatchCommands>(configuration, characterDevice: characterDevice, target: self,
                                                        logger: logger), fetched: fetched, failing: failing)
        } else {
            try serve(Queue<Handler, UblkCommands>(configuration, characterDevice: characterDevice, target: self,
                                                   logger: logger), fetched: fetched, failing: failing)
        }
    }

    @inlinable
    func serve<Source>(_ queue: Queue<Handler, Source>, fetched: () -> Void,
                       failing: @escaping (any Error) -> Void) throws {
        try queue.fetchAll()
        fetched()
        queue.onFailure = failing
        try queue.run()
    }
}

/// The per-queue half of a target: turns requests into backing I/O on the queue's ring.
///
/// Each request is a small state machine owned by its tag: `start` either finishes it
/// at once (`.done`) or submits backing I/O (`.submitted`, `.finishing`); each of those
/// completions comes back through `complete`, which again finishes or resubmits.
/// Results are bytes transferred (reads/writes) or 0, or a negative errno. A thrown
/// error (no SQE could be had) finishes the request with that errno.
///
/// A handler may also submit operations of the queue itself (`BackingSubmitter.forQueue`,
/// kind `.queue`: a network target's receive of the next reply, which may answer any
/// tag). Their completions come to `queueOperationCompleted`, which reports the requests
/// they finished in `finished`.
public protocol QueueHandler: AnyObject {
    func start(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep
    func complete(_ request: IORequest, backingResult: Int32, _ io: BackingSubmitter) throws(SystemError) -> RequestStep
    /// An operation submitted through `io.forQueue(step:)` completed with `result`. A
    /// thrown error fails the queue (the handler's own state can no longer be trusted):
    /// its requests are answered with EIO until the device stops (`Queue.fail`).
    func queueOperationCompleted(step: UInt16, result: Int32, _ io: BackingSubmitter,
                                 finished: inout FinishedRequests) throws(SystemError)
    /// The queue is going away (its loop ended, or failed): called while its ring and tag
    /// buffers still exist, so a handler with threads of its own can stop and join them
    /// before anything they might still touch is freed.
    func queueEnding()
}

extension QueueHandler {
    /// Handlers that submit only per-request operations never get here.
    public func queueOperationCompleted(step: UInt16, result: Int32, _ io: BackingSubmitter,
                                        finished: inout FinishedRequests) throws(SystemError) {}

    /// Handlers without threads of their own have nothing to stop.
    public func queueEnding() {}
}

/// Where a request stands after a handler's `start` or `complete`.
public enum RequestStep: Equatable {
    /// Finished with this result: the queue commits it.
    case done(Int32)
    /// Backing I/O is submitted; its completion comes back to `complete`.
    case submitted
    /// The one backing operation just submitted, a read or write (`READ`, `WRITE`, or their
    /// `_FIXED` forms), finishes the request if it moves exactly `result` bytes. Only
    /// these: io_uring breaks a link behind a read or write that fails or ends short, but
    /// not behind a failed fsync or fallocate, whose error would then be lost (the commit
    /// runs with `result`, and the skipped completion never comes): return `.submitted`
    /// for every other operation. The queue then links the commit behind it in the same submission
    /// (IOSQE_IO_LINK) and skips its completion (IOSQE_CQE_SKIP_SUCCESS): the request
    /// needs no turn of the queue between its backing I/O and its commit, which is one
    /// `io_uring_enter` per request at queue depth 1. A short or failed result cancels the
    /// commit, and the completion comes to `complete` as after `.submitted`; so does every
    /// completion when the queue cannot link (a kernel that reads a linked command's SQE
    /// late, `IORing.copiesLinkedCommands`; no room left in the submission queue; pages the
    /// queue registered itself to give back first). The handler must not need to see
    /// the request again once it returns this.
    case finishing(result: Int32)
}

/// Requests a `.queue` completion finished, each with its result; the queue commits them
/// once the handler returns. Room for every tag once (a tag is finished at most once).
public struct FinishedRequests {
    @usableFromInline let storage: UnsafeMutableBufferPointer<(tag: UInt16, result: Int32)>
    @usableFromInline var count = 0

    @inlinable
    init(storage: UnsafeMutableBufferPointer<(tag: UInt16, result: Int32)>) { self.storage = storage }

    /// Finishes the request on `tag` with `result` (bytes transferred, 0, or a negative errno).
    @inlinable
    public mutating func append(tag: UInt16, result: Int32) {
        precondition(count < storage.count, "a request was finished twice")
        storage[count] = (tag, result)
        count += 1
    }
}

/// Submits a target's backing I/O on the queue's ring, tagged (`UserData.Kind.target`)
/// so the completion returns to the right request.
public struct BackingSubmitter {
    @usableFromInline let ring: IORing.Handle
    @usableFromInline let userData: UserData

    /// Fixed-file index of the target's first file (0 is /dev/ublkcN).
    public static let firstTargetFile: Int32 = 1

    @inlinable
    init(ring: IORing.Handle, tag: UInt16) {
        self.ring = ring
        userData = UserData(.target, tag: tag)
    }

    @inlinable
    init(ring: IORing.Handle, userData: UserData) {
        self.ring = ring
        self.userData = userData
    }

    /// A submitter for operations of the queue itself (kind `.queue`), whose completion
    /// goes to `QueueHandler.queueOperationCompleted` with `step`.
    @inlinable
    public func forQueue(step: UInt16) -> BackingSubmitter {
        BackingSubmitter(ring: ring, userData: UserData(.queue, tag: 0, step: step))
    }

    /// An SQE carrying this submitter's user data, for a liburing `io_uring_prep_*` call to
    /// fill: every method here makes one, which writes the whole SQE, so it is not zeroed
    /// first (always inlined, as `IORing.Handle.prepare`).
    @inlinable @inline(__always)
    func prepare() throws(SystemError) -> UnsafeMutablePointer<io_uring_sqe> {
        try ring.prepare(userData: userData.rawValue, zeroed: false)
    }

    /// Marks the prepared SQE's file as a fixed-file index (liburing's prep calls clear the flags).
    @inlinable
    func fixed(_ sqe: UnsafeMutablePointer<io_uring_sqe>) {
        sqe.pointee.flags |= UInt8(1 << IOSQE_FIXED_FILE_BIT)
    }

    /// Reads `count` bytes at `offset` of fixed file `file` into `buffer`.
    @inlinable @inline(__always)
    public func read(file: Int32, into buffer: UnsafeMutableRawPointer, count: Int, offset: Int64) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_rw(Int32(IORING_OP_READ.rawValue), sqe, file, buffer, UInt32(count), UInt64(offset))
        fixed(sqe)
    }

    /// Reads `count` bytes at `offset` of fixed file `file` into a request's data: its
    /// buffer (READ), or its registered pages (READ_FIXED, zero copy).
    @inlinable @inline(__always)
    public func read(file: Int32, into data: RequestData, count: Int, offset: Int64) throws(SystemError) {
        switch data {
        case .buffer(let address): try read(file: file, into: address, count: count, offset: offset)
        case .registered(let index, let bufferOffset):
            try fixedBuffer(IORING_OP_READ_FIXED, file: file, index: index, bufferOffset: bufferOffset, count: count, offset: offset)
        }
    }

    /// Writes a request's data (WRITE, or WRITE_FIXED from its registered pages).
    @inlinable @inline(__always)
    public func write(file: Int32, from data: RequestData, count: Int, offset: Int64, dsync: Bool) throws(SystemError) {
        switch data {
        case .buffer(let address): try write(file: file, from: address, count: count, offset: offset, dsync: dsync)
        case .registered(let index, let bufferOffset):
            let sqe = try fixedBuffer(IORING_OP_WRITE_FIXED, file: file, index: index, bufferOffset: bufferOffset,
                                      count: count, offset: offset)
            if dsync { sqe.pointee.rw_flags = Self.rwfDsync }
        }
    }

    /// READ_FIXED/WRITE_FIXED on registered buffer `index`: for buffers the kernel
    /// registered (a request's pages), the address is the offset into the buffer.
    @inlinable @discardableResult
    func fixedBuffer(_ op: io_uring_op, file: Int32, index: UInt16, bufferOffset: Int, count: Int,
                     offset: Int64) throws(SystemError) -> UnsafeMutablePointer<io_uring_sqe> {
        let sqe = try prepare()
        io_uring_prep_rw(Int32(op.rawValue), sqe, file, UnsafeRawPointer(bitPattern: bufferOffset), UInt32(count),
                         UInt64(offset))
        sqe.pointee.buf_index = index
        fixed(sqe)
        return sqe
    }

    /// Writes; `dsync` makes this write durable before it completes (FUA).
    @inlinable @inline(__always)
    public func write(file: Int32, from buffer: UnsafeRawPointer, count: Int, offset: Int64,
                      dsync: Bool) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_rw(Int32(IORING_OP_WRITE.rawValue), sqe, file, buffer, UInt32(count), UInt64(offset))
        if dsync { sqe.pointee.rw_flags = Self.rwfDsync }
        fixed(sqe)
    }

    /// fsync of the whole file.
    @inlinable
    public func fsync(file: Int32) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_fsync(sqe, file, 0)
        fixed(sqe)
    }

    /// fallocate with `FALLOC_FL_*` mode.
    @inlinable
    public func fallocate(file: Int32, mode: Int32, offset: Int64, length: Int64) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_fallocate(sqe, file, mode, off_t(offset), off_t(length))
        fixed(sqe)
    }

    /// `sendmsg` on a socket (a plain descriptor: a socket is replaced on reconnect, so it
    /// is not a fixed file). MSG_NOSIGNAL is always added: a dropped peer is an EPIPE
    /// result, not a signal. `message` must stay valid until the completion.
    @inlinable
    public func sendMessage(socket: Int32, _ message: UnsafePointer<msghdr>, flags: Int32 = 0) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_sendmsg(sqe, socket, message, UInt32(bitPattern: flags | Int32(MSG_NOSIGNAL)))
    }

    /// `recv` of up to `count` bytes from a socket (a plain descriptor) into `buffer`.
    @inlinable
    public func receive(socket: Int32, into buffer: UnsafeMutableRawPointer, count: Int,
                        flags: Int32 = 0) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_recv(sqe, socket, buffer, count, flags)
    }

    /// A timer: completes with -ETIME once `duration` (which must stay valid until then) passed.
    @inlinable
    public func timeout(_ duration: UnsafeMutablePointer<__kernel_timespec>) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_timeout(sqe, duration, 0, 0)
    }

    /// A one-shot poll of a plain descriptor for `events` (`POLLIN`...): completes with
    /// the events that are ready (a `Latch` raised, for one).
    @inlinable
    public func poll(file: Int32, events: Int16) throws(SystemError) {
        let sqe = try prepare()
        io_uring_prep_poll_add(sqe, file, UInt32(UInt16(bitPattern: events)))
    }

    /// The queue ring's descriptor, for a thread that answers this request by MSG_RING.
    @inlinable
    public var ringDescriptor: Int32 { ring.descriptor }

    /// The user data a completion for this request carries (a MSG_RING answer posts it).
    @inlinable
    public var requestUserData: UInt64 { userData.rawValue }

    /// Posts a completion with `data` and result 0 on the ring `ring` (another thread's),
    /// by MSG_RING on this queue's ring: it goes out with the queue's next submit. Only a
    /// failed send completes here, as this request's completion with the send's errno.
    @inlinable
    public func message(toRing ring: Int32, data: UInt64) throws(SystemError) {
        try self.ring.prepareMessage(toRing: ring, data: data, result: 0, userData: userData.rawValue)
    }

    /// Submits what is prepared now rather than at the queue's next turn (so another thread
    /// starts on a message, or the backing on a write, while this one goes on working); no
    /// system call when nothing is.
    @inlinable
    public func submitNow() throws(SystemError) { try ring.submitPrepared() }

    /// `RWF_DSYNC` from linux/fs.h (a cast macro, so not imported).
    public static let rwfDsync: UInt32 = 0x2
}
