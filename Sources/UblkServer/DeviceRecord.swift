import FoundationEssentials
import Glibc
import UblkSystem

/// What a running server writes about its device under `/run/ublk/` so that
/// `ublk list`, `del` and `recover` work from any shell: the target's settings (a
/// recovering server needs them) and who serves it.
public struct DeviceRecord: Codable, Sendable, Equatable {
    public var id: UInt32
    public var pid: Int32
    /// Config name, when started by `ublk start NAME`.
    public var name: String?
    public var target: String
    public var backing: String?
    public var size: UInt64
    public var queues: Int
    public var depth: Int
    public var directIO: String
    public var readOnly: Bool
    public var offset: UInt64
    public var sizeLimit: UInt64?
    public var blockSize: Int
    public var recovery: Bool
    /// The direct I/O mode asked for (on/off/auto), for a recovering server.
    public var directIORequest: String

    public init(id: UInt32, pid: Int32, name: String?, target: String, backing: String?, size: UInt64, queues: Int,
                depth: Int, directIO: String, readOnly: Bool, offset: UInt64, sizeLimit: UInt64?, blockSize: Int,
                recovery: Bool, directIORequest: String) {
        self.id = id
        self.pid = pid
        self.name = name
        self.target = target
        self.backing = backing
        self.size = size
        self.queues = queues
        self.depth = depth
        self.directIO = directIO
        self.readOnly = readOnly
        self.offset = offset
        self.sizeLimit = sizeLimit
        self.blockSize = blockSize
        self.recovery = recovery
        self.directIORequest = directIORequest
    }
}

/// The directory of device records (`/run/ublk`, or `$UBLK_RUN_DIR`).
public enum RuntimeDirectory {
    public static var path: String {
        getenv("UBLK_RUN_DIR").map { String(cString: $0) } ?? "/run/ublk"
    }

    static func recordPath(_ id: UInt32) -> String { "\(path)/ublkb\(id).json" }

    /// Writes the record atomically (temporary file + rename).
    public static func save(_ record: DeviceRecord) throws {
        SmallFile.makeDirectory(path)
        try SmallFile.writeAtomically(recordPath(record.id), Array(try JSONEncoder().encode(record)))
    }

    /// The record of device `id`, if one was written.
    public static func load(_ id: UInt32) -> DeviceRecord? {
        guard let bytes = try? SmallFile.read(recordPath(id)) else { return nil }
        return try? JSONDecoder().decode(DeviceRecord.self, from: Data(bytes))
    }

    public static func remove(_ id: UInt32) {
        SmallFile.remove(recordPath(id))
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
        guard let text = SmallFile.text("/proc/\(pid)/stat") else { return false }
        guard let close = text.lastIndex(of: ")") else { return true }
        let state = text[text.index(after: close)...].drop { $0 == " " }.first
        return state != "Z" && state != "X"
    }
}
