import Glibc
import Logging
import UblkControl
import UblkQueue
import UblkSystem

/// Turns SIGTERM, SIGINT and SIGHUP into STOP_DEV for the served device.
///
/// The signals are blocked in every thread (queue threads inherit the mask) and taken
/// synchronously by one watcher thread with `sigwait`, so no work happens in a signal
/// handler. STOP_DEV lets in-flight requests finish, then aborts the queues' fetches,
/// which ends the queue threads; the server then syncs, closes and deletes the device.
/// The target hears of the stop first (`Target.stopRequested`): the in-flight requests
/// STOP_DEV waits for must not wait long.
final class SignalWatcher: Sendable {
    private let deviceID: UInt32
    private let target: any Target
    private let logger: Logger
    static let signals: [Int32] = [SIGTERM, SIGINT, SIGHUP]

    init(deviceID: UInt32, target: any Target, logger: Logger) {
        self.deviceID = deviceID
        self.target = target
        self.logger = logger
    }

    private static func signalSet() -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in signals { sigaddset(&set, signal) }
        return set
    }

    /// Blocks the signals in the calling thread (and so in the threads it creates later).
    /// Done before the device exists: a signal that arrives during bring-up stays
    /// pending until the watcher takes it, then stops the device like any other.
    static func blockSignals() {
        var set = Self.signalSet()
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Starts the watcher thread.
    func start() {
        do { try OSThread { self.watch() }.detach() } catch {
            logger.error("no signal watcher: \(error)")
        }
    }

    private func watch() {
        var set = Self.signalSet()
        var signal: Int32 = 0
        while sigwait(&set, &signal) != 0 {}
        logger.info("signal \(signal): stopping /dev/ublkb\(deviceID)")
        SystemdNotifier.notify("STOPPING=1\nSTATUS=Stopping /dev/ublkb\(deviceID)")
        requestStop()
    }

    /// STOP_DEV from a control ring of this thread's own.
    func requestStop() {
        target.stopRequested()
        do {
            let control = try ControlDevice()
            try control.stopDevice(deviceID)
        } catch {
            logger.error("stopping device \(deviceID): \(error)")
        }
    }
}
