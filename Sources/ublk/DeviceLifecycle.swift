import FoundationEssentials
import Glibc
import UblkControl
import UblkCrypto
import UblkQueue
import UblkServer
import UblkSystem
import UblkTargets

/// One row of `ublk list`.
struct DeviceRow: Codable {
    var id: UInt32
    var state: String
    var target: String
    var backing: String
    var size: UInt64
    var queues: Int
    var depth: Int
    var directIO: String
    /// "zero-copy" (UBLK_F_AUTO_BUF_REG: requests' pages go to the backing I/O) or "copy".
    var dataPath: String
    /// "batched" (UBLK_F_BATCH_IO: requests come and go many per command) or "per-request".
    var commands: String
    /// The queues' busy-polling window in microseconds (`--poll-us`; 0: they sleep at once).
    var pollMicroseconds: Int?
    /// Added with `--swap`; absent otherwise.
    var swap: Bool? = nil
    var pid: Int32
    var serverAlive: Bool
    /// Added read-only, or made so since (`blockdev --setro`), as losetup's RO column says.
    var readOnly: Bool
    var blockSize: Int
    /// Where the device starts in its backing file (losetup's OFFSET), in bytes; 0 without one.
    var offset: UInt64
    /// The device's size limit in its backing (losetup's SIZELIMIT), if it has one.
    var sizeLimit: UInt64?
    var name: String?
    /// Cipher, key size and IV skip of an encrypted device (never the key).
    var encryption: EncryptionConfiguration?
    /// The backing's path no longer names the file the device serves: "deleted" (it names
    /// nothing, as losetup's "(deleted)"), "renamed" (`backing` is then the file's new name,
    /// as losetup shows it) or "replaced" (another file); absent otherwise.
    var backingChanged: String? = nil
}

/// The backing `ublk list --file PATH` looks for, found as losetup -j finds it: the same
/// file (device and inode; a device's record keeps its backing's from the add, so a backing
/// renamed since is still found) or the same block device (its device number, whichever
/// node names it).
struct BackingMatch {
    let file: FileIdentity
    /// As `DeviceSafety.backingIdentity`: a block device's number, or a file's device and inode.
    let backing: [UInt64]?

    init(_ path: String) throws(CLIError) {
        switch FileIdentity.of(path: path) {
        case .success(let identity): file = identity
        case .failure(let error): throw CLIError("cannot look at \(path): \(error.reason)")
        }
        backing = DeviceSafety.backingIdentity(path)
    }

    /// Whether the device of `record` serves this backing (a device without a record: unknown, no).
    /// By the file the record keeps; by what its path names now only for a block device
    /// (any node of it) or a record that keeps no file: a file put in the backing's place
    /// since is not the file the device serves.
    func matches(_ record: DeviceRecord?) -> Bool {
        guard let record, case .loop(let loop) = record.spec else { return false }
        if record.backingIdentity == file { return true }
        guard let backing, backing.count == 1 || record.backingIdentity == nil else { return false }
        return DeviceSafety.backingIdentity(loop.path) == backing
    }
}

/// What `del`, `list` and `recover` do with devices started by any server.
enum DeviceLifecycle {
    /// STOP_DEV, then DEL_DEV_ASYNC and a wait for the server to close /dev/ublkcN, which
    /// frees the id: what DEL_DEV waits for, but bounded (`awaitRelease`), since a server
    /// that is stopped (SIGSTOP) or stuck never closes it, and DEL_DEV, uninterruptible
    /// from here, would wait with it. Kernels without DEL_DEV_ASYNC (before 6.9) get DEL_DEV.
    /// False when the server has ended but the id stays taken: a user of the removed disk
    /// (a file system still mounted) holds it until it lets go.
    @discardableResult
    static func delete(_ id: UInt32, control: borrowing ControlDevice) throws -> Bool {
        let info = try control.deviceInfo(id)
        do { try control.stopDevice(id) } catch {
            // Already stopped (e.g. quiesced with a dead server): deletion still applies.
            if error.isNoSuchDevice { throw error }
        }
        let pid = RuntimeDirectory.load(id)?.pid ?? info.serverPID
        // The server's record goes with it, not a record a new device of the same id made since.
        defer { RuntimeDirectory.removeServerFiles(id, pid: pid) }
        // (524: the kernel's own ENOTSUPP, which 6.9 to 6.10.2 answer DEL_DEV_ASYNC with.)
        do { try control.deleteDeviceAsync(id) } catch where [EOPNOTSUPP, EINVAL, ENOTTY, 524].contains(error.errno) {
            try refuseStopped(id, server: pid)
            try deleteWaiting(id, control: control)
        } catch where error.isNoSuchDevice {
            // The server deleted it on its way out.
        } catch { throw error }
        let freed = try awaitRelease(id, server: pid, serverPID: info.serverPID, control: control)
        // Let the server finish its own shutdown (sync, exit) before we return.
        for _ in 0..<500 where RuntimeDirectory.isAlive(pid) && pid != getpid() { usleep(10_000) }
        return freed
    }

