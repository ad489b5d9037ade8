import CUblk
import Glibc
import Logging
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
/// the queue thread ends and read after `pthread_join`.
public final class QueueThread: @unchecked Sendable {
    private var thread: OSThread?
    private let configuration: QueueConfiguration
    private let characterDevice: Int32
    private let target: any Target
    private let logger: Logger
    private let ready = Semaphore()
    // Written by the queue thread before it posts `ready` / before it ends; read after.
    private var setupError: Error?
    private var runError: Error?

    /// Starts the thread; returns once its queue has fetched every tag (or failed to set up).
    public static func start(_ configuration: QueueConfiguration, characterDevice: Int32, target: any Target,
                             logger: Logger) throws -> QueueThread {
        let queueThread = QueueThread(configuration, characterDevice: characterDevice, target: target, logger: logger)
        queueThread.thread = try OSThread { queueThread.main() }
        queueThread.ready.wait()
        if let error = queueThread.setupError {
            queueThread.join()
            throw error
        }
        return queueThread
    }

    private init(_ configuration: QueueConfiguration, characterDevice: Int32, target: any Target, logger: Logger) {
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
            }
        } catch {
            if fetched { runError = error } else { setupError = error }
        }
        if !fetched { ready.signal() }
    }

    /// Waits for the thread to end (after STOP_DEV aborted its fetches); the queue's
    /// ring, mapping and buffers are released by then. Returns the error that ended it early, if any.
    @discardableResult
    public func join() -> Error? {
        thread?.join()
        thread = nil
        return runError
    }
}
