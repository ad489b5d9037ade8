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
public struct IORing: ~Copyable {
    @usableFromInline let ring: UnsafeMutablePointer<io_uring>

    /// The setup flags the ring was created with (the kernel may have refused the preferred ones).
    public let flags: UInt32

    /// Flags that make a single-thread ring cheaper when the kernel knows them: one
    /// submitter, completions run when we enter the kernel to wait instead of by IPI.
    public static let singleThreadFlags: UInt32 =
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_DEFER_TASKRUN

    /// Sets up a ring with `entries` submission slots. `flags` are `IORING_SETUP_*`;
    /// if the kernel rejects `preferredFlags` (older kernel: EINVAL) the ring is set up
    /// without them.
    public init(entries: UInt32, flags required: UInt32 = 0, preferredFlags: UInt32 = 0) throws(SystemError) {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var result = io_uring_queue_init(entries, ring, required | preferredFlags)
        var used = required | preferredFlags
        if result == -EINVAL && preferredFlags != 0 {
            result = io_uring_queue_init(entries, ring, required)
            used = required
        }
        guard result == 0 else {
            ring.deallocate()
            throw SystemError("io_uring_queue_init", errno: result)
        }
        self.ring = ring
        self.flags = used
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
    }

    /// The next free SQE, submitting what is queued when the ring is full. liburing
    /// strides 128 bytes per SQE itself on SQE128 rings.
    @inlinable
    public func nextSubmission() throws(SystemError) -> UnsafeMutablePointer<io_uring_sqe> {
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        _ = try submit()
        guard let sqe = io_uring_get_sqe(ring) else { throw SystemError("io_uring_get_sqe", errno: EBUSY) }
        return sqe
    }

    /// Hands every prepared SQE to the kernel.
    @inlinable
    public func submit() throws(SystemError) -> Int {
        try submit(waitingFor: 0)
    }

    /// Submits prepared SQEs and waits until at least `count` completions are ready.
    @inlinable
    public func submit(waitingFor count: UInt32) throws(SystemError) -> Int {
        while true {
            let result = count == 0 ? io_uring_submit(ring) : io_uring_submit_and_wait(ring, count)
            if result >= 0 { return Int(result) }
            if result == -EINTR { continue }
            // EBUSY/EAGAIN: the completion queue is full; the caller must reap first.
            if (result == -EBUSY || result == -EAGAIN) && io_uring_cq_ready(ring) > 0 { return 0 }
            throw SystemError("io_uring_enter", errno: result)
        }
    }

    /// The next completion, if one is ready; release it with `markSeen`.
    @inlinable
    public func peekCompletion() -> UnsafeMutablePointer<io_uring_cqe>? {
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        return io_uring_peek_cqe(ring, &cqe) == 0 ? cqe : nil
    }

    /// Returns a completion's slot to the kernel.
    @inlinable
    public func markSeen(_ cqe: UnsafeMutablePointer<io_uring_cqe>) {
        io_uring_cqe_seen(ring, cqe)
    }

    /// Registers `descriptors` as fixed files 0..<n (saves a file lookup per operation).
    public func registerFiles(_ descriptors: [Int32]) throws(SystemError) {
        let result = descriptors.withUnsafeBufferPointer {
            io_uring_register_files(ring, $0.baseAddress, UInt32($0.count))
        }
        guard result == 0 else { throw SystemError("io_uring_register_files", errno: result) }
    }

    /// The raw liburing handle, for code that prepares SQEs itself.
    public var handle: UnsafeMutablePointer<io_uring> { ring }
}

extension UnsafeMutablePointer where Pointee == io_uring_sqe {
    /// The command area of an `IORING_OP_URING_CMD` SQE (16 bytes, 80 with SQE128).
    @inlinable
    public var commandArea: UnsafeMutableRawPointer { cublk_sqe_cmd(self) }
}