    /// DEL_DEV, where there is no DEL_DEV_ASYNC: the kernel waits for the server itself.
    static func deleteWaiting(_ id: UInt32, control: borrowing ControlDevice) throws(ControlError) {
        do { try control.deleteDevice(id) } catch where error.isNoSuchDevice {
            // The server deleted it on its way out.
        }
    }

    /// Waits until the id of removed device `id` is free: its server has closed /dev/ublkcN
    /// (it syncs the backing and exits), so `ublk add --id` can take it again; true then,
    /// or when a new device has taken the id already (GET_DEV_INFO names another server's pid).
    /// False when the server has ended a second ago and the id is still taken (a user of
    /// the removed disk holds it). A server stopped by a signal for a second is said at
    /// once; one that has not ended in 120 s (a backing that stalls its sync) then.
    static func awaitRelease(_ id: UInt32, server pid: Int32, serverPID: Int32,
                             control: borrowing ControlDevice) throws(CLIError) -> Bool {
        var (stoppedTicks, goneTicks) = (0, 0)
        for _ in 0..<12_000 {
            // (6.12 resets a stopped device's server pid: only another live pid is a new device.)
            guard let info = try? control.deviceInfo(id), info.serverPID <= 0 || info.serverPID == serverPID else { return true }
            switch RuntimeDirectory.processState(pid) {
            case "T"?, "t"?: (stoppedTicks, goneTicks) = (stoppedTicks + 1, 0)
            case nil, "Z"?, "X"?: (stoppedTicks, goneTicks) = (0, goneTicks + 1)
            default: (stoppedTicks, goneTicks) = (0, 0)
            }
            if stoppedTicks == 100 { try refuseStopped(id, server: pid) }
            if goneTicks == 100 { return false }
            usleep(10_000)
        }
        throw CLIError("ublk device \(id) is removed, but its server (pid \(pid)) has not ended in 120 s (its backing stalls?), and id \(id) stays taken until it does")
    }

    /// Says that removed device `id`'s server is stopped by a signal (SIGSTOP, a debugger):
    /// it cannot close /dev/ublkcN, so the id stays taken until it goes on.
    static func refuseStopped(_ id: UInt32, server pid: Int32) throws(CLIError) {
        guard RuntimeDirectory.isStopped(pid) else { return }
        throw CLIError("ublk device \(id) is removed, but its server (pid \(pid)) is stopped, and id \(id) stays taken until it ends: kill -CONT \(pid)")
    }

