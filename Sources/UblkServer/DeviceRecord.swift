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

    /// Writes the record atomically: a temporary file, fsync, then rename over the old one.
    public static func save(_ record: DeviceRecord) throws {
        _ = mkdir(path, 0o755)
        let data = try JSONEncoder().encode(record)
        let final = recordPath(record.id)
        let temporary = "\(final).tmp.\(getpid())"
        let file = try FileDescriptor(path: temporary, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
        try data.withUnsafeBytes { bytes in
            var written = 0
            while written < bytes.count {
                written += try file.write(UnsafeRawBufferPointer(rebasing: bytes[written...]), at: Int64(written))
            }
        }
        try file.sync()
        guard rename(temporary, final) == 0 else {
            let error = SystemError("rename \(temporary)", errno: errno)
            unlink(temporary)
            throw error
        }
    }

    /// The record of device `id`, if one was written.
    public static func load(_ id: UInt32) -> DeviceRecord? {
        guard let stream = fopen(recordPath(id), "r") else { return nil }
        defer { fclose(stream) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = fread(&chunk, 1, chunk.count, stream)
            if count <= 0 { break }
            bytes += chunk[0..<count]
        }
        return try? JSONDecoder().decode(DeviceRecord.self, from: Data(bytes))
    }

    public static func remove(_ id: UInt32) {
        unlink(recordPath(id))
    }

    /// Every record on disk (including those of servers that died).
    public static func all() -> [DeviceRecord] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var records: [DeviceRecord] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard name.hasPrefix("ublkb"), name.hasSuffix(".json"),
                  let id = UInt32(name.dropFirst(5).dropLast(5)), let record = load(id) else { continue }
            records.append(record)
        }
        return records.sorted { $0.id < $1.id }
    }

    /// Is `pid` a live process (not a zombie)?
    public static func isAlive(_ pid: Int32) -> Bool {
        guard pid > 0 else { return false }
        if kill(pid, 0) != 0 && errno == ESRCH { return false }
        guard let stream = fopen("/proc/\(pid)/stat", "r") else { return false }
        defer { fclose(stream) }
        var line = [CChar](repeating: 0, count: 512)
        guard fgets(&line, 512, stream) != nil else { return false }
        let text = String(cString: line)
        guard let close = text.lastIndex(of: ")") else { return true }
        let state = text[text.index(after: close)...].drop { $0 == " " }.first
        return state != "Z" && state != "X"
    }
}
