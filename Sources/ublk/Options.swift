import ArgumentParser
import Glibc
import UblkCrypto
import UblkQueue
import UblkSystem
import UblkServer
import UblkNBD
import UblkTargets

/// A byte count as util-linux's losetup reads `--offset` and `--sizelimit` (strtosize):
/// a number, decimal or hex (`0x1000`), with an optional suffix: K, M, G, T, P, E, or
/// KiB, MiB..., are powers of 1024; KB, MB, GB... powers of 1000. A fraction (`1.5G`) is
/// taken if it makes whole bytes. What losetup would read differently is refused rather
/// than read another way: a leading 0 (octal to losetup).
struct ByteCount: Sendable, Equatable {
    var value: UInt64

    init(_ value: UInt64) { self.value = value }

    /// The size options' help: what losetup takes.
    static let suffixHelp = "Suffixes K, M, G, T (or KiB, MiB...: powers of 1024) or KB, MB, GB, TB (powers of 1000), as losetup; hex 0x..."

    /// What a size may look like, for the error line.
    static let accepted = "give bytes, e.g. 4096, 0x1000, 512K or 1.5G (K, M, G, T, P, E and KiB, MiB... are powers of 1024; KB, MB, GB... powers of 1000, as with losetup)"

    /// Why a size was refused, said after ArgumentParser's "The value 'X' is invalid for '--size <size>': ".
    struct Invalid: Error, CustomStringConvertible {
        var description: String
    }

    /// `text` read as util-linux reads a size; the `transform` of the size options.
    static func parse(_ text: String) throws -> ByteCount {
        let lower = text.lowercased()
        let isHex = lower.hasPrefix("0x")
        let digits = isHex ? lower.dropFirst(2).prefix(while: \.isHexDigit) : lower.prefix(while: Self.isDigit)
        var rest = lower[digits.endIndex...]
        var fraction = Substring("")
        if !isHex, rest.first == "." {
            fraction = rest.dropFirst().prefix(while: Self.isDigit)
            rest = rest[fraction.endIndex...]
        }
        guard !digits.isEmpty, let multiplier = multiplier(suffix: rest) else { throw Invalid(description: accepted) }
        if !isHex && digits.count > 1 && digits.first == "0" {
            throw Invalid(description: "losetup reads a leading 0 as octal: leave the 0 out (or write hex, 0x...)")
        }
        let tooLarge = Invalid(description: "more than 2^64 bytes: give a smaller size")
        guard let whole = UInt64(digits, radix: isHex ? 16 : 10) else { throw tooLarge }
        let (product, overflow) = whole.multipliedReportingOverflow(by: multiplier)
        let (total, carry) = product.addingReportingOverflow(try bytes(fraction, times: multiplier))
        if overflow || carry { throw tooLarge }
        return ByteCount(total)
    }

    /// The bytes the digits after the point stand for, `multiplier` being the suffix's:
    /// a whole number, or refused (losetup would round, silently).
    static func bytes(_ fraction: Substring, times multiplier: UInt64) throws -> UInt64 {
        let significant = String(fraction.reversed().drop { $0 == "0" }.reversed())
        if significant.isEmpty { return 0 }
        let notWhole = Invalid(description: "not a whole number of bytes: give one (1.5K is 1536 bytes, 1.1K is no whole number)")
        // More than 19 significant digits are refused, before 10^digits could overflow:
        // only bytes of an E or a P need that many (1/2^60 has 60), and nobody writes those.
        guard significant.count <= 19, let numerator = UInt128(significant) else { throw notWhole }
        let denominator = (0..<significant.count).reduce(UInt128(1)) { power, _ in power * 10 }
        guard (numerator * UInt128(multiplier)) % denominator == 0 else { throw notWhole }
        return UInt64(numerator * UInt128(multiplier) / denominator)
    }

    static func isDigit(_ character: Character) -> Bool { ("0"..."9").contains(character) }

    /// What a (lower-cased) suffix multiplies by: k and kib are 1024, kb 1000; b alone is bytes.
    static func multiplier(suffix: Substring) -> UInt64? {
        if suffix.isEmpty || suffix == "b" { return 1 }
        guard let unit = suffix.first, let power = Array("kmgtpe").firstIndex(of: unit) else { return nil }
        let base: UInt64
        switch suffix.dropFirst() {
        case "", "ib": base = 1024
        case "b": base = 1000
        default: return nil
        }
        return (0...power).reduce(1) { product, _ in product * base }
    }
}

