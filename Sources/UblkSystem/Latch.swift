import Synchronization

/// A flag one thread raises for threads that sleep in `io_uring_enter`, which no atomic
/// store would wake: the read end of a pipe turns readable, and stays readable (nobody
/// reads the byte), when `raise` writes to it. A ring learns of it with a poll on
/// `descriptor`; every poll completes, armed before the raise or after, until `lower`.
public final class Latch: Sendable {
    private let readEnd: FileDescriptor
    private let writeEnd: FileDescriptor
    private let raised = Atomic<Bool>(false)

    public init() throws(SystemError) {
        let (readEnd, writeEnd) = try Syscalls.pipe()
        self.readEnd = FileDescriptor(adopting: readEnd)
        self.writeEnd = FileDescriptor(adopting: writeEnd)
        // (`lower` must not block on a pipe that a raise has not written to yet.)
        Syscalls.setNonBlocking(readEnd)
    }

    /// What a ring polls for `POLLIN` to learn of the raise.
    public var descriptor: Int32 { readEnd.rawValue }

    /// Raises the latch; once raised, again does nothing. Never blocks: one byte into an
    /// empty pipe.
    public func raise() {
        guard !raised.exchange(true, ordering: .acquiringAndReleasing) else { return }
        _ = withUnsafeBytes(of: UInt8(1)) { try? Syscalls.write(writeEnd.rawValue, $0) }
    }

    /// Lowers the latch: polls wait again. Lowered, does nothing.
    public func lower() {
        guard raised.exchange(false, ordering: .acquiringAndReleasing) else { return }
        withUnsafeTemporaryAllocation(byteCount: 16, alignment: 1) { _ = try? Syscalls.read(readEnd.rawValue, $0) }
    }
}
