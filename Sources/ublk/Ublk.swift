import ArgumentParser
import Glibc
import Logging
import UblkControl
import UblkQueue
import UblkServer
import UblkSystem
import UblkTargets

@main
struct Ublk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ublk",
        abstract: "Userspace block devices on Linux's ublk driver: a file becomes /dev/ublkbN, as with losetup.",
        version: "ublk from ublk-swift \(version)",
        subcommands: [Add.self, Start.self, Delete.self, List.self, Recover.self, Resize.self, Upgrade.self, Features.self])

    /// This release (`ublk --version`). What the kernel's driver offers is `ublk features`'s.
    static let version = "0.32.0"
}

/// Options every server-starting command shares.
struct ServerFlags: ParsableArguments {
    @Flag(name: .long, help: "Stay in the foreground (for service managers); default: return once the device is live.")
    var foreground = false

    @Option(name: .customLong("ready-fd"), help: .hidden)
    var readyFD: Int32?

    @Flag(name: .shortAndLong, help: "Log every step.")
    var verbose = false

    func makeLogger() -> Logger {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "ublk")
        logger.logLevel = verbose ? .debug : .info
        return logger
    }

    /// Runs `body`; if it fails, the launching CLI (if any) hears why before this process exits.
    func reporting<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch {
            if let readyFD { Background.report("error \(error)", to: readyFD) }
            throw error
        }
    }

    /// A remark for the user, before the device's path: through the launching CLI, or on stderr.
    func note(_ text: String) {
        if let readyFD { Background.note(text, to: readyFD) } else { FileHandleStderr.print("ublk: \(text)") }
    }

    /// Opens the target the options describe and serves it in this process; `whenLive` runs
    /// once the device is live and its record written.
    func start(_ device: DeviceOptions, name: String?, whenLive: () -> Void = {}) throws {
        // "Not loaded" or "run as root" first: without the driver the backing does not matter.
        try reporting { _ = try ControlDevice() }
        let target = try reporting { try device.spec.makeTarget(key: try device.loadKey()) }
        let lock = try reporting { try DeviceSafety.SetupLock(for: target) }
        try reporting { try DeviceSafety.refuseOverlap(target, force: device.force) }
        if let remark = target.note { note(remark) }
        var options = device.serverOptions
        options.name = name
        if let limit = target.queueLimit, options.queues > limit.queues {
            options.queues = limit.queues
            note(limit.reason)
        }
        try serve(target: target, options: options, mode: .create) {
            lock.release()
            whenLive()
        }
    }

    /// Runs a server in this process; reports on `--ready-fd` once live or on failure.
    /// `whenLive` runs once the device is live and its record written.
    func serve(target: any SpecifiedTarget, options: ServerOptions, mode: DeviceServer.Mode,
               whenLive: () -> Void = {}) throws {
        let logger = makeLogger()
        // The launching CLI may be gone by the time we report: a closed pipe must not kill a live device.
        signal(SIGPIPE, SIG_IGN)
        // Nor may the shell's `ulimit -f`, which no loop device has (SIGXFSZ ignored, the limit lifted).
        if let limit = FileSizeLimit.lift() {
            let line = "the file-size limit of \(limit) bytes (ulimit -f) stays: writes beyond it in the backing fail with an I/O error"
            note(line)
            logger.warning("\(line)")
        }
        let server = DeviceServer(target: target, options: options, logger: logger)
        // `--ready-fd` is answered (and closed) exactly once: "ready" when live, else "error".
        var reported = false
        do {
            try server.run(mode, onAdded: { id in
                if let readyFD { Background.note("\(id)", to: readyFD, prefix: "added ") }
            }) { info, parameters in
                whenLive()
                let path = info.blockDevicePath
                if case .create = mode, Int(info.queueCount) < options.queues {
                    note("\(info.queueCount) queues, not \(options.queues): ublk_drv gives a device at most one per CPU")
                }
                if case .create = mode, let remark = DeviceServer.lockedMemoryRemark(target, info, swap: options.swap) {
                    note(remark)
                    logger.notice("\(remark)")
                }
                logger.info("\(path) is live: target \(target.name), \(parameters.sectors << 9) bytes, \(info.queueCount) queue\(info.queueCount == 1 ? "" : "s") × \(info.queueDepth)")
                if let readyFD {
                    let heard = Background.report("ready \(path)", to: readyFD)
                    reported = true
                    // The CLI was interrupted while the device came up: nobody knows of it, and
                    // nothing has used it yet. Stopped (`goLive`), it goes as with `ublk del`
                    // rather than stay behind. A recovered device was in use before: served on.
                    if !heard, case .create = mode {
                        throw CLIError("the ublk command that started this server is gone (interrupted?) and never heard of \(path): removing it")
                    }
                } else {
                    print(path)
                }
                reported = true
                fflush(nil) // stdout: the path must reach a pipe before the server carries on
                let backing = target.spec.backing.map { ", \($0)" } ?? ", -"
                SystemdNotifier.notify("READY=1\nSTATUS=Serving \(path) (\(target.name)\(backing))\nMAINPID=\(getpid())")
            }
        } catch {
            if reported { throw error }
            return try reporting { throw error }
        }
    }
}