extension DirectIOMode: ExpressibleByArgument {}
extension FeatureMode: ExpressibleByArgument {}
extension RecoveryPolicy: ExpressibleByArgument {}

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

    @Option(name: .customLong("reconnect-timeout"), help: "Seconds I/O waits for a lost NBD connection to come back before failing with EIO (default 30); also how long requests wait on a connection on which nothing moves, or one request waits for its reply while later ones are answered (30 s at least), before it is given up.")
    var reconnectTimeout: Int?

    @Option(name: .long, help: "Device id N for /dev/ublkbN (default: the kernel picks).")
    var id: UInt32?

    @Option(name: .long, help: "Hardware queues, one thread each (default: one per 4 CPUs, 1 to 4; here \(ServerOptions.defaultQueues)).")
    var queues: Int?

    @Option(name: .long, help: "Requests in flight per queue, 1 to 4096.")
    var depth: Int = 128

    @Option(name: .customLong("direct-io"), help: "O_DIRECT on the backing: on (a bare --direct-io too, as losetup's; not for the null and nbd targets), off or auto (on when the backing allows it).")
    var directIO: DirectIOMode = .auto

    @Flag(name: .customLong("read-only"), inversion: .prefixedNo,
          help: "Open the backing read-only; the device refuses writes. Without it a backing that cannot be written makes a read-only device (as losetup, said in one line); --no-read-only asks for a writable device or a refusal (and overrides a config file's --read-only).")
    var readOnlyFlag: Bool?

    var readOnly: Bool { readOnlyFlag ?? false }

    @Option(name: [.customLong("block-size"), .customLong("sector-size")],
            help: "Logical block size: 512, 1024, 2048 or 4096 (losetup --sector-size); default 512 for a file, a block device's own, and with --direct-io on what the file's direct I/O needs.")
    var blockSize: Int?

    @Option(name: .long, help: "Start of the device in the backing file, in bytes, any number as losetup --offset takes (one O_DIRECT cannot use means buffered I/O); encrypted, whole sectors: cryptsetup's --offset N is N×512 here. \(ByteCount.suffixHelp)",
            transform: ByteCount.parse)
    var offset: ByteCount?

    @Option(name: .long, help: "Encrypt the backing as dm-crypt plain mode does: aes-xts-plain64 (the only cipher). Needs --key-file.")
    var encryption: String?

    @Option(name: .customLong("key-size"), help: "Bits of the encryption key: 512 (AES-256-XTS, the default) or 256 (AES-128-XTS).")
    var keySize: Int?

    @Option(name: .long, help: "512-byte sectors added to every encryption IV (cryptsetup --skip); moves no data; a multiple of 8 with --block-size 4096.")
    var skip: UInt64?

    @Flag(name: .customLong("allow-discards"), inversion: .prefixedNo,
          help: "Encrypted: pass discards (fstrim) to the backing as holes, as cryptsetup --allow-discards; off by default, as there, since holes show which blocks are unused (--no-allow-discards overrides a config file's).")
    var allowDiscards = false

    @Option(name: .customLong("cipher-threads"), help: "Threads per queue that encrypt and decrypt besides the queue's own, 0 to \(EncryptionConfiguration.maximumCipherThreads) (0: all on the queue thread; default: one per other CPU, at most 4). Where the kernel lets several threads serve a queue (PER_IO_DAEMON), each serves a share of its requests start to finish.")
    var cipherThreads: Int?

    @OptionGroup var key: KeyOptions

    @Option(name: [.long, .customLong("sizelimit")],
            help: "The device's size limit in bytes, as losetup --sizelimit: the device ends there or at the backing's end, whichever comes first (ublk resize grows it up to the limit), rounded down to whole blocks (loop target); 0: none. The null target's size (required). \(ByteCount.suffixHelp)",
            transform: ByteCount.parse)
    var size: ByteCount?

    @Option(name: .long, help: ArgumentHelp(
        "Keep the device when the server dies, so `ublk recover` (and `ublk upgrade`) can take it over: `--recovery` or `--recovery reissue` makes I/O wait for the new server, `--recovery fail-io` fails it meanwhile (Linux 6.13+); yes and no as in config files.",
        valueName: "reissue|fail-io"))
    var recovery: RecoveryPolicy = .off

    @Flag(name: .long, inversion: .prefixedNo,
          help: "Serve a backing range that another device already serves read-write (or holds for `ublk recover`).")
    var force = false

    @Option(name: .customLong("zero-copy"), help: "Requests' pages straight to the backing I/O, no copy (UBLK_F_AUTO_BUF_REG): auto (where the kernel and target allow it), on (or fail), off.")
    var zeroCopy: FeatureMode = .auto

    @Option(name: .customLong("batch-io"), help: "Requests arrive and are committed in batches, not one command each (UBLK_F_BATCH_IO): auto (where the kernel has it, unless --recovery, --depth 1, or an encrypted device whose queues its cipher threads share, PER_IO_DAEMON), on (or fail; such a device cannot be upgraded in place), off.")
    var batchIO: FeatureMode = .auto

    @Option(name: .customLong("poll-us"), help: "Busy polling: while at most one request is in flight in its queue, a queue thread spins up to N microseconds for the next request or completion before it sleeps, 0 to 1000000 (0: never; default 2000, 0 for an encrypted device with cipher threads). Costs a CPU while requests keep coming.")
    var pollMicroseconds: Int?

    @Flag(name: .long, inversion: .prefixedNo,
          help: "The device will hold swap (swapon): the server's memory, its buffers too, is faulted in and locked at start, not as it is used, as nbd-client -swap does (queues × depth × 512 KiB of buffers, and each thread's stack, 8 MiB by default), so that swapping out never waits for memory (without it, Linux 6.12 stalled under memory pressure).")
    var swap = false

    init() {}

    var kind: TargetKind { target ?? (uri != nil ? .nbd : .loop) }

    /// Checks what can be checked without touching the backing or the kernel.
    func check() throws {
        // ublk_drv numbers its devices below 2^20 (UBLK_MAX_UBLKS); ADD_DEV said only EINVAL.
        if let id, id >= 1 << 20 {
            throw ValidationError("--id \(id) is out of range: ublk devices are numbered 0 to \((1 << 20) - 1)")
        }
        if !(1...4096).contains(depth) {
            throw ValidationError("--depth \(depth) is out of range: give 1 to 4096")
        }
        if let pollMicroseconds, !(0...1_000_000).contains(pollMicroseconds) {
            throw ValidationError("--poll-us \(pollMicroseconds) is out of range: give 0 (no polling) to 1000000 microseconds")
        }
        if let queues, queues < 1 || queues > 4096 {
            throw ValidationError("--queues \(queues) is out of range: give 1 to 4096 (one per CPU is plenty)")
        }
        if let blockSize, ![512, 1024, 2048, 4096].contains(blockSize) {
            throw ValidationError("--block-size \(blockSize) is not a power of two from 512 to 4096: give 512, 1024, 2048 or 4096")
        }
        if file == "" { throw ValidationError("--file is empty: give the backing file's path") }
        if let file, !file.hasPrefix("/"), Self.workingDirectory == nil {
            throw ValidationError("--file \(file) is relative, and the working directory's name cannot be read as UTF-8 text: give the backing's absolute path")
        }
        try checkEncryption()
        // `on` means O_DIRECT or fail; a target without a backing file cannot have it.
        if kind != .loop, directIO == .on {
            throw ValidationError("the \(kind.rawValue) target has no backing file to open with O_DIRECT: leave out --direct-io")
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
            // As for an NBD export: no block device addresses more (offsets are signed).
            if size.value > UInt64(Int64.max) {
                throw ValidationError("--size \(size.value) is more than 2^63 - 1 bytes, which no block device addresses: give a smaller size")
            }
            if offset != nil { throw ValidationError("the null target has no backing file: leave out --offset") }
        case .nbd:
            try checkNBD()
        }
    }

    /// The encryption options belong together: a cipher we have, a key, a dm-crypt sector size.
    func checkEncryption() throws {
        guard let encryption else {
            if key.isGiven { throw ValidationError("--key-file without --encryption: add --encryption aes-xts-plain64, or leave out the key") }
            if keySize != nil || skip != nil || cipherThreads != nil || allowDiscards {
                throw ValidationError("--key-size, --skip, --cipher-threads and --allow-discards need --encryption aes-xts-plain64")
            }
            return
        }
        if CipherName(rawValue: encryption) == nil {
            throw ValidationError("unknown cipher \(encryption): the only one is --encryption aes-xts-plain64")
        }
        if kind != .loop { throw ValidationError("only the loop target encrypts (the \(kind.rawValue) target stores nothing of its own): leave out --encryption") }
        if !key.isGiven { throw ValidationError("--encryption needs the key: give --key-file PATH (or - for standard input)") }
        if let keySize {
            do { _ = try XTSKeySize(bits: keySize) } catch { throw ValidationError(error.description) }
        }
        if let cipherThreads, !(0...EncryptionConfiguration.maximumCipherThreads).contains(cipherThreads) {
            throw ValidationError("--cipher-threads \(cipherThreads) is out of range: give 0 to \(EncryptionConfiguration.maximumCipherThreads) (about one per CPU)")
        }
        if let blockSize, !EncryptionConfiguration.sectorSizes.contains(blockSize) {
            throw ValidationError("encryption works in 512- or 4096-byte sectors, not \(blockSize): use --block-size 512 or 4096")
        }
        // Said before the driver is asked (the target says it too, for a block size it picks).
        if let skip, let blockSize, skip % UInt64(blockSize / 512) != 0 {
            throw ValidationError(TargetError.skipMisaligned(skip: skip, blockSize: blockSize).description)
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
        try checked(file: ConfigFile.arguments(path: path), overrides: overrides, config: path)
    }

    /// The options of a config file at `config`, and the command line's after them, parsed
    /// and checked, each mistake said in one line where it is: a value of the file's names
    /// its line; one of the command line's is a usage error, as without a file, and so is a
    /// rule only the command line's values break; else the line names the file.
    static func checked(file: [ConfigFile.Argument], overrides: [String], config: String) throws -> DeviceOptions {
        for argument in file {
            do { _ = try DeviceOptions.parse([argument.text]) } catch {
                throw CLIError("\(config):\(argument.line): \(DeviceOptions.message(for: error))")
            }
        }
        do { _ = try DeviceOptions.parse(overrides) } catch { throw ValidationError(DeviceOptions.message(for: error)) }
        let options: DeviceOptions
        do { options = try DeviceOptions.parse(file.map(\.text) + overrides) } catch {
            throw CLIError("\(config): \(DeviceOptions.message(for: error))")
        }
        do { try options.check() } catch {
            let fileAlone = try? DeviceOptions.parse(file.map(\.text))
            if !overrides.isEmpty, (try? fileAlone?.check()) != nil { throw error }
            // A value the check names (`--queues 0 is out of range`) is named by its line.
            let message = DeviceOptions.message(for: error)
            let line = file.last { message.hasPrefix($0.canonicalOption + " ") && !overrides.contains(where: $0.sameOption) }?.line
            throw CLIError("\(config)\(line.map { ":\($0)" } ?? ""): \(message)")
        }
        return options
    }

    /// The target these options describe.
    var spec: TargetSpec {
        switch kind {
        case .nbd:
            var configuration = NBDConfiguration(uri: uri!)
            configuration.readOnly = readOnly
            if readOnlyFlag == false { configuration.writableRequired = true }
            configuration.reconnectTimeout = reconnectTimeout ?? NBDConfiguration.defaultReconnectTimeout
            return .nbd(configuration)
        case .null:
            var configuration = NullConfiguration(size: size!.value, logicalBlockSize: blockSize ?? 512)
            configuration.readOnly = readOnly
            return .null(configuration)
        case .loop:
            var configuration = LoopConfiguration(path: Self.absolute(file!))
            configuration.directIO = directIO
            configuration.readOnly = readOnly
            if readOnlyFlag == false { configuration.writableRequired = true }
            configuration.offset = offset?.value ?? 0
            configuration.size = size?.value
            configuration.logicalBlockSize = blockSize
            if encryption != nil {
                var settings = EncryptionConfiguration()
                settings.keySize = keySize ?? settings.keySize
                settings.skip = skip ?? 0
                settings.cipherThreads = cipherThreads
                settings.allowDiscards = allowDiscards ? true : nil
                configuration.encryption = settings
            }
            return .loop(configuration)
        }
    }

    /// `path` from the working directory, as losetup records a backing: the device's record
    /// keeps it, and `ublk recover`, `ublk upgrade` and the overlap check of a later `add`
    /// open it from directories of their own. Where the file exists, its own name (no `..`,
    /// no symbolic link: `realpath`), as `losetup -l` shows the kernel's name for a loop's
    /// backing; a name that is not UTF-8 (a link's target) is left as given.
    static func absolute(_ path: String) -> String {
        if let resolved = realpath(path, nil) {
            defer { free(resolved) }
            if let name = String(validatingCString: resolved) { return name }
        }
        guard !path.hasPrefix("/"), let directory = workingDirectory else { return path }
        let parts = (directory.split(separator: "/") + path.split(separator: "/")).filter { $0 != "." }
        return "/" + parts.joined(separator: "/")
    }

    /// The working directory's name; nil if it cannot be read or is not UTF-8 (`check`
    /// refuses a relative `--file` there: decoded with U+FFFD, it would name another file).
    static var workingDirectory: String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return nil }
        return String(validatingCString: buffer)
    }

    /// The encryption key, read from where `--key-file` says; nil when not encrypting.
    func loadKey() throws -> EncryptionKey? {
        guard encryption != nil else { return nil }
        return try key.load(bits: keySize ?? XTSKeySize.standard.rawValue)
    }

    var serverOptions: ServerOptions {
        var options = ServerOptions(id: id, queues: queues ?? ServerOptions.defaultQueues, depth: depth)
        options.recovery = recovery
        options.zeroCopy = zeroCopy
        options.batchIO = batchIO
        options.swap = swap
        options.pollMicroseconds = pollMicroseconds ?? ServerOptions.defaultPollMicroseconds(
            targetHasWorkerThreads: (spec.encryption?.workerThreads ?? 0) > 0)
        return options
    }
}

