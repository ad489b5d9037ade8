import ArgumentParser
import Glibc
import UblkControl
import UblkServer
import UblkSystem
import UblkTargets

extension Ublk {
    struct Upgrade: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Replace a device's server by a new one (another binary) without an I/O error or an unmount (QUIESCE_DEV, Linux 6.16+).",
            discussion: """
            The running server is quiesced (requests in flight finish, new ones wait) and
            exits, keeping the device; the new server takes it over through user recovery.
            Needs a device added with --recovery. `systemctl reload ublk@NAME` runs this.
            An encrypted device needs its key for the new server: --key-file PATH or -
            (with --name, the config's key-file is used when none is given). The key is
            read and checked before anything changes. From the quiesce on, Ctrl-C and
            SIGTERM are held until the command ends.
            """)

        @OptionGroup var device: OneDevice

        @Option(name: .long, help: "The device started by `ublk start NAME` (what ublk@NAME.service runs).")
        var name: String?

        @Option(name: .long, help: "The new server's program (default: this ublk binary, e.g. the one just installed); it must be a ublk (its `recover --help` is checked before anything changes).")
        var binary: String?

        /// An encrypted device's key: never recorded, so the new server must be given it.
        @OptionGroup var key: KeyOptions

        func validate() throws {
            guard Ublk.validating else { return }
            if (device.id == nil) == (name == nil) { throw ValidationError("give /dev/ublkbN, --id N or --name NAME") }
        }

        func run() throws {
            let id = try deviceID()
            _ = try Self.holdUpgradeLock(id)  // (held until the process ends)
            let control = try ControlDevice()
            let info = try control.deviceInfo(id)
            try Self.checkUpgradable(id, info: info, features: control.features)
            if let why = RuntimeDirectory.load(id)?.backingReplaced() { throw CLIError("\(why): nothing changed") }
            try Self.checkExport(id, info: info, control: control)
            let arguments = ["recover", "--id", "\(id)"]
            if let key = try newServerKey(id) {
                // The key as checked, read once: the new server reads it from a pipe (as a
                // `--key-file -` key), made before anything changes.
                let keyPipe = try key.pipe(lowest: Background.keyDescriptor + 1)
                try replaceServer(id, control: control, arguments: arguments + ["--key-file", "-"],
                                  keyInput: keyPipe.rawValue)
            } else {
                try replaceServer(id, control: control, arguments: arguments, keyInput: STDIN_FILENO)
            }
        }

        /// An NBD device's export, reached and checked before anything changes: the new
        /// server connects to it after the quiesce, and an export it cannot have (the server
        /// down, the export now read-only or smaller) would leave the device waiting for one.
        static func checkExport(_ id: UInt32, info: DeviceInfo, control: borrowing ControlDevice) throws {
            guard let record = RuntimeDirectory.load(id), case .nbd = record.spec else { return }
            let target: any SpecifiedTarget
            do { target = try record.spec.makeTarget() } catch { throw CLIError("\(error); nothing changed") }
            let parameters = try control.parameters(id)
            if let why = DeviceServer.mismatch(target.properties, queueLimit: target.queueLimit?.queues,
                                               device: parameters, queues: Int(info.queueCount)) {
                throw CLIError("device \(id) cannot be taken over with its export as it is now: \(why); nothing changed")
            }
        }

        /// Quiesces the device, waits for the old server to leave it, and launches the new one.
        func replaceServer(_ id: UInt32, control: borrowing ControlDevice, arguments: [String],
                           keyInput: Int32) throws {
            let oldPID = try ServedDevice.requireServer(id)
            let program = binary ?? Background.executable
            if let problem = Background.ublkProblem(program) {
                throw CLIError("\(problem): give --binary PATH of a ublk; nothing changed")
            }

            // From the quiesce on, an interrupt (Ctrl-C, a service manager's stop) would leave
            // the device without a server, or end this command before it said how the device
            // comes back: interrupts are held until it ends (each step here is bounded).
            var interrupts = sigset_t()
            sigemptyset(&interrupts)
            for signal in [SIGINT, SIGTERM, SIGHUP, SIGQUIT] { sigaddset(&interrupts, signal) }
            pthread_sigmask(SIG_BLOCK, &interrupts, nil)
            do {
                // Longer than the server's worst case (30 s for requests in flight, 30 more for a stalled backing).
                _ = try ServerControl.request(id, "quiesce", seconds: 90)
            } catch {
                throw CLIError("\(error) (if device \(id) is quiesced now, see ublk list: ublk recover --id \(id))")
            }
            // The kernel marks the device quiesced once the old server closed /dev/ublkcN.
            var stillLive = true
            for _ in 0..<300 {
                stillLive = (try? control.deviceInfo(id))?.state == .live
                if !stillLive { break }
                usleep(100_000)
            }
            guard !stillLive else {
                throw CLIError("the old server (pid \(oldPID)) has not left device \(id) within 30 s of QUIESCE_DEV (see \(Background.logPath)): once it has, ublk recover --id \(id)")
            }
            let path: String
            do { path = try Background.launch(arguments, program: program, keyInput: keyInput) } catch {
                let line = "\(error)"
                // The new server's own line may already say how the device comes back.
                if line.contains("ublk recover --id \(id)") { throw CLIError(line) }
                throw CLIError("\(line) (device \(id) is quiesced and waits for a server: ublk recover --id \(id))")
            }
            for _ in 0..<300 where RuntimeDirectory.isAlive(oldPID) { usleep(100_000) }
            let newPID = RuntimeDirectory.load(id)?.pid ?? -1
            print("\(path): served by pid \(newPID) (was \(oldPID))")
        }

        /// The one-line refusals, before anything changes.
        /// Takes the lock of device `id`'s upgrade (a file under /run/ublk/locks), held until
        /// the process ends: a second `ublk upgrade` of the device at once (two administrators,
        /// two reloads) is refused before anything changes, instead of running into the first
        /// one's handover. Returns the lock's descriptor (-1 where no lock file can be made).
        static func holdUpgradeLock(_ id: UInt32, directory: String = RuntimeDirectory.locksPath) throws -> Int32 {
            SmallFile.makeDirectories(directory)
            let fd = open("\(directory)/upgrade-ublkb\(id)", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else { return -1 }
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
                close(fd)
                throw CLIError("another ublk upgrade of device \(id) is under way: wait for it to end (ublk list shows the new server); nothing changed")
            }
            return fd
        }

        static func checkUpgradable(_ id: UInt32, info: DeviceInfo, features: FeatureFlags?) throws {
            guard features?.contains(.quiesce) == true else {
                throw CLIError("this kernel's ublk_drv has no QUIESCE_DEV (UBLK_F_QUIESCE, Linux 6.16+): an upgrade would risk I/O errors; nothing changed")
            }
            guard info.flags.contains(.userRecovery) else {
                throw CLIError("device \(id) was added without --recovery: it cannot be upgraded in place (add devices with --recovery to allow it)")
            }
            guard info.flags.contains(.quiesce) else {
                throw CLIError("device \(id) was added without UBLK_F_QUIESCE (by an older server): it cannot be upgraded in place")
            }
            // QUIESCE_DEV makes ublk_drv end new requests at once unless they wait for a new
            // server, which fail-io says they must not: every write of the handover would fail.
            guard !info.flags.contains(.userRecoveryFailIO) else {
                throw CLIError("device \(id) was added with --recovery fail-io, which fails I/O while no server serves it: an upgrade would fail the writes made during the handover (add it with --recovery to upgrade it in place); nothing changed")
            }
            // See DeviceServer.batchFlags: quiescing a batched queue under load failed writes.
            guard !info.flags.contains(.batchIO) else {
                throw CLIError("device \(id) uses batched I/O commands (--batch-io on), whose queues ublk_drv stops without waiting for the requests in flight: it cannot be upgraded in place (add it with --batch-io off to allow it); nothing changed")
            }
            guard info.state == .live else {
                throw CLIError("device \(id) is \(info.state), not live: bring it back with ublk recover --id \(id)")
            }
        }

        /// The key the new server gets, read and checked before anything changes (a device
        /// left quiesced for a server that cannot start would hold its I/O): an encrypted
        /// device's key from --key-file (a path, or - for standard input), or with --name from
        /// the config's key-file; none for a plain one.
        func newServerKey(_ id: UInt32) throws -> EncryptionKey? {
            guard let record = RuntimeDirectory.load(id) else { return nil } // the new server says so
            var given = key
            if !given.isGiven, record.spec.encryption != nil, let name {
                // Read as `ublk start NAME` read it.
                given.keyFile = try DeviceOptions.resolve(config: "\(ConfigFile.directory)/\(name).conf", overrides: []).key.keyFile
            }
            do { return try DeviceLifecycle.recoveryKey(record, given) } catch {
                throw CLIError("\(error); nothing changed")
            }
        }

        func deviceID() throws -> UInt32 {
            if let id = device.id { return id }
            guard let record = Self.record(named: name!, in: RuntimeDirectory.all(), existing: Set(ControlDevice.deviceIDs()),
                                           isAlive: RuntimeDirectory.isAlive) else {
                throw CLIError("no device was started as \(name!) (ublk start \(name!)): see ublk list")
            }
            return record.id
        }

        /// The record of the device started as `name`. Records outlive a server killed hard
        /// and a device removed by other means: the one whose device exists and whose server
        /// lives comes first, then one whose device exists (the checks after say it has no
        /// server), never one without a device.
        static func record(named name: String, in records: [DeviceRecord], existing: Set<UInt32>,
                           isAlive: (Int32) -> Bool) -> DeviceRecord? {
            let named = records.filter { $0.name == name && existing.contains($0.id) }
            return named.first { isAlive($0.pid) } ?? named.first
        }
    }
}
