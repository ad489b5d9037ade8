import Glibc

/// A failed system call: which call, on what, and the errno it returned.
///
/// Every layer throws this (or wraps it), so a message always names the call that
/// failed, as in `open /dev/ublk-control: No such file or directory`.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The call that failed, with its object when that helps (`"open /dev/ublkc0"`).
    public var call: String
    /// The positive errno value.
    public var errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno < 0 ? -errno : errno
    }

    /// The errno of the last failed libc call.
    static func last(_ call: String) -> SystemError {
        SystemError(call, errno: Glibc.errno)
    }

    /// `strerror` text for the errno.
    public var reason: String { String(cString: strerror(errno)) }

    public var description: String { "\(call): \(reason)" }
}

/// Runs `body` again while it fails with EINTR; throws a `SystemError` on any other failure.
@inline(__always)
func retryingOnInterrupt<T: BinaryInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        if Glibc.errno != EINTR { throw SystemError.last(call()) }
    }
}
