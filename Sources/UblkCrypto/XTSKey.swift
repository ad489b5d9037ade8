import Glibc
import UblkSystem

/// The size of a whole XTS key, as cryptsetup's `--key-size` gives it (in bits).
///
/// XTS uses two AES keys of equal size, the data key then the tweak key, so 512 bits is
/// AES-256-XTS and 256 bits is AES-128-XTS (the layout of the kernel's xts and OpenSSL).
public enum XTSKeySize: Int, Sendable, CaseIterable, CustomStringConvertible {
    case bits256 = 256
    case bits512 = 512

    /// 512 bits (AES-256); pass it explicitly to cryptsetup, whose plain-mode default differs.
    public static let standard = XTSKeySize.bits512

    /// The size for `--key-size bits`; anything but 256 or 512 is refused.
    public init(bits: Int) throws(XTSKeyError) {
        guard let size = XTSKeySize(rawValue: bits) else { throw .unsupportedKeySize(bits: bits) }
        self = size
    }

    public var byteCount: Int { rawValue / 8 }
    public var description: String { "\(rawValue) bits" }
}

/// Where a key comes from, to name it in errors (never the key itself).
public enum KeySource: Equatable, Sendable, CustomStringConvertible {
    /// A key file on disk, read from its start.
    case file(String)
    /// Standard input, a pipe or another open descriptor, with a name for messages.
    case stream(String)

    public var description: String {
        switch self {
        case .file(let path): return "key file \(path)"
        case .stream(let name): return name
        }
    }
}

/// The raw key of an `aes-xts-plain64` mapping, held in locked memory and wiped when its
/// owner goes away.
///
/// Read exactly as cryptsetup plain mode reads `--key-file` (not `-`): no hashing, the
/// first key-size bytes of the file; a shorter file is an error and the rest of a longer
/// one is ignored. `~Copyable`, with no description and no accessor outside this module,
/// so the bytes cannot reach a log, a record or `--json`.
public struct XTSKey: ~Copyable {
    public let size: XTSKeySize
    public let source: KeySource
    private let memory: LockedMemory

    /// Reads the key from the file at `path`; `-` reads standard input (raw bytes, where
    /// cryptsetup would hash a passphrase: give cryptsetup the file, or `/dev/stdin`).
    public init(file path: String, size: XTSKeySize = .standard) throws(XTSKeyError) {
        if path == "-" {
            try self.init(readingRaw: STDIN_FILENO, source: .stream("standard input"), size: size,
                          into: try XTSKey.lockedMemory(size))
            return
        }
        let file: FileDescriptor
        do { file = try FileDescriptor(path: path, flags: O_RDONLY) }
        catch { throw .cannotOpen(path: path, size: size, error) }
        try self.init(readingRaw: file.rawValue, source: .file(path), size: size, into: try XTSKey.lockedMemory(size))
    }

    /// Reads the key from an open descriptor (a pipe the CLI hands the server), from its
    /// current position; `name` says what it is in error messages.
    public init(reading descriptor: borrowing FileDescriptor, named name: String,
                size: XTSKeySize = .standard) throws(XTSKeyError) {
        try self.init(readingRaw: descriptor.rawValue, source: .stream(name), size: size,
                      into: try XTSKey.lockedMemory(size))
    }

    /// The one reading path; also the test seam that supplies caller-owned `memory`.
    init(readingRaw fd: Int32, source: KeySource, size: XTSKeySize,
         into memory: consuming LockedMemory) throws(XTSKeyError) {
        precondition(memory.count == size.byteCount, "key memory must be exactly the key size")
        // As cryptsetup refuses to read a key file from a terminal: typed text is no key.
        if isatty(fd) == 1 { throw .terminal(source: source) }
        let got: Int
        do { got = try memory.fill(readingFrom: fd) }
        catch { throw .cannotRead(source: source, error) }
        guard got == size.byteCount else { throw .tooShort(source: source, bytes: got, size: size) }
        guard XTSKey.halvesDiffer(memory.bytes) else { throw .equalHalves(source: source, size: size) }
        self.size = size
        self.source = source
        self.memory = memory
    }

    /// A pipe that holds the key and then ends (see `FileDescriptor.pipe(holding:)`): how
    /// `ublk upgrade` hands the key it read and checked to the new server, which reads it
    /// from the pipe as it would a `--key-file -` key. Never a file, never argv.
    public func pipe(lowest: Int32 = 0) throws(SystemError) -> FileDescriptor {
        try FileDescriptor.pipe(holding: memory.bytes, lowest: lowest)
    }

    /// The key bytes, for handing to the cipher; only inside this module.
    var bytes: UnsafeRawBufferPointer { memory.bytes }

    private static func lockedMemory(_ size: XTSKeySize) throws(XTSKeyError) -> LockedMemory {
        do { return try LockedMemory(count: size.byteCount) }
        catch { throw .cannotLockMemory(error) }
    }

    /// XTS forbids a tweak key equal to the data key (OpenSSL refuses it for encryption,
    /// IEEE 1619 calls it insecure). Compares every byte, so the time says nothing of where
    /// the halves differ.
    static func halvesDiffer(_ key: UnsafeRawBufferPointer) -> Bool {
        let half = key.count / 2
        var difference: UInt8 = 0
        for index in 0..<half { difference |= key[index] ^ key[half + index] }
        return difference != 0
    }
}
