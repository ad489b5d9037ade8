import CUblk
import Glibc
import Logging
import UblkCrypto
import UblkSystem

/// One piece of a request's cipher work: encrypt a write's chunk into the tag's bounce
/// buffer, or decrypt a completed read in place. The queue thread runs it itself or hands
/// it to a cipher worker; both call `run`, so both do exactly the same.
struct CipherJob {
    enum Direction { case encrypt, decrypt }

    var direction = Direction.decrypt
    var source = UnsafeRawPointer(bitPattern: 1)!
    var destination = UnsafeMutableRawPointer(bitPattern: 1)!
    var count = 0
    /// dm-crypt IV sector of the first byte.
    var sector: UInt64 = 0
    /// Where a worker answers: the queue ring's descriptor and the request's user data.
    var replyRing: Int32 = -1
    var replyData: UInt64 = 0

    /// Runs the job with `cipher` (the caller's own); false if the cipher failed.
    func run(_ cipher: inout XTSCipher) -> Bool {
        do {
            switch direction {
            case .encrypt: try cipher.encrypt(source, into: destination, count: count, sector: sector)
            case .decrypt: try cipher.decrypt(destination, count: count, sector: sector)
            }
            return true
        } catch {
            return false
        }
    }
}

/// A queue's cipher worker threads, so that AES runs on more CPUs than the queue's one
/// (dm-crypt spreads it over kworkers). One pool per queue, not per device: the job records
/// are the queue's tags, every answer goes to the one queue ring, and the pool starts and
/// ends with the queue on the queue's thread; queues share nothing.
///
/// No locks: each worker has its own small io_uring ring and its own `XTSCipher` (OpenSSL
/// contexts are not thread-safe), keyed from the device's key in locked memory. The queue
/// thread fills the tag's `CipherJob`, then posts the tag to a worker's ring with MSG_RING
/// from its own ring (out with its next batched submit); the worker runs the job and posts
/// the request's user data back to the queue ring the same way, result 0, or -EIO if its
/// cipher failed. Memory ordering comes from the kernel: a CQE is published with a release
/// store of the CQ tail and reaped with an acquire load, so the job record written before
/// the send is seen by the worker, and the worker's output by the queue thread.
///
/// A tag's record is the worker's from the send until its answer is posted, and the queue
/// thread's otherwise. The pool ends by a stop message to every worker, sent after every
/// job (a worker handles its messages in order), and joins the threads.
final class CipherWorkers {
    /// One record per tag.
    let jobs: UnsafeMutableBufferPointer<CipherJob>
    /// Each worker's ring, where jobs are posted. (Settable for a test that points one at
    /// a descriptor that is no ring, to see failed handoffs handled.)
    var rings: [Int32] = []
    private var threads: [OSThread] = []
    /// Sends the stop messages, from whatever thread ends the pool (not single-issuer).
    private let control: IORing

    /// The user data of the stop message (a job's is its tag, below 2^16).
    static let stopMessage = UInt64.max

    /// The default worker count: one per CPU besides the queue thread's, at most 4 (AES-NI
    /// runs at GB/s per core: a few cores outrun the backing); none on one CPU.
    static var defaultCount: Int { min(4, max(0, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) - 1)) }

    /// Starts `count` workers for a queue of `depth` tags; each keys its own cipher from
    /// `key`. Returns once all of them are ready; throws (with none left running) if one is not.
    init(count: Int, depth: Int, key: EncryptionKey, unitSize: Int) throws {
        control = try IORing(entries: 8)
        jobs = .allocate(capacity: depth)
        jobs.initialize(repeating: CipherJob())
        // A worker that cannot start throws; deinit then stops those that did.
        for index in 0..<count {
            let worker = try CipherWorker.start(index: index, depth: depth, key: key, unitSize: unitSize,
                                                jobs: SharedJobs(base: jobs.baseAddress!))
            threads.append(worker.thread)
            rings.append(worker.ring)
        }
    }

    deinit {
        stop()
        jobs.deallocate()
    }

    var count: Int { rings.count }

    /// Stops every worker and joins it; safe to call again. Jobs already posted are done first.
    func stop() {
        guard !threads.isEmpty else { return }
        var unsent = Array(rings.indices)
        var reached = Array(repeating: true, count: rings.count)
        while !unsent.isEmpty {
            do {
                for index in unsent {
                    try control.handle.prepareMessage(toRing: rings[index], data: Self.stopMessage, result: 0,
                                                      userData: UInt64(index))
                }
                unsent = []
                try control.handle.submit(waitingFor: 0)
                // Only failed sends complete (CQE_SKIP_SUCCESS): those the kernel was short of memory for go again.
                control.handle.reap { (userData, result) in
                    if CipherWorker.isTransient(result) { unsent.append(Int(userData)) } else { reached[Int(userData)] = false }
                }
            } catch {
                Self.unreachable(error)
                return
            }
        }
        for (index, thread) in threads.enumerated() {
            // A worker the stop cannot reach cannot be joined: leave it (and say so) rather than hang.
            if reached[index] { thread.join() } else { Self.unreachable(SystemError("IORING_OP_MSG_RING", errno: EBADFD)) }
        }
        threads = []
        rings = []
    }

    private static func unreachable(_ error: Error) {
        CipherWorker.logger.critical("cipher workers: cannot send the stop message: \(error)")
    }
}