extension DeviceOptions {
    /// The command line as the parser should see it: `normalizingDirectIO`,
    /// `normalizingRecovery`, then `joiningNegativeValues`.
    static func normalized(_ arguments: [String]) -> [String] {
        joiningNegativeValues(normalizingRecovery(normalizingDirectIO(arguments)))
    }

    /// A bare `--direct-io` (losetup's `--direct-io[=on|off]`) means on: it becomes
    /// `--direct-io=on` where no value follows (the end, or another option). Any other word
    /// after it stays its value, so that a wrong one is named by the option's own check.
    static func normalizingDirectIO(_ arguments: [String]) -> [String] {
        rewritingOptions(arguments) { argument, rest in
            let valueFollows = rest.first.map { !$0.hasPrefix("-") || $0.dropFirst().first?.isNumber == true } ?? false
            return argument == "--direct-io" && !valueFollows ? "--direct-io=on" : argument
        }
    }

    /// A command line rewritten word by word up to `--` (after it every word is an argument
    /// and stays as it is): `rewrite` gets each word and the words after it, of which it may
    /// take the word's value, and returns the word to pass on.
    static func rewritingOptions(_ arguments: [String], _ rewrite: (String, inout ArraySlice<String>) -> String) -> [String] {
        var result: [String] = []
        var rest = arguments[...]
        while let argument = rest.popFirst() {
            if argument == "--" { return result + [argument] + rest }
            result.append(rewrite(argument, &rest))
        }
        return result
    }

