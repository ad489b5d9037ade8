import FoundationEssentials
import Glibc
import UblkCrypto
import UblkSystem
import UblkTargets

/// What a running server writes about its device under `/run/ublk/` so that
/// `ublk list`, `del` and `recover` work from any shell: the target's spec (a
/// recovering server rebuilds the target from it) and who serves it.
public struct DeviceRecord: Codable, Sendable, Equatable {
    public var id: UInt32
    public var pid: Int32
    /// Config name, when started by `ublk start NAME`.
    public var name: String?
    public var spec: TargetSpec
    /// The device's size in bytes as the server last set it (after `ublk resize` too).
    public var size: UInt64
    public var queues: Int
    public var depth: Int
    /// O_DIRECT on the backing as the server got it: "on", "off", or "-" without a backing.
    public var directIO: String
    public var recovery: Bool
    /// The queues' busy-polling window (`--poll-us`), which a recovering server keeps;
    /// nil in records of servers from before busy polling.
    public var pollMicroseconds: Int?
    /// An encrypted device's key check value (never the key): a new server's key must
    /// match it. Nil for plain devices and in records of servers from before it.
    public var keyCheck: KeyCheck?
    /// The backing file the server opened: a new server must open the same one, not
    /// whatever its path names now. Nil without a backing and in older records.
    public var backingIdentity: FileIdentity?
    /// Added with `--swap` (its server locks all its memory at once), which a recovering
    /// server keeps; nil otherwise.
    public var swap: Bool?
    /// The server that wrote it could not make every completed write durable when it handed
    /// the device over (`Target.writesLost`, or its last sync failed): the next server fails
    /// its first FLUSH. Nil otherwise.
    public var writesLost: Bool?

    public init(id: UInt32, pid: Int32, name: String?, spec: TargetSpec, size: UInt64, queues: Int, depth: Int,
                directIO: String, recovery: Bool, pollMicroseconds: Int? = nil, keyCheck: KeyCheck? = nil,
                backingIdentity: FileIdentity? = nil) {
        self.id = id
        self.pid = pid
        self.name = name
        self.spec = spec
        self.size = size
        self.queues = queues
        self.depth = depth
        self.directIO = directIO
        self.recovery = recovery
        self.pollMicroseconds = pollMicroseconds
        self.keyCheck = keyCheck
        self.backingIdentity = backingIdentity
    }

    /// Why the file `path` names now is not the backing this record's server had, or nil
    /// if it is (or the record does not say): a new server taking the device over with
    /// another file would serve other data under a mounted file system.
    public func backingReplaced() -> String? {
        guard let path = spec.backing else { return nil }
        switch backingPath() {
        case nil, .same?: return nil
        case .replaced?: return "\(path) is no longer the file device \(id) was added with (it was replaced, moved or re-pointed since)"
        case .gone(let error)?: return "device \(id)'s backing file \(path) is gone (\(error.reason))"
        }
    }

    /// What the backing's path names now.
    public enum BackingPath: Equatable, Sendable {
        /// The file the device was added with.
        case same
        /// Another file (the backing was replaced, moved or re-pointed).
        case replaced
        /// Nothing the server could open (deleted, or unreachable: the error).
        case gone(SystemError)
    }

    /// What the backing's path names now, or nil if the record does not say (no file
    /// backing, or a record from before identities were kept).
    public func backingPath() -> BackingPath? {
        guard let expected = backingIdentity, let path = spec.backing else { return nil }
        switch FileIdentity.of(path: path) {
        case .success(expected): return .same
        case .success: return .replaced
        case .failure(let error): return .gone(error)
        }
    }
}

/// The directory of device records (`/run/ublk`, or `$UBLK_RUN_DIR`).
public enum RuntimeDirectory {
    public static var path: String {
        getenv("UBLK_RUN_DIR").map { String(cString: $0) } ?? "/run/ublk"
    }

    static func recordPath(_ id: UInt32) -> String { "\(path)/ublkb\(id).json" }

    /// Writes the record atomically (temporary file + rename). An encrypted device's is
    /// root's alone: its key check value would let anyone test guesses of a weak key offline.
    public static func save(_ record: DeviceRecord) throws {
        SmallFile.makeDirectories(path)
        try SmallFile.writeAtomically(recordPath(record.id), Array(try JSONEncoder().encode(record)),
                                      mode: record.keyCheck == nil ? 0o644 : 0o600)
    }

    /// The record of device `id`, if one was written.
    public static func load(_ id: UInt32) -> DeviceRecord? {
        guard let bytes = try? SmallFile.read(recordPath(id)) else { return nil }
        return try? JSONDecoder().decode(DeviceRecord.self, from: Data(bytes))
    }

    public static func remove(_ id: UInt32) {
        SmallFile.remove(recordPath(id))
    }

    /// Removes what server `pid` of device `id` left, once the device is deleted: its record
    /// (not one a new server of the same id wrote since) and, the server being gone, its
    /// request socket, which a server killed outright leaves behind.
    public static func removeServerFiles(_ id: UInt32, pid: Int32) {
        guard let record = load(id), record.pid == pid else { return }
        remove(id)
        if !isAlive(pid) { SmallFile.remove(ServerControl.socketPath(id)) }
    }

    /// Every record on disk (including those of servers that died).
    public static func all() -> [DeviceRecord] {
        SmallFile.entries(of: path).compactMap { name in
            guard name.hasPrefix("ublkb"), name.hasSuffix(".json"), let id = UInt32(name.dropFirst(5).dropLast(5)) else {
                return nil
            }
            return load(id)
        }.sorted { $0.id < $1.id }
    }

    /// Is `pid` a live process (not a zombie)?
    public static func isAlive(_ pid: Int32) -> Bool {
        guard pid > 0 else { return false }
        if kill(pid, 0) != 0 && errno == ESRCH { return false }
        guard let state = processState(pid) else { return false }
        return state != "Z" && state != "X"
    }

    /// Whether `pid` is stopped by a signal (SIGSTOP) or a debugger: it runs no code, and
    /// holds whatever it holds, until it goes on.
    public static func isStopped(_ pid: Int32) -> Bool {
        let state = processState(pid)
        return state == "T" || state == "t"
    }

    /// Where the lock files of adds and upgrades live.
    public static var locksPath: String { path + "/locks" }

    /// The state of process `pid` as /proc shows it (R, S, D, T stopped, t traced, Z, ...),
    /// or nil if there is no such process.
    public static func processState(_ pid: Int32) -> Character? {
        guard pid > 0, let text = SmallFile.text("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        return text[text.index(after: close)...].drop { $0 == " " }.first
    }
}