    /// The rows of the devices `include` takes (by id and record; every device by default).
    static func list(control: borrowing ControlDevice,
                     where include: (UInt32, DeviceRecord?) -> Bool = { _, _ in true }) -> [DeviceRow] {
        var rows: [DeviceRow] = []
        for id in ControlDevice.deviceIDs() {
            let record = RuntimeDirectory.load(id)
            guard include(id, record), let info = try? control.deviceInfo(id) else { continue }
            let parameters = try? control.parameters(id)
            let pid = info.serverPID > 0 ? info.serverPID : (record?.pid ?? -1)
            let alive = RuntimeDirectory.isAlive(pid)
            var state = "\(info.state)"
            if !alive { state += ",server-dead" }
            rows.append(DeviceRow(
                id: id, state: state, target: record?.spec.displayName ?? "?", backing: record.map { $0.spec.backing ?? "-" } ?? "-",
                size: (parameters?.sectors ?? 0) << 9, queues: Int(info.queueCount), depth: Int(info.queueDepth),
                directIO: record?.directIO ?? "?",
                dataPath: info.flags.contains(.autoBufferRegistration) ? "zero-copy" : "copy",
                commands: info.flags.contains(.batchIO) ? "batched" : "per-request",
                pollMicroseconds: record?.pollMicroseconds, pid: pid, serverAlive: alive,
                readOnly: parameters?.readOnly == true || SmallFile.text("/sys/block/ublkb\(id)/ro")?.hasPrefix("1") == true,
                blockSize: parameters?.logicalBlockSize ?? 512,
                offset: record?.spec.window.offset ?? 0, sizeLimit: record?.spec.window.sizeLimit,
                name: record?.name, encryption: record?.spec.encryption))
            if let record, let (backing, change) = backingChange(record, server: alive ? pid : nil) {
                (rows[rows.count - 1].backing, rows[rows.count - 1].backingChanged) = (backing, change)
            }
            rows[rows.count - 1].swap = record?.swap
        }
        return rows
    }

    /// The backing to show and how it changed, when the record's path no longer names the
    /// file: "renamed" with the new name the live `server`'s open file has (another file may
    /// have the old one; the kernel knows, as losetup -l shows a loop's), else "deleted" or
    /// "replaced" with the recorded path. Nil when the path still names it.
    static func backingChange(_ record: DeviceRecord, server: Int32?) -> (backing: String, change: String)? {
        let change: String
        switch record.backingPath() {
        case .gone(let error)? where error.errno == ENOENT: change = "deleted"
        case .replaced?: change = "replaced"
        default: return nil
        }
        if let server, let name = openBackingName(record, pid: server), !name.hasSuffix(" (deleted)") {
            return (name, "renamed")
        }
        return (record.spec.backing ?? "-", change)
    }

    /// The name live server `pid`'s open backing has now, as the kernel says it in
    /// /proc/PID/fd: a renamed file's new name, or its old one with " (deleted)" once it is
    /// unlinked. Nil where that cannot be read (another user's server, no such descriptor).
    static func openBackingName(_ record: DeviceRecord, pid: Int32) -> String? {
        guard let identity = record.backingIdentity, pid > 0 else { return nil }
        for fd in SmallFile.entries(of: "/proc/\(pid)/fd") {
            let path = "/proc/\(pid)/fd/\(fd)"
            if case .success(identity) = FileIdentity.of(path: path) { return DeviceSafety.linkTarget(path) }
        }
        return nil
    }

    /// A device that `ublk start NAME` finds from an earlier server of that name which died:
    /// `recoverable` if it was added with --recovery and is not dead (it waits for a new
    /// server), else it is only in the way. Nil when there is none.
    static func orphan(named name: String) throws -> (id: UInt32, recoverable: Bool)? {
        let control = try ControlDevice()
        let existing = Set(ControlDevice.deviceIDs())
        for record in RuntimeDirectory.all().sorted(by: { $0.id < $1.id })
        where record.name == name && existing.contains(record.id) && !RuntimeDirectory.isAlive(record.pid) {
            guard let info = try? control.deviceInfo(record.id), !RuntimeDirectory.isAlive(info.serverPID) else { continue }
            return (record.id, info.flags.contains(.userRecovery) && info.state != .dead)
        }
        return nil
    }

    /// The target and options a recovering server needs, from the dead server's record.
    /// `key` says where to read an encrypted device's key from (records never hold it).
    static func recoveryPlan(_ id: UInt32, key: KeyOptions) throws -> (any SpecifiedTarget, ServerOptions) {
        // No such device (or no permission, or no driver) says so, before the missing record would.
        let info = try ControlDevice().deviceInfo(id)
        guard let record = RuntimeDirectory.load(id) else {
            throw CLIError("no record of device \(id) under \(RuntimeDirectory.path): cannot tell its backing file; delete it with ublk del --id \(id)")
        }
        // A server that handed the device over (ublk upgrade) lives until the new one has it.
        if RuntimeDirectory.isAlive(record.pid) && info.state == .live {
            throw CLIError("device \(id) is still served by pid \(record.pid): nothing to recover")
        }
        var options = ServerOptions(id: id, queues: record.queues, depth: record.depth)
        options.recovery = .reissue // the device keeps the policy it was added with
        options.name = record.name
        if let poll = record.pollMicroseconds { options.pollMicroseconds = poll }
        options.swap = record.swap == true
        // The backing is opened by path, which may name another file now (or none).
        let replaced = { (why: String) in CLIError("\(why): put it back, or delete the device with ublk del --id \(id)") }
        if let why = record.backingReplaced() { throw replaced(why) }
        let target = try record.spec.makeTarget(key: try recoveryKey(record, key))
        target.takesOverWrites()
        if record.writesLost == true { target.writesWereLost() }
        if let expected = record.backingIdentity, target.backingIdentity != expected {
            throw replaced("\(record.spec.backing ?? "the backing") changed while it was opened")
        }
        return (target, options)
    }