    /// `--option -5` becomes `--option=-5`: the parser takes a word that starts with a dash
    /// for an option, and said "Missing value for '--option'" where the value is what is
    /// wrong; joined, the value reaches the option's own check ("-5 is invalid"). No option
    /// of ours is a dash and a digit.
    static func joiningNegativeValues(_ arguments: [String]) -> [String] {
        rewritingOptions(arguments) { argument, rest in
            let takesNext = argument.hasPrefix("--") && !argument.contains("=")
            guard takesNext, let value = rest.first, value.hasPrefix("-"), value.dropFirst().first?.isNumber == true else {
                return argument
            }
            rest.removeFirst()
            return "\(argument)=\(value)"
        }
    }

    /// `--recovery` takes an optional value, which ArgumentParser options cannot: a bare
    /// `--recovery` (not followed by one of the policies) becomes `--recovery=reissue`, its
    /// meaning from before fail-io existed; `--recovery VALUE` becomes `--recovery=VALUE`.
    /// VALUE may also be a config file's `yes` (reissue) or `no` (off). Another word (no
    /// option) is kept as its value too, so that the option's check names the policies
    /// (`add` takes no word of its own, which it could be).
    static func normalizingRecovery(_ arguments: [String]) -> [String] {
        rewritingOptions(arguments) { argument, rest in
            if argument.hasPrefix("--recovery="), let policy = recoveryPolicy(String(argument.dropFirst(11))) {
                return "--recovery=\(policy)"
            }
            guard argument == "--recovery" else { return argument }
            if let next = rest.first, let policy = recoveryPolicy(next) {
                rest.removeFirst()
                return "--recovery=\(policy)"
            }
            if let next = rest.first, !next.hasPrefix("-"), arguments.first == "add" {
                rest.removeFirst()
                return "--recovery=\(next)"
            }
            return "--recovery=reissue"
        }
    }

