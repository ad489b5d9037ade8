import CLiburing
import Glibc
import Testing
@testable import UblkSystem

/// `IORing.Handle.submit(waitingFor:spinningFor:)`: a spin finds completions that are
/// ready or that wait as deferred task work, and gives up (then sleeps) after its window.
@Suite struct BusyPollingTests {
    @Test func aSpinFindsACompletionPostedDuringTheSubmit() throws {
        let ring = try IORing(entries: 4, preferredFlags: IORing.pollingFlags)
        try ring.handle.prepareNop(userData: 7)
        #expect(try ring.handle.submit(waitingFor: 1, spinningFor: 1_000_000))
        var seen: [UInt64] = []
        ring.handle.reap { userData, _ in seen.append(userData) }
        #expect(seen == [7])
    }

    /// Nothing completes within the window: the spin gives up, and the submit sleeps until
    /// the timeout's completion comes (20 ms, well after the 2 ms window).
    @Test func aSpinThatFindsNothingSleepsAfterItsWindow() throws {
        let ring = try IORing(entries: 4, preferredFlags: IORing.pollingFlags)
        var timeout = __kernel_timespec(tv_sec: 0, tv_nsec: 20_000_000)
        io_uring_prep_timeout(try ring.handle.prepare(userData: 9, zeroed: false), &timeout, 0, 0)
        let start = ContinuousClock.now
        #expect(try ring.handle.submit(waitingFor: 1, spinningFor: 2_000_000) == false)
        #expect(start.duration(to: .now) >= .milliseconds(19))
        var results: [Int32] = []
        ring.handle.reap { _, result in results.append(result) }
        #expect(results == [-ETIME])
    }

    /// Another thread's MSG_RING reaches a DEFER_TASKRUN ring as task work, which runs only
    /// when the ring's thread enters the kernel: the spin sees IORING_SQ_TASKRUN, enters,
    /// and finds the completion without sleeping (the window, 5 s, is far longer).
    @Test func aSpinRunsTheTaskWorkTheKernelFlags() throws {
        let ring = try IORing(entries: 4, preferredFlags: IORing.pollingFlags)
        try #require(ring.flags & IORING_SETUP_DEFER_TASKRUN != 0, "the host kernel has no DEFER_TASKRUN")
        let target = ring.descriptor
        let sender = try OSThread {
            usleep(20_000)
            guard let other = try? IORing(entries: 2) else { return }
            try? other.handle.prepareMessage(toRing: target, data: 11, result: 5, userData: 0)
            _ = try? other.handle.submit(waitingFor: 0)
        }
        defer { sender.join() }
        let start = ContinuousClock.now
        #expect(try ring.handle.submit(waitingFor: 1, spinningFor: 5_000_000_000))
        #expect(start.duration(to: .now) < .seconds(4))
        var seen: [(UInt64, Int32)] = []
        ring.handle.reap { seen.append(($0, $1)) }
        #expect(seen.count == 1 && seen.first?.0 == 11 && seen.first?.1 == 5)
    }
}