extension Ublk {
    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a device and serve it; prints /dev/ublkbN once it is live.",
            discussion: """
            Examples:
              ublk add --file disk.img            # loop target, O_DIRECT if possible
              ublk add --file disk.img --queues 2 --depth 64 --direct-io off
              ublk add --target null --size 1G
              ublk add --target nbd --uri nbd://127.0.0.1/disk --queues 2
              ublk add --target nbd --uri 'nbd+unix:///disk?socket=/run/nbd.sock'
            """)

        @OptionGroup var device: DeviceOptions
        @OptionGroup var server: ServerFlags

        @Option(name: .long, help: "Read the device options from this file (`key = value` lines, keys as the options here; a relative file or key-file is found from the file's directory), or standard input (- or /dev/stdin); options given on the command line override it.")
        var config: String?

        func validate() throws {
            guard Ublk.validating else { return }
            if config == nil { try device.check() }
            // Standard input has one reader. (`-` is a file's name for --file, as for losetup.)
            let readers = [("--config", config), ("--key-file", device.key.keyFile),
                           ("--file", device.file.flatMap { $0 == "-" ? nil : $0 })]
                .compactMap { name, value in value.flatMap { KeyOptions.standardInputNames.contains($0) ? "\(name) \($0)" : nil } }
            if readers.count > 1 {
                throw ValidationError("\(readers.joined(separator: " and ")) \(readers.count == 2 ? "both" : "all") read standard input: give \(readers.count == 2 ? "one" : "all but one") of them a file")
            }
            if let file = device.file, file != "-", KeyOptions.standardInputNames.contains(file), !Self.standardInputIsAFile {
                throw ValidationError("--file \(file): standard input is no file (a pipe or a terminal): redirect the backing (<disk.img) or give its path")
            }
        }

        /// Is standard input a regular file or a block device, as a backing must be?
        static var standardInputIsAFile: Bool {
            guard let status = try? FileStatus.of(descriptor: STDIN_FILENO) else { return false }
            return status.isRegularFile || status.isBlockDevice
        }

        func run() throws {
            if !server.foreground {
                print(try Background.launch(try backgroundArguments()))
                return
            }
            let options: DeviceOptions
            if let config {
                // The file's options first, then the command line's, parsed as one command line.
                options = try server.reporting { try DeviceOptions.resolve(config: config, overrides: Self.deviceArguments()) }
            } else {
                options = device
            }
            try server.start(options, name: nil)
        }

        /// The background server's arguments. A config file is read here, where standard
        /// input is still the user's (`--config /dev/stdin`; the server's is /dev/null):
        /// the server gets the file's options, then the command line's. They are checked
        /// here too: the server has no way yet to say what is wrong with them.
        func backgroundArguments(commandLine: [String] = CommandLine.arguments) throws -> [String] {
            guard let config else { return Self.resolvingFile(Array(commandLine.dropFirst())) }
            let given = Self.deviceArguments(from: commandLine)
            // The file's options the command line gives too are left out: an --id twice is refused.
            let names = Set(given.filter { $0.hasPrefix("--") }.map { $0.split(separator: "=", maxSplits: 1)[0] })
            let fileArguments = try ConfigFile.arguments(path: config).filter { !names.contains($0.option) }
            _ = try DeviceOptions.checked(file: fileArguments, overrides: given, config: config)
            return ["add"] + Self.resolvingFile(fileArguments.map(\.text) + given) + (server.verbose ? ["--verbose"] : [])
        }

        /// `arguments` with the value of `--file` resolved here (`DeviceOptions.absolute`).
        /// The server would resolve it too, but with /dev/null as standard input: `--file
        /// /dev/stdin`, losetup's way to name the file a shell redirected, names that file
        /// only in this process (and `/dev/fd/N` only where N is open).
        static func resolvingFile(_ arguments: [String]) -> [String] {
            DeviceOptions.rewritingOptions(arguments) { argument, rest in
                if argument == "--file", let value = rest.first {
                    rest.removeFirst()
                    return "--file=" + DeviceOptions.absolute(value)
                }
                guard argument.hasPrefix("--file=") else { return argument }
                return "--file=" + DeviceOptions.absolute(String(argument.dropFirst(7)))
            }
        }

        /// The device options given on this command line (without --config and the server flags).
        static func deviceArguments(from commandLine: [String] = CommandLine.arguments) -> [String] {
            var arguments = DeviceOptions.normalized(Array(commandLine.dropFirst(2)))
            for option in ["--config", "--ready-fd"] {
                while let index = arguments.firstIndex(where: { $0 == option || $0.hasPrefix(option + "=") }) {
                    arguments.removeSubrange(index..<min(arguments.count, index + (arguments[index] == option ? 2 : 1)))
                }
            }
            return arguments.filter { !["--foreground", "-v", "--verbose"].contains($0) }
        }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create and serve the device configured in /etc/ublk/NAME.conf (what ublk@NAME.service runs).",
            discussion: """
            A device an earlier server of NAME left when it died (the service restarting after a crash) is taken over if it was added with recovery = yes, else removed first.
            """)

        @Argument(help: "The config's name: /etc/ublk/NAME.conf ($UBLK_CONFIG_DIR overrides the directory).")
        var name: String

        @OptionGroup var server: ServerFlags

        func validate() throws {
            guard Ublk.validating else { return }
            if name.isEmpty || name.contains("/") { throw ValidationError("NAME must be a plain name, as in /etc/ublk/NAME.conf") }
        }

        /// A device of `name` whose server is alive: the config is started already.
        static func refuseRunning(_ name: String) throws {
            let existing = Set(ControlDevice.deviceIDs())
            guard let running = RuntimeDirectory.all().first(where: {
                $0.name == name && existing.contains($0.id) && RuntimeDirectory.isAlive($0.pid)
            }) else { return }
            throw CLIError("\(name) is already started: /dev/ublkb\(running.id), served by pid \(running.pid) (ublk del --id \(running.id) stops it)")
        }

        func run() throws {
            if !server.foreground {
                print(try Background.launch(Array(CommandLine.arguments.dropFirst())))
                return
            }
            let options = try server.reporting {
                try DeviceOptions.resolve(config: "\(ConfigFile.directory)/\(name).conf", overrides: [])
            }
            // One start of NAME at a time, until its device is live and recorded.
            let lock = try server.reporting { try DeviceSafety.SetupLock(config: name) }
            // Started already (and its server alive): say so, rather than refuse its backing as taken.
            try server.reporting { try Self.refuseRunning(name) }
            // A server of this name that died (the service restarting after a crash) left
            // its device: take it over if it waits for one, rather than make a second
            // device on the same backing; remove it if it cannot be taken over.
            if let orphan = try server.reporting({ try DeviceLifecycle.orphan(named: name) }) {
                if orphan.recoverable {
                    server.note("device \(orphan.id) of \(name) lost its server: recovering it")
                    let (target, recovery) = try server.reporting { try DeviceLifecycle.recoveryPlan(orphan.id, key: options.key) }
                    return try server.serve(target: target, options: recovery, mode: .recover(orphan.id), whenLive: lock.release)
                }
                // Dead: pulled even if a file system on it is still mounted (it sees I/O errors already).
                try server.reporting {
                    // Its id may stay taken by a mount for a while: the new device takes another
                    // (a config that names the id is refused in one line until the unmount).
                    do { try DeviceRemoval.remove(orphan.id, control: try ControlDevice(), force: true) } catch is IDStillTaken {}
                }
                server.note("device \(orphan.id) of \(name) lost its server and cannot be recovered: removed")
            }
            try server.start(options, name: name, whenLive: lock.release)
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "del", abstract: "Stop devices and remove them (their servers exit); a mounted or open device is refused unless --force.",
            discussion: "Several devices (--id 1 --id 2, or /dev/ublkb1 /dev/ublkb2 as losetup -d takes them) are removed in turn, then again those that were in use as long as that removes any (a device stacked on another goes first, in any order): one that cannot be is named in a line of its own, the others still go, and the exit status is 1. A device whose server is stopped (SIGSTOP) or stuck is removed, but its id stays taken until the server ends: said after a second, or after 120 s; --force of an open device whose server is stopped is refused (kill -CONT it first).")

        @OptionGroup var chosen: DeviceChoice

        @Flag(name: .long, help: "Every ublk device (busy ones are kept and named, unless --force).")
        var all = false

        @Flag(name: .long, help: "Remove a mounted or open device anyway, as a pulled disk: its users see I/O errors.")
        var force = false

        func validate() throws {
            guard Ublk.validating else { return }
            if chosen.isEmpty && !all { throw ValidationError("give --id N or /dev/ublkbN (more than one if you like), or --all") }
            if !chosen.isEmpty && all { throw ValidationError("--all removes every device: leave out --id and the paths") }
        }

        /// The ids to remove, each once: those of --id, then those of the paths.
        var ids: [UInt32] { chosen.ids }

        func run() throws {
            let control = try ControlDevice()
            let failures = DeviceRemoval.remove(all ? ControlDevice.deviceIDs() : ids, control: control, force: force)
            for (_, error) in failures { FileHandleStderr.print("Error: \(error)") }
            // Each failure is said already: exit 1 without another line.
            if !failures.isEmpty { throw ExitCode.failure }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the ublk devices: id, state, target, size, queues, depth, direct I/O, data path (zero-copy or copy), server pid, backing; --json adds commands (batched or per-request), pollMicroseconds (the busy-polling window), readOnly, offset and sizeLimit (losetup's OFFSET and SIZELIMIT), and swap (added with --swap).",
            discussion: "Devices named (--id N, or /dev/ublkbN as losetup takes one) are the only ones shown; one that does not exist, or that was removed while a user (a mounted file system) still holds its id, is named in a line of its own, and the exit status is 1. --file PATH shows the devices that serve that file or block device, found by its inode as losetup -j finds them (none: nothing but the header, or [] with --json).")

        @OptionGroup var chosen: DeviceChoice

        @Option(name: .long, help: ArgumentHelp("Only the devices backed by this file or block device (losetup -j).", valueName: "path"))
        var file: String?

        @Flag(name: .long, help: "JSON output for scripts.")
        var json = false

        func run() throws {
            let control = try ControlDevice()
            let backing = try file.map { path throws(CLIError) in try BackingMatch(path) }
            let rows = DeviceLifecycle.list(control: control) { id, record in
                (chosen.isEmpty || chosen.ids.contains(id)) && backing.map { $0.matches(record) } != false
            }
            if json { print(DeviceListing.json(rows)) } else { print(DeviceListing.table(rows), terminator: "") }
            // A device named that exists but serves another file is left out without a word;
            // one removed whose id a user still holds (no /dev/ublkcN left) is said to be.
            var failed = false
            for id in chosen.ids where !rows.contains(where: { $0.id == id }) {
                do {
                    _ = try control.deviceInfo(id)
                    guard !ControlDevice.deviceIDs().contains(id) else { continue }
                    failed = true
                    FileHandleStderr.print("Error: \(IDStillTaken(id: id))")
                } catch {
                    failed = true
                    FileHandleStderr.print(error.isNoSuchDevice ? "Error: ublk device \(id) does not exist: `ublk list` alone shows every device" : "Error: \(error)")
                }
            }
            if failed { throw ExitCode.failure }
        }
    }

    struct Recover: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start a new server for a device added with --recovery whose server died.")

        @OptionGroup var device: OneDevice

        /// An encrypted device's key: never recorded, so asked for again.
        @OptionGroup var key: KeyOptions

        @OptionGroup var server: ServerFlags

        func validate() throws {
            guard Ublk.validating else { return }
            _ = try device.required()
        }

        func run() throws {
            let id = try device.required()
            if !server.foreground {
                print(try Background.launch(Array(CommandLine.arguments.dropFirst())))
                return
            }
            let (target, options) = try server.reporting { try DeviceLifecycle.recoveryPlan(id, key: key) }
            try server.serve(target: target, options: options, mode: .recover(id))
        }
    }

    struct Features: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the kernel's ublk features (GET_FEATURES) by name.")

        func run() throws {
            let control = try ControlDevice()
            print("opcodes: \(control.encoding.rawValue)")
            let features = control.features
            if let features {
                print("features: 0x\(String(features.rawValue, radix: 16))")
                for name in features.names { print("  UBLK_F_\(name)") }
            } else {
                print("features: unknown (the kernel has no GET_FEATURES: before Linux 6.5, or legacy opcodes forced)")
            }
            let commands = ControlCommand.allCases
            print("control commands: " + commands.filter { $0.isAccepted(features: features) == true }.map(\.rawValue).joined(separator: " "))
            let untold = commands.filter { $0.isAccepted(features: features) == nil }.map(\.rawValue)
            if !untold.isEmpty { print("  no feature bit, tried when needed: " + untold.joined(separator: " ")) }
            print("I/O commands: " + IOCommandCatalog.accepted(features: features).joined(separator: " "))
            print(IORing.copiesLinkedCommands
                ? "linked commits: yes (io_uring copies a linked command's SQE when submitted)"
                : "linked commits: no (io_uring reads a linked command's SQE only when it starts: each commit waits a queue turn)")
        }
    }
}