    /// A policy's name, or the config file's words for one (`yes`, `no`); nil for any other word.
    static func recoveryPolicy(_ word: String) -> String? {
        if let policy = RecoveryPolicy(rawValue: word) { return policy.rawValue }
        return ConfigFile.recoveryValues[word.lowercased()].map { $0 ?? RecoveryPolicy.off.rawValue }
    }
}

/// Where an encryption key comes from: a file, standard input (`-`), or (hidden) a
/// descriptor the launching CLI hands a background server. Never the key itself: a key on
/// the command line would be in every `ps` listing.
struct KeyOptions: ParsableArguments {
    @Option(name: .customLong("key-file"), help: "The raw encryption key: a file whose first key-size/8 bytes are the key (as cryptsetup --key-file in plain mode), or - for standard input.")
    var keyFile: String?

    /// Where a background server reads a `--key-file -` key: the launching CLI's standard
    /// input, or (`ublk upgrade`) a pipe holding the key it read and checked.
    @Option(name: .customLong("key-fd"), help: .hidden)
    var keyFD: Int32?

    init() {}

    var isGiven: Bool { keyFile != nil || keyFD != nil }

    /// What the key was read from, for messages.
    var sourceName: String {
        if keyFD != nil || keyFile.map(Self.standardInputNames.contains) == true { return "the key on standard input" }
        return "key file \(keyFile ?? "")"
    }

