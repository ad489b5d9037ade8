// ublk-bench-profile — the host benchmark's two loops without the benchmark harness,
// for profilers (valgrind --tool=callgrind, perf): one mode, one operation, one depth,
// COUNT requests after a warm-up of the same size, then the wall time per request.
//
//   ublk-bench-profile loop|liburing read|write DEPTH COUNT
//
// Instructions per request under callgrind: run it with two COUNTs and divide the
// difference of the totals by the difference of the counts (setup cancels out);
// Benchmarks/instructions does exactly that.
import Glibc
import LoopDriver
import UringBaseline

let args = CommandLine.arguments
guard args.count == 5, ["loop", "liburing"].contains(args[1]), ["read", "write"].contains(args[2]),
      let depth = Int(args[3]), depth > 0, let count = Int(args[4]), count > 0 else {
    let usage = "usage: ublk-bench-profile loop|liburing read|write DEPTH COUNT\n"
    _ = write(2, usage, usage.utf8.count)
    exit(2)
}
let operation: BenchOperation = args[2] == "read" ? .read : .write
let run: (Int) throws -> Int
if args[1] == "loop" {
    let driver = try OfflineLoopDriver(file: ScratchFile.shared, depth: depth, operation: operation)
    run = { try driver.run(count: $0); return driver.failures }
} else {
    let ring = try PlainRingLoop(file: ScratchFile.shared, depth: depth, operation: operation)
    run = { ring.run(count: $0); return ring.failures }
}
_ = try run(count)  // warm-up: page cache, ring, lazy runtime metadata
var start = timespec(), end = timespec()
clock_gettime(CLOCK_MONOTONIC, &start)
let failures = try run(count)
clock_gettime(CLOCK_MONOTONIC, &end)
let ns = Double(end.tv_sec - start.tv_sec) * 1e9 + Double(end.tv_nsec - start.tv_nsec)
print("\(args[1]) \(args[2]) qd\(depth): \(count) requests, \(Int((ns / Double(count)).rounded())) ns/request, \(failures) failed")
exit(failures == 0 ? 0 : 1)