/// The job records, handed to worker threads. `@unchecked Sendable`: each record has one
/// owner at a time, handed over by MSG_RING (see `CipherWorkers`).
struct SharedJobs: @unchecked Sendable {
    let base: UnsafeMutablePointer<CipherJob>
}

/// One cipher worker thread: its ring and cipher live on its stack, made on the thread
/// (a single-issuer ring belongs to the thread that made it).
enum CipherWorker {
    static let logger = Logger(label: "ublk")

    /// User data of a worker's answer (flag, then the tag): only a failed answer completes.
    static let answerFlag: UInt64 = 1 << 32
    static let failedFlag: UInt64 = 1 << 33

    /// What a starting worker reports: its ring, or why it could not start.
    final class Start: @unchecked Sendable {
        // Written by the worker before `ready.signal()`, read after `ready.wait()`.
        var ring: Int32 = -1
        var error: Error?
        let ready = Semaphore()
    }

    /// Starts worker `index` and waits until its ring and cipher are made.
    static func start(index: Int, depth: Int, key: EncryptionKey, unitSize: Int,
                      jobs: SharedJobs) throws -> (thread: OSThread, ring: Int32) {
        let start = Start()
        let thread = try OSThread {
            _ = cublk_set_thread_name("ublk-crypt\(index)")
            // Made on a queue thread pinned to its queue's CPUs: the point is other CPUs.
            _ = cublk_use_process_affinity()
            do {
                // CQ of 2 × depth: room for a job and a failed answer per tag, and the stop.
                let ring = try IORing(entries: UInt32(max(depth, 8)), preferredFlags: IORing.singleIssuerFlag)
                var cipher = try XTSCipher(key: key.key, unitSize: unitSize)
                start.ring = ring.descriptor
                start.ready.signal()
                serve(ring.handle, cipher: &cipher, jobs: jobs.base)
            } catch {
                start.error = error
                start.ready.signal()
            }
        }
        start.ready.wait()
        if let error = start.error {
            thread.join()
            throw error
        }
        return (thread, start.ring)
    }

    /// The worker's loop: wait for messages, run each job and answer it at once (the queue
    /// thread may be waiting for it), until the stop message.
    static func serve(_ ring: IORing.Handle, cipher: inout XTSCipher, jobs: UnsafeMutablePointer<CipherJob>) {
        var running = true
        do {
            while running {
                try ring.submit(waitingFor: 1)
                try ring.reap { (userData, result) throws(SystemError) in
                    if userData == CipherWorkers.stopMessage {
                        running = false
                    } else if userData & answerFlag == 0 {
                        let tag = Int(truncatingIfNeeded: userData & 0xffff)
                        try answer(tag, done: jobs[tag].run(&cipher), ring, jobs)
                        try ring.submit()
                    } else {
                        try answerFailed(userData, result: result, ring, jobs)
                    }
                }
            }
        } catch {
            logger.critical("cipher worker: \(error): its queue's requests will not complete")
        }
    }

    /// A MSG_RING that failed for want of memory (or CQ room), and may be sent again.
    static func isTransient(_ result: Int32) -> Bool {
        result == -ENOMEM || result == -EOVERFLOW || result == -EAGAIN
    }

    /// Posts the tag's answer to the queue ring.
    static func answer(_ tag: Int, done: Bool, _ ring: IORing.Handle,
                       _ jobs: UnsafeMutablePointer<CipherJob>) throws(SystemError) {
        let job = jobs[tag]
        try ring.prepareMessage(toRing: job.replyRing, data: job.replyData, result: done ? 0 : -EIO,
                                userData: answerFlag | (done ? 0 : failedFlag) | UInt64(tag))
    }

    /// An answer could not be posted (`result`): the record is still the worker's (the queue
    /// never saw the answer), so send it again if the kernel was only short of memory.
    static func answerFailed(_ userData: UInt64, result: Int32, _ ring: IORing.Handle,
                             _ jobs: UnsafeMutablePointer<CipherJob>) throws(SystemError) {
        let tag = Int(truncatingIfNeeded: userData & 0xffff)
        guard isTransient(result) else {
            let reason = SystemError("IORING_OP_MSG_RING", errno: -result)
            logger.critical("cipher worker: answer for tag \(tag) lost: \(reason)")
            return
        }
        try answer(tag, done: userData & failedFlag == 0, ring, jobs)
        try ring.submit()
    }
}
