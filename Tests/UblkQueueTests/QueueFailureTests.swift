import Glibc
import Logging
import Synchronization
import Testing
import UblkQueue
import UblkSystem
import UblkTargets

/// A device's queue threads are joined as they end: the failure of any one of them is
/// reported at once, while the others still serve their tags (the server stops the
/// device there), not after the threads started before it have ended.
@Suite struct QueueFailureTests {
    /// A target whose queues serve nothing: queue `failing` fails once it has fetched;
    /// the others run until `stopped` is set (what STOP_DEV does to a real queue), or
    /// give up after `patience` seconds and count that in `gaveUp`.
    final class ScriptedTarget: Target, @unchecked Sendable {
        let name = "scripted"
        let properties = TargetProperties(size: 1 << 20)
        let fixedFiles: [Int32] = []
        let failing: UInt16
        /// This queue returns at once without fetching (a target's serveQueue gone wrong).
        var idle: UInt16 = .max
        /// Queue `failing` winds down as the engine's does (`Queue.fail`): it says it failed,
        /// serves on until stopped, then throws.
        var windsDown = false
        let stopped = Atomic<Bool>(false)
        let gaveUp = Atomic<Int>(0)
        let patience: Double

        init(failing: UInt16, patience: Double = 10) {
            self.failing = failing
            self.patience = patience
        }

        func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) throws -> NullQueueHandler {
            try NullTarget(size: 1 << 20).makeQueueHandler(queueID: queueID, depth: depth, share: share)
        }

        func sync() throws {}

        func serveQueue(_ configuration: QueueConfiguration, characterDevice: Int32, logger: Logger,
                        fetched: () -> Void, failing: @escaping (any Error) -> Void) throws {
            if configuration.queueID == idle { return }
            fetched()
            let error = SystemError("io_uring_enter", errno: EIO)
            if configuration.queueID == self.failing {
                guard windsDown else { throw error }
                failing(error)
            }
            serveUntilStopped()
            if configuration.queueID == self.failing { throw error }
        }

        func serveUntilStopped() {
            let deadline = Self.now() + patience
            while !stopped.load(ordering: .acquiring) {
                if Self.now() > deadline {
                    gaveUp.add(1, ordering: .relaxed)
                    return
                }
                usleep(1000)
            }
        }

        static func now() -> Double {
            var time = timespec()
            clock_gettime(CLOCK_MONOTONIC, &time)
            return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
        }
    }

    func configuration(queue: UInt16) -> QueueConfiguration {
        QueueConfiguration(queueID: queue, depth: 4, buffers: .copy(bytesPerTag: 4096),
                           limits: DeviceLimits(sectors: 2048, maxIOBytes: 4096), encoding: .ioctl)
    }

    func run(_ target: ScriptedTarget, queues: UInt16) throws -> (failure: (any Error)?, reported: Int) {
        let threads = QueueThreads()
        for queue in 0..<queues {
            try threads.start(configuration(queue: queue), characterDevice: -1, target: target,
                              logger: Logger(label: "test"))
        }
        var reported = 0
        let failure = threads.joinAll { _ in
            reported += 1
            target.stopped.store(true, ordering: .releasing)
        }
        return (failure, reported)
    }

    @Test func aFailedQueueBehindARunningOneIsSeenAtOnce() throws {
        let target = ScriptedTarget(failing: 2)
        let (failure, reported) = try run(target, queues: 3)
        #expect((failure as? SystemError)?.errno == EIO)
        #expect(reported == 1)
        // Queues 0 and 1 were stopped because of queue 2's failure, not left to time out.
        #expect(target.gaveUp.load(ordering: .relaxed) == 0)
    }

    /// A queue that fails and winds down is reported as it starts to (so the device is
    /// stopped, which its winding down needs), and not once more when it ends.
    @Test func aQueueWindingDownIsReportedOnce() throws {
        let target = ScriptedTarget(failing: 1)
        target.windsDown = true
        let (failure, reported) = try run(target, queues: 2)
        #expect((failure as? SystemError)?.errno == EIO)
        #expect(reported == 1)
        #expect(target.gaveUp.load(ordering: .relaxed) == 0)
    }

    @Test func queuesThatEndOnTheirOwnReportNoFailure() throws {
        let target = ScriptedTarget(failing: .max, patience: 0.05)
        let (failure, reported) = try run(target, queues: 2)
        #expect(failure == nil)
        #expect(reported == 0)
        #expect(target.gaveUp.load(ordering: .relaxed) == 2)
    }

    /// A queue that returns without having fetched is a setup failure, not a thread the
    /// server would wait for forever.
    @Test func aQueueThatNeverFetchedFailsItsStart() throws {
        let target = ScriptedTarget(failing: .max)
        target.idle = 0
        #expect(throws: SystemError.self) {
            try QueueThreads().start(configuration(queue: 0), characterDevice: -1, target: target,
                                     logger: Logger(label: "test"))
        }
    }
}
