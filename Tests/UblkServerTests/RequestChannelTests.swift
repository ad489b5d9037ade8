import Glibc
import Logging
import Synchronization
import Testing
import UblkQueue
import UblkSystem
import UblkTargets
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

    /// `stopping` (sent by `ublk del --force` before STOP_DEV) reaches the target, so an nbd
    /// target fails what waits for a server that is down instead of holding up the stop.
    @Test func stoppingReachesTheTarget() {
        let target = StopCountingTarget()
        let channel = ServerControl(deviceID: 0, capacity: DeviceCapacity(sectors: 8), target: target, record: nil,
                                    logger: Logger(label: "test"))
        #expect(channel.handle("stopping") == "ok")
        #expect(target.stops.load(ordering: .relaxed) == 1)
        #expect(channel.handle("stopping now").hasPrefix("error unknown request"))
        #expect(target.stops.load(ordering: .relaxed) == 1)
    }
}

/// A null target that counts the stops it is told of.
final class StopCountingTarget: Target {
    let inner = NullTarget(size: 4096)
    let stops = Atomic<Int>(0)
    var name: String { "counting" }
    var properties: TargetProperties { inner.properties }
    var fixedFiles: [Int32] { [] }
    func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) -> NullQueueHandler {
        inner.makeQueueHandler(queueID: queueID, depth: depth, share: share)
    }
    func sync() throws {}
    func stopRequested() { stops.add(1, ordering: .relaxed) }
}