    /// The key of an encrypted device, of the size its record gives; nil for a plain one.
    static func recoveryKey(_ record: DeviceRecord, _ key: KeyOptions) throws -> EncryptionKey? {
        guard let encryption = record.spec.encryption else {
            if key.isGiven { throw CLIError("device \(record.id) is not encrypted: leave out --key-file") }
            return nil
        }
        guard key.isGiven else {
            throw CLIError("device \(record.id) is encrypted (\(encryption.cipher.rawValue), \(encryption.keySize)-bit key): give its key again with --key-file PATH (or - for standard input)")
        }
        let loaded: EncryptionKey
        do {
            guard let key = try key.load(bits: encryption.keySize) else { return nil }
            loaded = key
        } catch let XTSKeyError.tooShort(source, bytes, size) {
            // The size is the device's: no --key-size to suggest, and no new key either.
            throw CLIError("\(source) has \(bytes) bytes, but device \(record.id)'s key has \(size.byteCount): give the key it was added with")
        }
        // A wrong key of the right size would read noise and write with a second key.
        if let check = record.keyCheck, !loaded.matches(check) {
            throw CLIError("\(key.sourceName) is not the key device \(record.id) was added with: give that key (another one would read noise and corrupt what is written)")
        }
        return loaded
    }
}

enum DeviceListing {
    /// Pretty, keys sorted, paths as written (`/srv`, not `\/srv`); no devices: `[]`.
    static func json(_ rows: [DeviceRow]) -> String {
        guard !rows.isEmpty else { return "[]" }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return (try? encoder.encode(rows)).map { String(decoding: $0, as: UTF8.self) } ?? "[]"
    }

    static func table(_ rows: [DeviceRow]) -> String {
        // Columns stay where scripts that read them by position expect them (`commands` is in --json).
        let header = ["ID", "STATE", "TARGET", "SIZE", "QUEUES", "DEPTH", "DIO", "DATA", "PID", "BACKING"]
        let lines = [header] + rows.map {
            [String($0.id), $0.state, $0.target, humanSize($0.size), String($0.queues), String($0.depth), $0.directIO, $0.dataPath,
             $0.pid > 0 ? String($0.pid) : "-", $0.backing.escapingControlCharacters + ($0.backingChanged.map { " (\($0))" } ?? "")]
        }
        let widths = header.indices.map { column in lines.map { $0[column].count }.max() ?? 0 }
        return lines.map { line in
            line.indices.map { column in
                column == line.count - 1 ? line[column] : line[column].padding(to: widths[column])
            }.joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }

    static func humanSize(_ bytes: UInt64) -> String {
        let units = ["B", "K", "M", "G", "T"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return value == value.rounded() ? "\(Int(value))\(units[unit])" : String(Int(value * 10) / 10) + "." + String(Int(value * 10) % 10) + units[unit]
    }
}

extension String {
    /// One line of a table whatever a path holds: a newline, tab or other control character
    /// as `\n`, `\t` or `\xNN` (a file name may hold any of them; `--json` escapes them too).
    var escapingControlCharacters: String {
        guard unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else { return self }
        return unicodeScalars.map { scalar -> String in
            switch scalar {
            case "\n": "\\n"
            case "\t": "\\t"
            case _ where scalar.value < 0x20 || scalar.value == 0x7F:
                "\\x" + (scalar.value < 0x10 ? "0" : "") + String(scalar.value, radix: 16)
            default: String(scalar)
            }
        }.joined()
    }

    func padding(to width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }
}
