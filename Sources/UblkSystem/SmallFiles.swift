import Glibc

/// Whole-file reads and atomic writes of small files: sysfs and procfs attributes,
/// config files, the device records under /run/ublk.
public enum SmallFile {
    /// The whole content of `path`, read front to back with read(2) (not pread: a pipe
    /// such as `<(...)` or /dev/stdin has no offsets). More than `limit` bytes is an
    /// error (EFBIG), so that /dev/zero or a wrong file is not read into memory forever.
    public static func read(_ path: String, limit: Int = 16 << 20) throws -> [UInt8] {
        let file = try FileDescriptor(path: path, flags: O_RDONLY)
        return try read(from: file.rawValue, named: path, limit: limit)
    }

    /// Everything left to read on `fd` (standard input, say), which stays open; as `read(_:limit:)`.
    public static func read(from fd: Int32, named name: String, limit: Int = 16 << 20) throws -> [UInt8] {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = try chunk.withUnsafeMutableBytes { try Syscalls.read(fd, $0) }
            if count == 0 { return bytes }
            if bytes.count + count > limit { throw SystemError("read \(name)", errno: EFBIG) }
            bytes += chunk[0..<count]
        }
    }

    /// The content of `path` as text, or nil if it cannot be read.
    public static func text(_ path: String) -> String? {
        (try? read(path)).map { String(decoding: $0, as: UTF8.self) }
    }

    /// A sysfs-style attribute holding one integer, or nil.
    public static func integer(_ path: String) -> Int? {
        text(path).flatMap { Int($0.filter { !$0.isWhitespace }) }
    }

    /// Replaces `path` atomically: a temporary file beside it, fsync, then rename, so a
    /// reader sees the old content or the new, never half of it.
    public static func writeAtomically(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws {
        let temporary = "\(path).tmp.\(getpid())"
        do {
            let file = try FileDescriptor(path: temporary, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: mode)
            var written = 0
            try bytes.withUnsafeBytes { raw in
                while written < raw.count {
                    written += try file.write(UnsafeRawBufferPointer(rebasing: raw[written...]), at: Int64(written))
                }
            }
            try file.sync()
            try Syscalls.rename(temporary, path)
        } catch {
            Syscalls.unlink(temporary)
            throw error
        }
    }

    /// Writes `bytes` to an existing file in one write (a sysfs attribute).
    public static func overwrite(_ path: String, _ bytes: [UInt8]) throws {
        let file = try FileDescriptor(path: path, flags: O_WRONLY)
        _ = try bytes.withUnsafeBytes { try file.write($0, at: 0) }
    }

    /// Removes `path`, if it exists.
    public static func remove(_ path: String) { Syscalls.unlink(path) }

    /// Creates directory `path` unless it exists.
    public static func makeDirectory(_ path: String, mode: mode_t = 0o755) { Syscalls.mkdir(path, mode) }

    /// `path` and any of its parents that are missing, as `mkdir -p` (failures show later, when the directory is used).
    public static func makeDirectories(_ path: String, mode: mode_t = 0o755) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            Syscalls.mkdir(prefix, mode)
        }
    }

    /// Names in directory `path` (without . and ..); empty if it cannot be read.
    public static func entries(of path: String) -> [String] {
        (try? Syscalls.directoryEntries(path)) ?? []
    }
}
