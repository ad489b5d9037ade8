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
