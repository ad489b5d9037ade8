import Glibc
import Testing
import UblkSystem
@testable import UblkServer

/// The request channel's socket and line protocol (what `ublk resize` and `ublk upgrade`
/// talk to a server through), on the host: no device needed.
@Suite struct RequestChannelTests {
    @Test func lineRoundTripOnAPrivateSocket() throws {
        let path = "/tmp/ublk-test-channel-\(getpid()).sock"
        defer { unlink(path) }
        let listener = try UnixListener(path: path)
        var status = stat()
        #expect(stat(path, &status) == 0)
        #expect(status.st_mode & 0o077 == 0, "only its owner (root) may talk to a server")

        let server = try OSThread {
            guard let client = try? listener.accept() else { return }
            let request = UnixLine.read(client)
            UnixLine.write("ok \(request.count)", to: client)
        }
        let socket = try FileDescriptor.connect(to: .unix(path: path), timeout: .seconds(5))
        try socket.setStreamTimeout(.seconds(5))
        UnixLine.write("resize 4096", to: socket)
        #expect(UnixLine.read(socket) == "ok 11")
        #expect(UnixLine.read(socket) == "", "the server closed the connection after its one answer")
        server.join()
    }

    @Test func aStaleSocketFileIsReplaced() throws {
        let path = "/tmp/ublk-test-stale-\(getpid()).sock"
        defer { unlink(path) }
        _ = try UnixListener(path: path)
        // The first listener is gone (closed); its file stays, as after a crash.
        #expect(access(path, F_OK) == 0)
        let listener = try UnixListener(path: path)
        #expect(listener.path == path)
    }
}
