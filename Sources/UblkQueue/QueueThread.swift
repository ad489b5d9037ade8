import CUblk
import Glibc
import Logging
import Synchronization
import UblkSystem

/// A dedicated OS thread that sets up one `Queue` and serves it until the device stops.
///
/// Plain pthreads, not Swift tasks: the thread blocks in `io_uring_enter`, and the
/// kernel ties a queue to the task that issued its first FETCH.
///
/// `@unchecked Sendable` is safe because the mutable fields have one writer at a time,
/// ordered by a synchronising call: `thread` is written by the starting thread before
/// and after the queue thread exists (join); `setupError` is written by the queue thread
/// before it posts `ready` and read after `ready.wait()`; `runError` is written before
/// the queue thread ends and read after `pthread_join`; `failure` is written before
/// `failing` is set (releasing) and read after it is seen set (acquiring); `finished`
/// and `failing` are atomic; `failureReported` is the joining thread's alone.
final class QueueThread: @unchecked Sendable {
    private var thread: OSThread?
    private let configuration: QueueConfiguration
    private let characterDevice: Int32
    private let target: any Target
    private let logger: Logger
    private let ready = UblkSystem.Semaphore()
    /// Signalled once when the thread ends after its queue got going (`QueueThreads`).
    private let ended: UblkSystem.Semaphore
    /// Set just before `ended` is signalled.
    private let finished = Atomic<Bool>(false)
    /// The queue failed and winds down (`Queue.fail`); set, with `failure`, before `ended`
    /// is signalled for it, which happens once more when the thread ends.
    private let failing = Atomic<Bool>(false)
    private var failure: Error?
    /// `QueueThreads.joinAll` has reported the failure.
    var failureReported = false
    // Written by the queue thread before it posts `ready` / before it ends; read after.
    private var setupError: Error?
    private var runError: Error?

    /// Starts the thread; returns once its queue has fetched every tag (or failed to set up).
    static func start(_ configuration: QueueConfiguration, characterDevice: Int32, target: any Target,
                      logger: Logger, ended: UblkSystem.Semaphore) throws -> QueueThread {
        let queueThread = QueueThread(configuration, characterDevice: characterDevice, target: target, logger: logger,
                                      ended: ended)
        queueThread.thread = try OSThread { queueThread.main() }
        queueThread.ready.wait()
        if let error = queueThread.setupError {
            queueThread.join()
            throw error
        }
        return queueThread
    }

    private init(_ configuration: QueueConfiguration, characterDevice: Int32, target: any Target, logger: Logger,
                 ended: UblkSystem.Semaphore) {
        self.ended = ended
        self.configuration = configuration
        self.characterDevice = characterDevice
        self.target = target
        self.logger = logger
    }

    private func main() {
        let share = configuration.share
        _ = cublk_set_thread_name("ublk-q\(configuration.queueID)" + (share.count > 1 ? ".\(share.index)" : ""))
        if let mask = configuration.cpuMask, mask.contains(where: { $0 != 0 }) {
            _ = mask.withUnsafeBytes { cublk_set_affinity_mask($0.baseAddress, $0.count) }
        }
        var fetched = false
        do {
            try target.serveQueue(configuration, characterDevice: characterDevice, logger: logger) {
                fetched = true
                ready.signal()
            } failing: { [self] error in
                failure = error
                failing.store(true, ordering: .releasing)
                ended.signal()
            }
            // A target's own serveQueue that returns without having fetched served nothing.
            if !fetched { setupError = SystemError("the queue ended before it fetched its tags", errno: EIO) }
        } catch {
            if fetched { runError = error } else { setupError = error }
        }
        if fetched {
            finished.store(true, ordering: .releasing)
            ended.signal()
        } else {
            ready.signal()
        }
    }

    /// The thread has ended (after its queue got going); `join` waits for its last instructions only.
    var hasEnded: Bool { finished.load(ordering: .acquiring) }

    /// Why the queue failed, once it has (it may still be winding down).
    var failingError: Error? { failing.load(ordering: .acquiring) ? failure : nil }

    /// Waits for the thread to end (after STOP_DEV aborted its fetches); the queue's
    /// ring, mapping and buffers are released by then. Returns the error that ended it early, if any.
    @discardableResult
    func join() -> Error? {
        thread?.join()
        thread = nil
        return runError
    }
}

/// The queue threads of one device, joined in the order they end: a thread whose queue
/// fails is seen at once, while the others still serve their tags, rather than when its
/// turn to be joined comes. (Joined in the order they started, a failed second queue,
/// or a failed thread sharing a queue, went unnoticed behind a first one that ran on:
/// requests on its tags hung until the device was stopped by other means.)
public final class QueueThreads {
    private var running: [QueueThread] = []
    /// One signal per thread that ended (`QueueThread.ended`).
    private let ended = UblkSystem.Semaphore()

    public init() {}

    /// Starts a queue thread; returns once its queue has fetched its tags, or throws why it could not.
    public func start(_ configuration: QueueConfiguration, characterDevice: Int32, target: any Target,
                      logger: Logger) throws {
        running.append(try QueueThread.start(configuration, characterDevice: characterDevice, target: target,
                                             logger: logger, ended: ended))
    }

    /// Waits until every thread has ended, joining each as it ends. `failed` runs at once,
    /// once, for each whose queue failed: as it starts to wind down (answering its requests
    /// with EIO until the device stops), or as it ends with an error. The server stops the
    /// device there, which ends the others. Returns the first such error.
    public func joinAll(failed: (any Error) -> Void = { _ in }) -> (any Error)? {
        var failure: (any Error)?
        func report(_ thread: QueueThread, _ error: any Error) {
            guard !thread.failureReported else { return }
            thread.failureReported = true
            failure = failure ?? error
            failed(error)
        }
        while !running.isEmpty {
            // A signal per thread that ended, and one per queue that failed before: a wake
            // finds at most one thread to join, and a failure's wake may find none.
            ended.wait()
            for thread in running { if let error = thread.failingError { report(thread, error) } }
            guard let index = running.firstIndex(where: { $0.hasEnded }) else { continue }
            let thread = running.remove(at: index)
            if let error = thread.join() { report(thread, error) }
        }
        return failure
    }
}
