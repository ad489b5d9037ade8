/// Busy polling of a queue's ring (`--poll-us`), with a back-off so that it costs CPU
/// only while it pays.
///
/// A turn spins up to the window for its completions before it sleeps in the kernel
/// (the queue asks only while at most one request is in its hands: `Queue.busyTags`).
/// While requests follow each other closer than that (a depth-1 stream), every spin
/// finds the next one and the thread never sleeps: no wake-up per request, one CPU kept
/// busy. When spins find nothing (sparse I/O, an idle device), the queue stops spinning
/// for 1, 3, 7 ... up to 63 turns after as many misses in a row, so a trickle of requests
/// costs a spin per few dozen of them; the first spin that finds its completion ends the
/// back-off.
public struct BusyPoll {
    /// The spin window in nanoseconds; 0: never spin.
    public let nanoseconds: Int
    /// Turns that sleep at once before the next spin.
    @usableFromInline var turnsToSkip = 0
    @usableFromInline var missesInARow = 0
    /// Back-off after this many misses in a row no longer grows: 63 turns without spinning.
    @usableFromInline static let longestBackoff = 6

    public init(microseconds: Int) {
        nanoseconds = microseconds * 1000
    }

    /// How long this turn may spin: the window, or 0 while backing off (the caller asks
    /// only when `nanoseconds` > 0).
    @inlinable @inline(__always)
    public mutating func window() -> Int {
        guard turnsToSkip == 0 else {
            turnsToSkip -= 1
            return 0
        }
        return nanoseconds
    }

    /// After a turn that spun: `found` says whether the spin found its completions.
    @inlinable
    public mutating func spun(found: Bool) {
        if found {
            missesInARow = 0
            return
        }
        missesInARow = min(missesInARow + 1, Self.longestBackoff)
        turnsToSkip = (1 << missesInARow) - 1
    }
}
