import ArgumentParser
import UblkQueue
import UblkServer
import UblkNBD
import UblkTargets

/// A byte count written with an optional binary suffix: 4096, 512K, 256M, 1G, 2T.
struct ByteCount: ExpressibleByArgument, Sendable, Equatable {
    var value: UInt64

    init(_ value: UInt64) { self.value = value }

    init?(argument: String) {
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var text = Substring(argument.uppercased())
        if text.hasSuffix("IB") { text = text.dropLast(2) } else if text.hasSuffix("B") { text = text.dropLast() }
        var multiplier: UInt64 = 1
        if let last = text.last, let unit = units[last] {
            multiplier = unit
            text = text.dropLast()
        }
        guard let number = UInt64(text) else { return nil }
        let (product, overflow) = number.multipliedReportingOverflow(by: multiplier)
        if overflow { return nil }
        value = product
    }

    static var defaultCompletionKind: CompletionKind { .default }
}

extension DirectIOMode: ExpressibleByArgument {}

/// The target kinds `ublk add` knows.
enum TargetKind: String, ExpressibleByArgument, CaseIterable, Sendable {
    case loop, null, nbd
}

/// Everything `ublk add` takes; also what a device config file holds.
struct DeviceOptions: ParsableArguments {
    @Option(name: .long, help: "Backing file or block device (loop target).")
    var file: String?

    @Option(name: .long, help: "Target: loop (a backing file), null (no backing, reads return zeros) or nbd (an NBD export, --uri).")
    var target: TargetKind?

    @Option(name: .long, help: "NBD export (nbd target): nbd://HOST[:PORT]/EXPORT (port 10809 by default) or nbd+unix:///EXPORT?socket=PATH.")
    var uri: String?

    @Option(name: .customLong("reconnect-timeout"), help: "Seconds I/O waits for a lost NBD connection to come back before failing with EIO (default 30).")
    var reconnectTimeout: Int?

    @Option(name: .long, help: "Device id N for /dev/ublkbN (default: the kernel picks).")
    var id: UInt32?

    @Option(name: .long, help: "Hardware queues, one thread each (default: one per CPU, at most 4; here \(ServerOptions.defaultQueues)).")
    var queues: Int?

    @Option(name: .long, help: "Requests in flight per queue, 1 to 4096.")
    var depth: Int = 128

    @Option(name: .customLong("direct-io"), help: "O_DIRECT on the backing: on, off or auto (on when the backing allows it).")
    var directIO: DirectIOMode = .auto

    @Flag(name: .customLong("read-only"), help: "Open the backing read-only; the device refuses writes.")
    var readOnly = false

    @Option(name: .customLong("block-size"), help: "Logical block size: 512, 1024, 2048 or 4096.")
    var blockSize: Int?

    @Option(name: .long, help: "Start of the device in the backing file, in bytes (losetup --offset). Suffixes K, M, G.")
    var offset: ByteCount?

    @Option(name: .long, help: "Device size in bytes (losetup --sizelimit; required for the null target). Suffixes K, M, G, T.")
    var size: ByteCount?

    @Flag(name: .long, help: "Keep the device when the server dies, so `ublk recover` can take it over (UBLK_F_USER_RECOVERY).")
    var recovery = false

    init() {}

    var kind: TargetKind { target ?? (uri != nil ? .nbd : .loop) }

    /// Checks what can be checked without touching the backing or the kernel.
    func check() throws {
        if !(1...4096).contains(depth) {
            throw ValidationError("--depth \(depth) is out of range: give 1 to 4096")
        }
        if let queues, queues < 1 || queues > 4096 {
            throw ValidationError("--queues \(queues) is out of range: give 1 or more (one per CPU is plenty)")
        }
        if let blockSize, ![512, 1024, 2048, 4096].contains(blockSize) {
            throw ValidationError("--block-size \(blockSize) is not a power of two from 512 to 4096: give 512, 1024, 2048 or 4096")
        }
        if kind != .nbd {
            if uri != nil { throw ValidationError("--uri is for the nbd target: give --target nbd") }
            if reconnectTimeout != nil { throw ValidationError("--reconnect-timeout is for the nbd target: give --target nbd") }
        }
        switch kind {
        case .loop:
            guard file != nil else { throw ValidationError("no backing file: give --file PATH (or --target null --size N)") }
        case .null:
            if file != nil { throw ValidationError("the null target has no backing file: leave out --file") }
            guard let size else { throw ValidationError("the null target needs a size: give --size, e.g. --size 1G") }
            let block = UInt64(blockSize ?? 512)
            if size.value == 0 || size.value % block != 0 {
                throw ValidationError("--size \(size.value) is not a positive multiple of the block size \(block)")
            }
            if offset != nil { throw ValidationError("the null target has no backing file: leave out --offset") }
        case .nbd:
            try checkNBD()
        }
    }

    /// The nbd target takes its size and block size from the export, and has no file.
    func checkNBD() throws {
        guard let uri else { throw ValidationError("the nbd target needs an export: give --uri nbd://HOST[:PORT]/EXPORT") }
        for (name, given) in [("--file", file != nil), ("--offset", offset != nil), ("--size", size != nil),
                              ("--block-size", blockSize != nil)] where given {
            throw ValidationError("the nbd target takes its size and block size from the export: leave out \(name)")
        }
        if let reconnectTimeout, reconnectTimeout < 0 || reconnectTimeout > 86400 {
            throw ValidationError("--reconnect-timeout \(reconnectTimeout) is out of range: give 0 to 86400 seconds")
        }
        do { _ = try NBDAddress(uri: uri) } catch { throw ValidationError(error.message) }
    }

    /// Options from a config file, overridden by `overrides` (command-line arguments).
    static func resolve(config path: String, overrides: [String]) throws -> DeviceOptions {
        let arguments = try ConfigFile.arguments(path: path) + overrides
        let options: DeviceOptions
        do { options = try DeviceOptions.parse(arguments) } catch {
            throw CLIError("\(path): \(DeviceOptions.message(for: error))")
        }
        do { try options.check() } catch { throw CLIError("\(path): \(DeviceOptions.message(for: error))") }
        return options
    }

    /// The target these options describe.
    var spec: TargetSpec {
        switch kind {
        case .nbd:
            var configuration = NBDConfiguration(uri: uri!)
            configuration.readOnly = readOnly
            configuration.reconnectTimeout = reconnectTimeout ?? NBDConfiguration.defaultReconnectTimeout
            return .nbd(configuration)
        case .null:
            return .null(NullConfiguration(size: size!.value, logicalBlockSize: blockSize ?? 512))
        case .loop:
            var configuration = LoopConfiguration(path: file!)
            configuration.directIO = directIO
            configuration.readOnly = readOnly
            configuration.offset = offset?.value ?? 0
            configuration.size = size?.value
            configuration.logicalBlockSize = blockSize
            return .loop(configuration)
        }
    }

    var serverOptions: ServerOptions {
        var options = ServerOptions(id: id, queues: queues ?? ServerOptions.defaultQueues, depth: depth)
        options.recovery = recovery
        return options
    }
}
