import Glibc
import UblkControl
import UblkQueue
import UblkServer
import UblkSystem
import UblkTargets

/// What keeps a ublk block device in use, and whether a new device would write where a
/// served one already does: the checks behind `del` refusing a busy device and `add`
/// refusing an overlapping read-write device, as losetup and the loop driver refuse them.
enum DeviceSafety {
    /// Who holds /dev/ublkbN or one of its partitions: devices stacked on it (dm, md),
    /// mounts, and processes that have it open. Empty when nothing visible holds it (a
    /// holder in another mount namespace, or an open the kernel alone knows of, is missed:
    /// TRY_STOP_DEV, where the kernel has it, makes the final decision).
    ///
    /// With `probing` (a live device: opening it does no I/O that could wait for a server),
    /// an exclusive open finds what claims it unseen from here: a file system whose mount
    /// names no device number of its own (btrfs), a mount in another mount namespace, swap.
    /// Loop devices over it are found by their backing file.
    static func holders(of id: UInt32, probing: Bool = false) -> [String] {
        let disk = "ublkb\(id)"
        let names = [disk] + SmallFile.entries(of: "/sys/block/\(disk)").filter { $0.hasPrefix(disk + "p") }
        let paths = Set(names.map { "/dev/\($0)" })
        var found: [String] = []
        for name in names {
            found += SmallFile.entries(of: "/sys/class/block/\(name)/holders").map { "used by /dev/\($0)" }
        }
        let numbers = Set(names.compactMap { SmallFile.text("/sys/class/block/\($0)/dev")?.trimmingSpaces.trimmingNewline })
        found += mountPoints(of: numbers).map { "mounted on \($0)" }
        found += swapAreas(on: paths).map { "swap: swapoff \($0)" }
        found += loopDevices(over: paths).map { "backing /dev/\($0)" }
        found += openers(of: paths)
        if found.isEmpty && probing {
            found += paths.sorted().filter(isClaimed).map { "\($0) claimed (a mount, perhaps in another namespace, or swap)" }
        }
        return found
    }

