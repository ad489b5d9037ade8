import Glibc
import Testing
import UblkQueue
import UblkSystem
import UblkTargets
import UblkTesting
@testable import UblkNBD

/// A device being stopped (a signal to its server, `ublk del --force`) waits for every
/// request in flight: once told (`NBDTarget.stopRequested`), the nbd target lets none of
/// them wait for a server that is down or silent, as `nbd-client -d` fails them at once.
/// With 30 s of reconnect budget each request here would otherwise wait 30 s.
@Suite struct NBDStopTests {
    static let read = IODescriptor(operation: .read, startSector: 8, sectorCount: 16)

    /// The server goes away under a READ; the stop fails it, and new I/O fails at once.
    @Test func aStopFailsWhatWaitsForAServerThatIsDown() throws {
        let server = try LoopbackServer { _, _ in .hangUp }
        let target = try server.target(timeout: 30)
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        let stopper = try OSThread {
            Self.awaitFirstRequest(server)
            server.stop() // connections are refused from now on
            usleep(300_000)
            target.stopRequested()
        }
        let (result, took) = try Self.reapOne(queue, after: Self.read)
        stopper.join()
        #expect(result == -EIO)
        #expect(took < .seconds(5), "the READ waited \(took) for a server that is down")
        let again = ContinuousClock.now
        #expect(try queue.perform(Self.read) == -EIO)
        #expect(again.duration(to: .now) < .seconds(1))
    }

    /// A server that takes the READ and says nothing, its connection up: once the device
    /// stops, the READ gets the stop's grace (0.5 s here), not the watchdog's 30 s.
    @Test func aStopGivesASilentServerItsGraceOnly() throws {
        let server = try LoopbackServer { _, _ in .ignore }
        defer { server.stop() }
        var configuration = NBDConfiguration(uri: server.uri)
        configuration.reconnectTimeout = 30
        let target = try NBDTarget(configuration, stopGrace: .milliseconds(500))
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        let stopper = try OSThread {
            Self.awaitFirstRequest(server)
            target.stopRequested()
        }
        let (result, took) = try Self.reapOne(queue, after: Self.read)
        stopper.join()
        #expect(result == -EIO)
        #expect(took < .seconds(4), "the READ waited \(took) on a silent server after the stop")
        #expect(server.connections == 1, "a stopping device reconnected")
    }

    /// A server that answers is not cut off by the stop: the requests the stop waits for
    /// (the file system's last writes) still go through.
    @Test func aStopLeavesAWorkingConnectionAlone() throws {
        let server = try LoopbackServer { _, _ in .reply(error: 0) }
        defer { server.stop() }
        var configuration = NBDConfiguration(uri: server.uri)
        configuration.reconnectTimeout = 30
        let target = try NBDTarget(configuration, stopGrace: .milliseconds(200))
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        #expect(try queue.perform(Self.read) == 8192)
        target.stopRequested()
        for _ in 0..<5 {
            usleep(100_000)
            #expect(try queue.perform(Self.read) == 8192)
        }
        #expect(server.connections == 1)
    }

    static func awaitFirstRequest(_ server: LoopbackServer) {
        while server.log.requests.withLock({ $0.first?.isEmpty ?? true }) { usleep(10_000) }
    }

    /// Starts `descriptor` on tag 0 and reaps until it finished: its result and how long that took.
    static func reapOne(_ queue: OfflineQueue<NBDTarget>, after descriptor: IODescriptor) throws -> (Int32, Duration) {
        let started = ContinuousClock.now
        try queue.start(tag: 0, descriptor)
        var result: Int32?
        while result == nil { try queue.reap { _, value in result = value } }
        return (result!, started.duration(to: .now))
    }
}
