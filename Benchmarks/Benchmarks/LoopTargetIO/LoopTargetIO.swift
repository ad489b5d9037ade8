// 4k random reads and writes through the loop target's io_uring path (LoopTarget's
// queue handler driven by UblkTesting.OfflineQueue: descriptor validation, the
// handler's start/complete state machine, BackingSubmitter, the ring), next to a plain
// liburing loop doing the same I/O on the same file (UringBaseline). No ublk driver:
// what is measured is the userspace cost per request above io_uring itself.
//
// Each benchmark iteration is 1000 requests (scalingFactor .kilo), `depth` in flight.
// Buffered I/O on both sides by default; UBLK_BENCH_DIRECT=1 makes both O_DIRECT.
// Columns marked * (wall clock, mallocCountTotal) are shown per request, i.e. per 1/1000 iteration.
import Benchmark
import LoopDriver
import UringBaseline

/// One fixture per benchmark, made in its setup (so listing the benchmarks makes no file).
/// `@unchecked Sendable`: the harness runs a benchmark's setup, body and teardown one after
/// another, never at once, so `driver` has one user at a time.
final class Fixture<Driver>: @unchecked Sendable {
    var driver: Driver?
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.throughput, .wallClock, .mallocCountTotal],
        timeUnits: .nanoseconds,
        warmupIterations: 3,
        scalingFactor: .kilo,
        maxDuration: .seconds(2),
        maxIterations: 10_000)

    // Shows that the malloc counter works here: exactly one allocation per "request".
    Benchmark("malloc counter check (1 allocation per request)") { benchmark in
        for i in benchmark.scaledIterations {
            blackHole([i, i + 1])
        }
    }

    let operations: [(String, BenchOperation)] = [("randread", .read), ("randwrite", .write)]
    for (name, operation) in operations {
        for depth in [1, 32] {
            let ours = Fixture<OfflineLoopDriver>()
            Benchmark("loop target 4k \(name) qd\(depth)") { benchmark in
                let driver = ours.driver!
                try! driver.run(count: benchmark.scaledIterations.count)
                precondition(driver.failures == 0, "\(driver.failures) requests failed")
            } setup: {
                ours.driver = try OfflineLoopDriver(file: ScratchFile.shared, depth: depth, operation: operation)
            } teardown: {
                ours.driver = nil
            }

            let plain = Fixture<PlainRingLoop>()
            Benchmark("liburing 4k \(name) qd\(depth)") { benchmark in
                let ring = plain.driver!
                ring.run(count: benchmark.scaledIterations.count)
                precondition(ring.failures == 0, "\(ring.failures) requests failed")
            } setup: {
                plain.driver = try PlainRingLoop(file: ScratchFile.shared, depth: depth, operation: operation)
            } teardown: {
                plain.driver = nil
            }
        }
    }
}