    /// Is the block device at `path` claimed: opened exclusively (mounted, swap, stacked)?
    static func isClaimed(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_EXCL | O_NONBLOCK | O_CLOEXEC)
        if fd >= 0 { close(fd) }
        return fd < 0 && errno == EBUSY
    }

    /// The loop devices whose backing file is one of `paths`.
    static func loopDevices(over paths: Set<String>) -> [String] {
        SmallFile.entries(of: "/sys/block").filter { name in
            name.hasPrefix("loop") && SmallFile.text("/sys/block/\(name)/loop/backing_file").map {
                paths.contains($0.trimmingNewline)
            } == true
        }.sorted()
    }

    /// Mount points whose source is one of the block devices `numbers` ("major:minor").
    static func mountPoints(of numbers: Set<String>) -> [String] {
        guard let text = SmallFile.text("/proc/self/mountinfo") else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 4, numbers.contains(String(fields[2])) else { return nil }
            return String(fields[4]).unescapingOctal
        }
    }

    /// The swap areas (/proc/swaps, as swapon named them) on one of the block devices `paths`.
    static func swapAreas(on paths: Set<String>, table: String? = SmallFile.text("/proc/swaps")) -> [String] {
        guard let text = table else { return [] }
        let devices = paths.compactMap { try? FileIdentity.of(path: $0).get() }
        return text.split(separator: "\n").dropFirst().compactMap { line in
            guard let field = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).first else { return nil }
            let path = String(field).unescapingOctal
            guard let identity = try? FileIdentity.of(path: path).get(), devices.contains(identity) else { return nil }
            return path
        }
    }

    /// "open by pid N (command)" for every other process with one of `paths` open.
    static func openers(of paths: Set<String>) -> [String] {
        var found: [String] = []
        let me = getpid()
        for entry in SmallFile.entries(of: "/proc") {
            guard let pid = Int32(entry), pid != me else { continue }
            let fds = SmallFile.entries(of: "/proc/\(pid)/fd")
            if fds.contains(where: { linkTarget("/proc/\(pid)/fd/\($0)").map(paths.contains) ?? false }) {
                let command = SmallFile.text("/proc/\(pid)/comm")?.trimmingNewline ?? "?"
                // The server of a device stacked on this one: name that device, to remove first.
                let upper = RuntimeDirectory.all().first { $0.pid == pid }.map { ": /dev/ublkb\($0.id) is stacked on it" } ?? ""
                found.append("open by pid \(pid) (\(command)\(upper))")
            }
        }
        return found
    }

    static func linkTarget(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink(path, &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Refuses a read-write loop device over a backing range that a live device already
    /// serves read-write (the same file or block device, overlapping bytes), naming that
    /// device: two writers that each cache the other's blocks corrupt the data.
    static func refuseOverlap(_ target: any Target, force: Bool) throws {
        guard !force, let loop = target as? LoopTarget, !loop.configuration.readOnly,
              let identity = loop.backingIdentity else { return }
        let start = loop.configuration.offset
        let end = start + loop.properties.size
        let existing = Set(ControlDevice.deviceIDs())
        let control = try ControlDevice()
        for record in RuntimeDirectory.all() {
            // The file the device serves, as recorded: its path may name another one now.
            guard case .loop(let other) = record.spec, !other.readOnly, existing.contains(record.id),
                  (record.backingIdentity ?? (try? FileIdentity.of(path: other.path).get())) == identity else { continue }
            // A device whose server died still counts if it waits for a new one (--recovery):
            // `ublk recover` would bring a second writer back.
            let waiting = !RuntimeDirectory.isAlive(record.pid)
            if waiting, (try? control.deviceInfo(record.id))?.flags.contains(.userRecovery) != true { continue }
            // The size the device has now (it may have been resized since the record was made).
            let size = (try? control.parameters(record.id)).map { $0.sectors << 9 } ?? other.size ?? UInt64.max - other.offset
            let (sum, overflow) = other.offset.addingReportingOverflow(size)
            let (backing, otherStart, otherEnd) = (other.path, other.offset, overflow ? UInt64.max : sum)
            guard start < otherEnd, otherStart < end else { continue }
            // (Exact where an odd offset makes the short form round.)
            let bytes = { (n: UInt64) in n % 1024 == 0 ? DeviceListing.humanSize(n) : "\(n)" }
            let range = "bytes \(bytes(otherStart))-\(bytes(otherEnd))"
            if waiting {
                throw CLIError("ublk device \(record.id) holds \(backing) read-write (\(range)) and waits for a new server: ublk recover --id \(record.id), or ublk del --id \(record.id) first, or --force")
            }
            throw CLIError("ublk device \(record.id) already serves \(backing) read-write (\(range)): use --read-only, another --offset/--size range, or --force")
        }
    }

    /// Holds the backing of a new read-write loop device from the overlap check until the
    /// device's record is written (it is live): two `ublk add` of one file at once each
    /// passed the check before either had a record, and both served it read-write. Per
    /// backing (a lock file named by its identity, under /run/ublk/locks), so an add that
    /// is slow to come up holds back only adds of the same backing, and those for 30 s at most.
    /// Also per config name (`init(config:)`): two `ublk start NAME` at once each found no
    /// device of NAME, and made one each (an NBD export or null target has no backing file
    /// to lock).
    final class SetupLock {
        private var fd: Int32 = -1
        private var path = ""
        /// The lock is this add's: its release removes the file.
        private var held = false

        init(for target: any Target, directory: String = RuntimeDirectory.locksPath) throws {
            guard let loop = target as? LoopTarget, !loop.configuration.readOnly,
                  let identity = backingIdentity(loop.configuration.path) else { return }
            try lock(directory, identity.map { String($0, radix: 16) }.joined(separator: "-"),
                     busy: "another ublk add of \(loop.configuration.path) has been setting up its device for 30 s")
        }

        init(config name: String, directory: String = RuntimeDirectory.locksPath) throws {
            try lock(directory, "config-\(name)", busy: "another ublk start \(name) has been setting up its device for 30 s")
        }

        /// Takes the lock file `name` in `directory` (made if missing), waiting up to 30 s.
        private func lock(_ directory: String, _ name: String, busy: String) throws {
            SmallFile.makeDirectories(directory)
            path = "\(directory)/\(name)"
            for _ in 0..<300 {
                if fd < 0 { fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }
                guard fd >= 0 else { return }  // No /run/ublk: nothing records devices to race for.
                if flock(fd, LOCK_EX | LOCK_NB) == 0 {
                    held = lockedFileIsNamed
                    if held { return }
                    // Its holder removed the file as it let go: a lock on it is no lock. Again.
                    close(fd)
                    fd = -1
                } else {
                    usleep(100_000)
                }
            }
            release()
            throw CLIError("\(busy): wait for it (ublk list), then try again")
        }

        /// Whether `path` still names the file locked (or the releasing holder removed it).
        private var lockedFileIsNamed: Bool {
            var locked = stat()
            guard fstat(fd, &locked) == 0, case .success(let named) = FileIdentity.of(path: path) else { return false }
            return named == FileIdentity(device: UInt64(locked.st_dev), inode: UInt64(locked.st_ino))
        }

        /// Lets the next add of the backing go on (to find this device's record). The lock
        /// file goes too, while still locked: an add waiting on it then finds it unnamed
        /// and takes a new one, so /run/ublk/locks keeps no file per backing ever added.
        func release() {
            guard fd >= 0 else { return }
            // (Only the file it locked: one removed behind its back may be another add's now.)
            if held && lockedFileIsNamed { unlink(path) }
            close(fd)
            (fd, held) = (-1, false)
        }

        deinit { release() }
    }

    /// What names a backing: the block device itself, or the file's (device, inode).
    static func backingIdentity(_ path: String) -> [UInt64]? {
        guard let status = try? FileDescriptor(path: path, flags: O_RDONLY | O_NONBLOCK).status() else { return nil }
        return status.isBlockDevice ? [status.rdev] : [status.device, status.inode]
    }
}

extension String {
    var trimmingNewline: String {
        var s = Substring(self)
        while s.last == "\n" { s.removeLast() }
        return String(s)
    }

    /// A path as /proc/self/mountinfo and /proc/swaps write it, with a space, tab, newline
    /// or backslash as `\ooo` (three octal digits), decoded.
    var unescapingOctal: String {
        var bytes: [UInt8] = []
        var rest = Substring(self).utf8[...]
        while let byte = rest.first {
            let digits = rest.dropFirst().prefix(3)
            if byte == UInt8(ascii: "\\"), digits.count == 3, digits.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "7")).contains($0) }) {
                bytes.append(digits.reduce(0) { $0 &* 8 &+ ($1 - UInt8(ascii: "0")) })
                rest = rest.dropFirst(4)
            } else {
                bytes.append(byte)
                rest = rest.dropFirst()
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
