// swift-tools-version:6.1
//
// Host benchmarks of ublk-swift (no ublk driver needed): 4k random reads and writes
// pushed through the loop target's io_uring path with `UblkTesting.OfflineQueue` (the
// daemon's queue engine, fed by the benchmark instead of the ublk driver), next to
// a plain liburing loop doing the same I/O. Run from this directory:
//
//   swift package --disable-sandbox benchmark
//
// The end-to-end benchmark in a VM (kernel loop / null_blk vs ublk) is `./run-vm`.
import PackageDescription

let package = Package(
    name: "ublk-swift-benchmarks",
    platforms: [.macOS(.v13)],
    dependencies: [
        .package(name: "ublk-swift", path: "../"),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        // liburing for the baseline, with the same include-order trick as the root
        // package's CLiburing (which is not a product, so it cannot be imported here).
        .systemLibrary(name: "CBenchUring", path: "Sources/CBenchUring", pkgConfig: "liburing",
                       providers: [.apt(["liburing-dev"])]),
        // The plain liburing loop (baseline) and the random-offset workload both sides share.
        .target(name: "UringBaseline", dependencies: ["CBenchUring"], path: "Sources/UringBaseline"),
        // The loop target's side: LoopTarget driven by UblkTesting.OfflineQueue.
        .target(name: "LoopDriver", dependencies: [
            "UringBaseline", .product(name: "Ublk", package: "ublk-swift"),
            .product(name: "UblkTesting", package: "ublk-swift"),
        ], path: "Sources/LoopDriver"),
        // Both loops without the harness, for callgrind/perf (Benchmarks/instructions).
        .executableTarget(name: "ublk-bench-profile", dependencies: ["LoopDriver", "UringBaseline"],
                          path: "Sources/ublk-bench-profile"),
        .executableTarget(
            name: "LoopTargetIO",
            dependencies: [
                "LoopDriver", "UringBaseline",
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/LoopTargetIO",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