/// Devices named on the command line, by id (`--id N`, repeatable) or by path (/dev/ublkbN,
/// or a link to one, as losetup takes them): what `del` removes and `list` shows.
struct DeviceChoice: ParsableArguments {
    @Option(name: .long, help: "The device id N of /dev/ublkbN; give it again for more devices.")
    var id: [UInt32] = []

    @Argument(help: "Devices by path, as losetup takes them: /dev/ublkbN (or a link to one).")
    var devices: [String] = []

    var isEmpty: Bool { id.isEmpty && devices.isEmpty }

    func validate() throws {
        guard Ublk.validating else { return }
        for path in devices where Self.id(of: path) == nil { throw Self.notADevice(path) }
    }

    /// The ids named, each once: those of --id, then those of the paths.
    var ids: [UInt32] {
        var seen = Set<UInt32>()
        return (id + devices.compactMap(Self.id(of:))).filter { seen.insert($0).inserted }
    }

    /// N of /dev/ublkbN, `path` or where its links lead (not a partition, /dev/ublkbNpK).
    static func id(of path: String) -> UInt32? {
        let target = resolved(path)
        let number = target.dropFirst("/dev/ublkb".count)
        guard target.hasPrefix("/dev/ublkb"), !number.isEmpty, number.allSatisfy(ByteCount.isDigit) else { return nil }
        return UInt32(number)
    }

