import UblkSystem

/// A blocking byte stream the handshake runs over: a connected socket, or a scripted
/// server in tests.
public protocol NBDByteStream: ~Copyable {
    /// Sends every byte of `bytes`, or throws.
    func sendAll(_ bytes: UnsafeRawBufferPointer) throws
    /// Fills all of `buffer`; false when the peer closed the connection first.
    func receiveAll(into buffer: UnsafeMutableRawBufferPointer) throws -> Bool
}

extension FileDescriptor: NBDByteStream {
    public func sendAll(_ bytes: UnsafeRawBufferPointer) throws {
        var sent = 0
        while sent < bytes.count {
            sent += try send(UnsafeRawBufferPointer(rebasing: bytes[sent...]))
        }
    }

    public func receiveAll(into buffer: UnsafeMutableRawBufferPointer) throws -> Bool {
        var filled = 0
        while filled < buffer.count {
            let count = try receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
            if count == 0 { return false }
            filled += count
        }
        return true
    }
}
