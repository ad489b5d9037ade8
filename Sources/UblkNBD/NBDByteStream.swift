import UblkSystem

/// A blocking byte stream the handshake runs over: a connected socket, or a scripted
/// server in tests.
public protocol NBDByteStream: ~Copyable {
    /// Sends every byte of `bytes`, or throws.
    func sendAll(_ bytes: UnsafeRawBufferPointer) throws
    /// Fills all of `buffer`; false when the peer closed the connection first.
    func receiveAll(into buffer: UnsafeMutableRawBufferPointer) throws -> Bool
}

/// A socket is one as it is: `FileDescriptor.sendAll`/`receiveAll` (UblkSystem).
extension FileDescriptor: NBDByteStream {}
