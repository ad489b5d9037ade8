/// The waits between reconnect attempts after a connection dropped: short at first
/// (a server restart is often quick), doubling up to `longest`, and none past the
/// budget (`--reconnect-timeout`), after which the waiting I/O fails with EIO.
public struct NBDReconnectBackoff: Sendable {
    public let deadline: ContinuousClock.Instant
    public let longest: Duration
    private var next: Duration

    public init(from start: ContinuousClock.Instant, budget: Duration = .seconds(30),
                first: Duration = .milliseconds(100), longest: Duration = .seconds(5)) {
        deadline = start + budget
        next = first
        self.longest = longest
    }

    /// How long to wait before the next attempt, or nil when the budget is spent.
    /// The last wait is cut short so the final attempt falls on the deadline.
    public mutating func delay(at now: ContinuousClock.Instant) -> Duration? {
        let left = now.duration(to: deadline)
        guard left > .zero else { return nil }
        let wait = min(next, left)
        next = min(next * 2, longest)
        return wait
    }
}

extension NBDExport {
    /// Why `fresh`, the export a reconnect found, cannot stand in for this one under a
    /// live device; nil when it can. The device's size and announced features are fixed,
    /// so the new export must keep the size and every feature the device relies on.
    public func replacementProblem(_ fresh: NBDExport) -> NBDError? {
        guard fresh.size == size else {
            return NBDError(.unusable, "export \(shownName) now has \(fresh.size) bytes instead of \(size): "
                + "the device cannot change size, remove it and add it again")
        }
        let needed: NBDTransmissionFlags = [.readOnly, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn]
        let lost = flags.intersection(needed).subtracting([.readOnly]).subtracting(fresh.flags)
        let nowReadOnly = fresh.flags.contains(.readOnly) && !flags.contains(.readOnly)
        guard lost.isEmpty, !nowReadOnly else {
            let what = nowReadOnly ? "became read-only" : "no longer offers \(lost)"
            return NBDError(.unusable, "export \(shownName) \(what) after reconnecting: remove the device and add it again")
        }
        guard fresh.blockSizes.minimum <= max(512, blockSizes.minimum),
              min(fresh.blockSizes.maximumPayload, Self.maximumTransferLimit) >= min(blockSizes.maximumPayload, Self.maximumTransferLimit)
        else {
            return NBDError(.unusable, "export \(shownName) changed its block sizes after reconnecting: "
                + "remove the device and add it again")
        }
        return nil
    }
}
