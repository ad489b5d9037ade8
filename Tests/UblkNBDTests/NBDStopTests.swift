import Glibc
import Testing
import UblkQueue
import UblkSystem
import UblkTargets
import UblkTesting
@testable import UblkNBD

/// A device being stopped (a signal to its server, `ublk del --force`) waits for every
/// request in flight: once told (`NBDTarget.stopRequested`), the nbd target lets none of
/// them wait for a server that is down, as `nbd-client -d` fails them at once.
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

    /// A server that takes the READ and says nothing, its connection up: the stop leaves
    /// the connection alone (a FLUSH may be slow); the watchdog (2 s here) gives it up as
    /// ever, and then, stopping, it is not tried again: EIO, one connection.
    @Test func aStopLeavesASilentConnectionToTheWatchdog() throws {
        let server = try LoopbackServer { _, _ in .ignore }
        defer { server.stop() }
        var configuration = NBDConfiguration(uri: server.uri)
        configuration.reconnectTimeout = 2
        let target = try NBDTarget(configuration, minimumSilence: .seconds(1))
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        let stopper = try OSThread {
            Self.awaitFirstRequest(server)
            target.stopRequested()
        }
        let (result, took) = try Self.reapOne(queue, after: Self.read)
        stopper.join()
        #expect(result == -EIO)
        #expect(took >= .milliseconds(1900) && took < .seconds(4), "the READ waited \(took)")
        #expect(server.connections == 1, "a stopping device reconnected")
    }

    /// A server that answers is not cut off by the stop: the requests the stop waits for
    /// (the file system's last writes) still go through.
    @Test func aStopLeavesAWorkingConnectionAlone() throws {
        let server = try LoopbackServer { _, _ in .reply(error: 0) }
        defer { server.stop() }
        let target = try server.target(timeout: 30)
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        #expect(try queue.perform(Self.read) == 8192)
        target.stopRequested()
        for _ in 0..<5 {
            usleep(100_000)
            #expect(try queue.perform(Self.read) == 8192)
        }
        #expect(server.connections == 1)
    }

    /// A stop that does not come (STOP_DEV failed, `ublk del` interrupted) does not leave
    /// the device without reconnects: after `stopExpiry` (0.3 s here) a lost connection is
    /// reconnected and the READ answered, as before the stop.
    @Test func aStopThatDoesNotComeExpires() throws {
        let server = try LoopbackServer { connection, request in
            connection == 0 && request.offset == 8 * 512 ? .hangUp : .reply(error: 0)
        }
        defer { server.stop() }
        var configuration = NBDConfiguration(uri: server.uri)
        configuration.reconnectTimeout = 30
        let target = try NBDTarget(configuration, stopExpiry: .milliseconds(300))
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 8)) == 4096)
        target.stopRequested()
        // The handler hears of the stop on its ring's next turn, and of its expiry later.
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 8)) == 4096)
        usleep(500_000)
        #expect(try queue.perform(Self.read) == 8192)
        #expect(server.connections == 2)
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
