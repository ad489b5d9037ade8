import Glibc

/// A plain OS thread (pthread) running one closure.
///
/// Queue threads block in `io_uring_enter` and the kernel ties a ublk queue to the
/// task that fetched on it, so they cannot be Swift tasks that hop between threads.
public struct OSThread: Sendable {
    private let handle: pthread_t

    /// Starts a thread running `body`.
    public init(_ body: @escaping @Sendable () -> Void) throws(SystemError) {
        final class Box {
            let body: @Sendable () -> Void
            init(_ body: @escaping @Sendable () -> Void) { self.body = body }
        }
        let context = Unmanaged.passRetained(Box(body)).toOpaque()
        var handle = pthread_t()
        let result = pthread_create(&handle, nil, { context in
            Unmanaged<Box>.fromOpaque(context!).takeRetainedValue().body()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<Box>.fromOpaque(context).release()
            throw SystemError("pthread_create", errno: result)
        }
        self.handle = handle
    }

    /// Waits for the thread to end.
    public func join() { pthread_join(handle, nil) }

    /// Lets the thread end on its own; it cannot be joined afterwards.
    public func detach() { pthread_detach(handle) }
}

/// A counting semaphore on a pthread mutex and condition (no Foundation, no Dispatch).
/// The pthread objects live on the heap: they must not move once initialised.
/// `@unchecked Sendable` is safe: `count` is only touched with `mutex` held, and the
/// pointers themselves never change.
public final class Semaphore: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var count = 0

    public init() {
        pthread_mutex_init(mutex, nil)
        // Timed waits on the monotonic clock: a step of the wall clock (NTP at boot) must
        // neither stretch nor cut them.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    public func signal() {
        pthread_mutex_lock(mutex)
        count += 1
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    public func wait() {
        pthread_mutex_lock(mutex)
        while count == 0 { pthread_cond_wait(condition, mutex) }
        count -= 1
        pthread_mutex_unlock(mutex)
    }

    /// Waits at most `timeout`; false if it passed without a signal.
    public func wait(timeout: Duration) -> Bool {
        // The condition's clock is CLOCK_MONOTONIC (`init`).
        var end = timespec()
        clock_gettime(CLOCK_MONOTONIC, &end)
        let (seconds, attoseconds) = timeout.components
        let nanoseconds = Int(end.tv_nsec) + Int(attoseconds / 1_000_000_000)
        end.tv_sec += Int(seconds) + nanoseconds / 1_000_000_000
        end.tv_nsec = nanoseconds % 1_000_000_000
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while count == 0 {
            // (Any failure but a wake-up ends the wait as a timeout would: no spinning.)
            if pthread_cond_timedwait(condition, mutex, &end) != 0 && count == 0 { return false }
        }
        count -= 1
        return true
    }
}