    /// The refusal of a path that names no ublk device; a partition's names its disk.
    static func notADevice(_ path: String) -> ValidationError {
        let target = resolved(path)
        let parts = target.dropFirst("/dev/ublkb".count).split(separator: "p", omittingEmptySubsequences: false)
        if target.hasPrefix("/dev/ublkb"), parts.count == 2, parts.allSatisfy({ !$0.isEmpty && $0.allSatisfy(ByteCount.isDigit) }),
           let disk = UInt32(parts[0]) {
            return ValidationError("\(path) is a partition of /dev/ublkb\(disk): give /dev/ublkb\(disk) (or --id \(disk))")
        }
        return ValidationError("\(path) is not a ublk device: give /dev/ublkbN (or --id N)")
    }

    /// Where `path` leads, its links followed (itself when it does not exist).
    static func resolved(_ path: String) -> String {
        realpath(path, nil).map { pointer in
            defer { free(pointer) }
            return String(cString: pointer)
        } ?? path
    }
}

/// One device, by `--id N` or by path, as `losetup -c /dev/loopN` takes it (`recover`,
/// `resize`, `upgrade`).
struct OneDevice: ParsableArguments {
    @Option(name: .customLong("id"), help: "The device id N of /dev/ublkbN.")
    var number: UInt32?

    @Argument(help: "The device by path, as losetup takes it: /dev/ublkbN (or a link to one); or give --id N.")
    var path: String?

    /// The id given, by number or path; nil when neither was given.
    var id: UInt32? { number ?? path.flatMap(DeviceChoice.id(of:)) }

    func validate() throws {
        guard Ublk.validating else { return }
        if let path, DeviceChoice.id(of: path) == nil { throw DeviceChoice.notADevice(path) }
        if number != nil, path != nil { throw ValidationError("give the device once: --id N or /dev/ublkbN") }
    }

    /// For the commands that need the device: the id, or a one-line error.
    func required() throws -> UInt32 {
        guard let id else { throw ValidationError("which device? give /dev/ublkbN or --id N") }
        return id
    }
}

/// stderr without Foundation: one write(2) per line (C's `stderr` is a global Swift 6 cannot prove safe).
enum FileHandleStderr {
    static func print(_ line: String) {
        let text = line + "\n"
        _ = text.withCString { write(2, $0, strlen($0)) }
    }
}
