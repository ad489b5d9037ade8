// swift-tools-version:6.0
//
// ublk-swift: a Linux ublk userspace block driver.
//
// Layers, bottom to top (each one a module, `Tests/` mirrors them):
//   CLiburing   - liburing as a system library (pkg-config `liburing`)
//   CUblk       - the ublk uapi (written from include/uapi/linux/ublk_cmd.h) and
//                 the few GNU-only libc calls Swift's Glibc module hides
//   COpenSSL    - OpenSSL's libcrypto as a system library (pkg-config `libcrypto`)
//   UblkSystem  - typed errors, raw syscalls, ~Copyable owners of kernel-shared memory and rings
//   UblkCrypto  - dm-crypt plain-mode aes-xts-plain64: locked key memory and the sector cipher
//   UblkControl - /dev/ublk-control: add, set params, start, stop, delete, info, features, recovery
//   UblkQueue   - one thread per hardware queue: descriptors, buffers, FETCH/COMMIT loop, `Target`
//   UblkTargets - loop (file-backed, optionally encrypted), null and nbd (network) targets
//   UblkNBD     - the NBD client protocol: URIs, connect + handshake, wire format, reply parser
//   UblkServer  - brings a device up and down: control plane + queues + target + signals
//   UblkTesting - the queue engine fed by the caller instead of the driver (host tests, Benchmarks/)
//   ublk        - the command-line tool
import PackageDescription

let package = Package(
    name: "ublk-swift",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "Ublk", targets: [
            "UblkServer", "UblkTargets", "UblkQueue", "UblkControl", "UblkCrypto", "UblkNBD", "UblkSystem",
        ]),
        .executable(name: "ublk", targets: ["ublk"]),
        // The offline queue for host tests and benchmarks; not part of `Ublk` or the tool.
        .library(name: "UblkTesting", targets: ["UblkTesting"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        .systemLibrary(name: "CLiburing", pkgConfig: "liburing",
                       providers: [.apt(["liburing-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "libcrypto",
                       providers: [.apt(["libssl-dev"])]),
        .target(name: "CUblk", dependencies: ["CLiburing"]),
        .target(name: "UblkSystem", dependencies: ["CUblk", "CLiburing"]),
        .target(name: "UblkCrypto", dependencies: ["UblkSystem", "COpenSSL"]),
        .target(name: "UblkControl", dependencies: ["UblkSystem", "CUblk", "CLiburing"]),
        .target(name: "UblkQueue", dependencies: [
            "UblkSystem", "CUblk", "CLiburing", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "UblkNBD", dependencies: ["UblkSystem"]),
        .target(name: "UblkTargets", dependencies: [
            "UblkQueue", "UblkNBD", "UblkSystem", "UblkCrypto", "CUblk", "CLiburing", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "UblkTesting", dependencies: [
            "UblkQueue", "UblkSystem", "CUblk", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "UblkServer", dependencies: [
            "UblkControl", "UblkQueue", "UblkTargets", "UblkCrypto", "UblkSystem", "CUblk",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "ublk", dependencies: [
            "UblkServer", "UblkTargets", "UblkNBD", "UblkCrypto", "UblkQueue", "UblkControl", "UblkSystem", "CUblk",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "UblkSystemTests", dependencies: ["UblkSystem", "CUblk"]),
        .testTarget(name: "UblkCryptoTests", dependencies: ["UblkCrypto", "UblkSystem", "COpenSSL"]),
        .testTarget(name: "UblkControlTests", dependencies: ["UblkControl", "CUblk"]),
        .testTarget(name: "UblkQueueTests", dependencies: ["UblkQueue", "UblkSystem", "UblkTesting", "UblkTargets", "CUblk"]),
        .testTarget(name: "UblkTargetsTests", dependencies: ["UblkTargets", "UblkQueue", "UblkNBD", "UblkSystem", "UblkTesting", "UblkCrypto"]),
        .testTarget(name: "UblkNBDTests", dependencies: ["UblkNBD", "UblkSystem", "UblkTargets", "UblkQueue", "UblkTesting"]),
        .testTarget(name: "UblkServerTests", dependencies: ["UblkServer", "UblkControl", "UblkQueue", "UblkTargets", "UblkSystem"]),
        .testTarget(name: "ublkTests", dependencies: [
            "ublk", "UblkTargets", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