    /// `--key-file` values that mean standard input: `-`, and the names a shell user may
    /// give cryptsetup for it (a background server's own standard input is /dev/null).
    static let standardInputNames: Set<String> = ["-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"]

    /// Reads the key (into locked memory); nil when none was given.
    func load(bits: Int) throws -> EncryptionKey? {
        let size = try XTSKeySize(bits: bits)
        if let keyFD {
            let descriptor = FileDescriptor(adopting: keyFD)
            return EncryptionKey(try XTSKey(reading: descriptor, named: "standard input", size: size))
        }
        return try keyFile.map { path throws in EncryptionKey(try XTSKey(file: path, size: size)) }
    }

    /// The arguments a background server gets instead of `arguments`: `--key-file -` becomes
    /// `--key-fd fd`, the descriptor the server gets the key input on (`Background.launch`).
    static func handingStandardInput(_ arguments: [String], to fd: Int32) -> [String]? {
        var result = arguments
        if let index = result.firstIndex(where: {
            $0.hasPrefix("--key-file=") && standardInputNames.contains(String($0.dropFirst("--key-file=".count)))
        }) {
            result[index...index] = ["--key-fd", String(fd)]
            return result
        }
        guard let index = result.indices.dropLast().first(where: {
            result[$0] == "--key-file" && standardInputNames.contains(result[$0 + 1])
        }) else { return nil }
        result[index...index + 1] = ["--key-fd", String(fd)]
        return result
    }
}
