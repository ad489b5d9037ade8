import CLiburing
import CUblk
import Glibc
import Logging
import Testing
@testable import UblkQueue
import UblkSystem
import UblkTesting

/// A queue whose turn fails does not leave with requests in its hands: it answers each
/// with EIO, answers every later one at once, and drops the completions of I/O it had
/// started for the requests it gave up. (On 7.x the kernel fails held requests only when
/// /dev/ublkcN closes, so STOP_DEV, which waits for them, hung once the thread had left.)
@Suite struct QueueWindDownTests {
    /// Reads wait on a 300 ms timer standing in for a slow backing; writes stay in the
    /// handler's hands with nothing in flight; a FLUSH submits an operation of the queue,
    /// a 50 ms timer whose completion throws, as a handler does that lost track of its state.
    final class StallingTarget: Target, @unchecked Sendable {
        let name = "stalling"
        let properties = TargetProperties(size: 1 << 20)
        let fixedFiles: [Int32] = []
        let handler = Handler()

        final class Handler: QueueHandler {
            var completions = 0
            /// The read's delay, then the flush's.
            let delays = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 2)

            init() {
                delays.initialize(to: __kernel_timespec(tv_sec: 0, tv_nsec: 300_000_000))
                (delays + 1).initialize(to: __kernel_timespec(tv_sec: 0, tv_nsec: 50_000_000))
            }
            deinit { delays.deallocate() }

            func start(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
                switch request.descriptor.operation {
                case .read: try io.timeout(delays)
                case .flush: try io.forQueue(step: 1).timeout(delays + 1)
                default: break
                }
                return .submitted
            }

            func complete(_ request: IORequest, backingResult: Int32, _ io: BackingSubmitter) throws(SystemError)
                -> RequestStep {
                completions += 1
                return .done(4096)
            }

            func queueOperationCompleted(step: UInt16, result: Int32, _ io: BackingSubmitter,
                                         finished: inout FinishedRequests) throws(SystemError) {
                throw SystemError("the handler's state", errno: EPROTO)
            }
        }

        func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) throws -> Handler { handler }
        func sync() throws {}
    }

    func descriptor(_ operation: IOOperation) -> IODescriptor {
        IODescriptor(operation: operation, startSector: 0, sectorCount: operation == .flush ? 0 : 8)
    }

    @Test func aFailedQueueAnswersWhatItHoldsWithEIO() throws {
        let lines = QueueEngineTests.Lines()
        let target = StallingTarget()
        let queue = try OfflineQueue(target: target, depth: 4, bufferSize: 4096, logger: lines.logger())
        try queue.start(tag: 0, descriptor(.read))
        try queue.start(tag: 1, descriptor(.write))
        try queue.start(tag: 2, descriptor(.flush))
        var results: [Int: Int32] = [:]
        while results.count < 3 { try queue.reap { tag, result in results[tag] = result } }
        #expect(results == [0: -EIO, 1: -EIO, 2: -EIO])
        #expect(lines.all.filter { $0.contains("queue 0 failed") && $0.contains("EIO until the device stops") }.count == 1)
        // A request that arrives now is answered at once, without the handler.
        try queue.start(tag: 3, descriptor(.write))
        try queue.reap { tag, result in results[tag] = result }
        #expect(results[3] == -EIO)
        // The read's timer completes later: dropped, not handed to the handler, not committed again.
        try queue.start(tag: 0, descriptor(.write))
        usleep(400_000)
        try queue.reap { tag, result in results[tag] = result }
        #expect(queue.inFlight == 0)
        #expect(target.handler.completions == 0)
    }

    /// A handler that keeps every request (`.submitted`, nothing in flight).
    final class Keeping: QueueHandler {
        func start(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep { .submitted }
        func complete(_ request: IORequest, backingResult: Int32, _ io: BackingSubmitter) throws(SystemError)
            -> RequestStep { .done(0) }
    }

    /// Records the commands the queue sends, none to a kernel.
    final class Recorder: CommandSource {
        var commits: [(tag: UInt16, result: Int32)] = []
        var unregisters: [UInt16] = []
        var descriptors: [ublksrv_io_desc]
        init(depth: Int) { descriptors = Array(repeating: ublksrv_io_desc(), count: depth) }
        func fetch(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {}
        func descriptor(tag: Int) -> ublksrv_io_desc { descriptors[tag] }
        func commit(_ request: IORequest, result: Int32, step: UInt16, _ ring: IORing.Handle) throws(SystemError) {
            commits.append((request.tag, result))
        }
        func registerBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {}
        func unregisterBuffer(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) { unregisters.append(request.tag) }
    }

    /// A zero-copy queue (the fallback: the queue registers pages the driver could not)
    /// whose tag 0 is registering its request's pages when the queue fails.
    func registeringWhenTheQueueFails() throws -> (Queue<Keeping, Recorder>, Recorder) {
        let recorder = Recorder(depth: 2)
        recorder.descriptors[0].op_flags = UInt32(UBLK_IO_OP_READ) | UInt32(UBLK_IO_F_NEED_REG_BUF)
        recorder.descriptors[0].nr_sectors = 8
        var ring = try IORing(entries: 8)
        try ring.registerSparseBuffers(2)
        let queue = try Queue(ring: ring, source: recorder, handler: Keeping(), queueID: 0, depth: 2,
                              buffers: .autoRegister(fallback: true),
                              limits: DeviceLimits(sectors: 1 << 20, maxIOBytes: 4096), logger: Logger(label: "test"))
        try queue.arrived(tag: 0)
        try queue.fail(SystemError("test", errno: EIO))
        // Not answered while its REGISTER_IO_BUF is in flight: its completion carries it on.
        #expect(recorder.commits.isEmpty)
        return (queue, recorder)
    }

    /// Registered after all: the pages go back (UNREGISTER_IO_BUF) before the EIO commit;
    /// the kernel would not end a request whose pages are still registered.
    @Test func pagesRegisteredAfterTheFailureGoBackFirst() throws {
        let (queue, recorder) = try registeringWhenTheQueueFails()
        try queue.completed(UserData(.command, tag: 0, step: CommandStep.registered), result: 0, flags: 0)
        #expect(recorder.unregisters == [0] && recorder.commits.isEmpty)
        try queue.completed(UserData(.command, tag: 0, step: CommandStep.unregistered), result: 0, flags: 0)
        #expect(recorder.commits.map(\.tag) == [0] && recorder.commits.map(\.result) == [-EIO])
    }

    /// The registration failed: the request is answered once, with that error.
    @Test func aFailedRegistrationIsAnsweredOnce() throws {
        let (queue, recorder) = try registeringWhenTheQueueFails()
        try queue.completed(UserData(.command, tag: 0, step: CommandStep.registered), result: -EINVAL, flags: 0)
        #expect(recorder.commits.map(\.tag) == [0] && recorder.commits.map(\.result) == [-EINVAL])
        #expect(recorder.unregisters.isEmpty)
    }
}
