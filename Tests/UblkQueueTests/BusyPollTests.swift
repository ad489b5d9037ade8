import Testing
@testable import UblkQueue

/// The back-off of busy polling: misses in a row make the queue sleep at once for
/// 1, 3, 7 ... 63 turns; a spin that finds its completion ends the back-off.
@Suite struct BusyPollTests {
    /// The windows of `turns` turns, each spin finding its completion or not as `found` says.
    func windows(_ poll: inout BusyPoll, turns: Int, found: Bool) -> [Int] {
        (0..<turns).map { _ in
            let window = poll.nanoseconds > 0 ? poll.window() : 0
            if window > 0 { poll.spun(found: found) }
            return window
        }
    }

    @Test func zeroNeverSpins() {
        var poll = BusyPoll(microseconds: 0)
        #expect(windows(&poll, turns: 5, found: false) == [0, 0, 0, 0, 0])
    }

    @Test func spinsThatFindTheirCompletionKeepSpinning() {
        var poll = BusyPoll(microseconds: 50)
        #expect(windows(&poll, turns: 100, found: true) == Array(repeating: 50_000, count: 100))
    }

    @Test func missesInARowBackOffUpToSixtyThreeTurns() {
        var poll = BusyPoll(microseconds: 1)
        let spun = windows(&poll, turns: 1 + 2 + 4 + 8 + 16 + 32 + 64 + 64, found: false)
            .enumerated().filter { $0.element > 0 }.map(\.offset)
        // A spin, then 1, 3, 7, 15, 31, 63 and again 63 turns that sleep at once.
        #expect(spun == [0, 2, 6, 14, 30, 62, 126, 190])
    }

    @Test func aSpinThatFindsItsCompletionEndsTheBackOff() {
        var poll = BusyPoll(microseconds: 1)
        _ = windows(&poll, turns: 7, found: false) // spins at 0, 2, 6: now 7 turns to skip
        #expect(windows(&poll, turns: 8, found: true) == [0, 0, 0, 0, 0, 0, 0, 1000])
        #expect(windows(&poll, turns: 3, found: false) == [1000, 0, 1000])
    }
}
