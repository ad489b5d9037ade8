import Glibc
import Testing
@testable import UblkCrypto
@testable import UblkSystem

@Suite struct XTSKeyTests {
    let files = KeyFiles()

    @Test func readsExactlyTheKeySize() throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        #expect(key.size == .bits512)
        #expect(Array(key.bytes) == XTSVectors.key10)
    }

    /// As cryptsetup plain mode: a longer key file is fine and only its first key-size
    /// bytes are the key (here the 32-byte vector 4 key from a 64-byte file).
    @Test func longerFileUsesItsStart() throws {
        let key = try files.key(XTSVectors.key4 + [UInt8](repeating: 0xA5, count: 32), size: .bits256)
        #expect(Array(key.bytes) == XTSVectors.key4)
    }

    @Test func shortFileIsRefused() throws {
        let path = try files.write("short", Array(XTSVectors.key4[..<31]))
        let error = XTSKeyError.tooShort(source: .file(path), bytes: 31, size: .bits256)
        #expect(throws: error) { _ = try XTSKey(file: path, size: .bits256) }
        // Never the advice to overwrite the file: it may be the only key of an image.
        #expect(error.description == "key file \(path) has 31 bytes, --key-size 256 needs 32: "
            + "give the file with the whole key; for a new image, make a new key file with head -c 32 /dev/urandom")
    }

    @Test func emptyFileIsRefused() throws {
        let path = try files.write("empty", [])
        #expect(throws: XTSKeyError.tooShort(source: .file(path), bytes: 0, size: .bits512)) {
            _ = try XTSKey(file: path)
        }
    }

    /// A 256-bit key file given with the default 512 bits is too short: no silent fallback.
    @Test func defaultIs512Bits() throws {
        let path = try files.write("k32", XTSVectors.key4)
        let error = XTSKeyError.tooShort(source: .file(path), bytes: 32, size: .bits512)
        #expect(throws: error) { _ = try XTSKey(file: path) }
        #expect(error.description.hasSuffix("needs 64: if it is a 256-bit key, give --key-size 256"))
    }

    /// As cryptsetup: a terminal on the key's input is someone about to type a passphrase.
    @Test func aTerminalIsRefused() throws {
        // A pseudo-terminal: unlock the master's slave (TIOCSPTLCK 0), ask its number (TIOCGPTN).
        let master = open("/dev/ptmx", O_RDWR | O_NOCTTY)
        try #require(master >= 0)
        defer { close(master) }
        // <asm-generic/ioctls.h>: _IOW('T', 0x31, int) and _IOR('T', 0x30, unsigned int).
        let (setLock, getNumber): (UInt, UInt) = (0x4004_5431, 0x8004_5430)
        var unlock: Int32 = 0, number: UInt32 = 0
        try #require(ioctl(master, setLock, &unlock) == 0 && ioctl(master, getNumber, &number) == 0)
        let terminal = try FileDescriptor(path: "/dev/pts/\(number)", flags: O_RDONLY | O_NOCTTY)
        #expect(throws: XTSKeyError.terminal(source: .stream("standard input"))) {
            _ = try XTSKey(reading: terminal, named: "standard input")
        }
    }

    @Test(arguments: [0, 128, 192, 384, 1024])
    func onlyTwoKeySizes(bits: Int) {
        #expect(throws: XTSKeyError.unsupportedKeySize(bits: bits)) { _ = try XTSKeySize(bits: bits) }
        #expect(XTSKeyError.unsupportedKeySize(bits: bits).description == "--key-size \(bits) is not supported: "
            + "use --key-size 512 (AES-256-XTS, the default) or --key-size 256 (AES-128-XTS)")
    }

    @Test(arguments: XTSKeySize.allCases)
    func equalHalvesAreRefused(size: XTSKeySize) throws {
        let half = Array(XTSVectors.key10[..<(size.byteCount / 2)])
        let path = try files.write("equal", half + half)
        let error = XTSKeyError.equalHalves(source: .file(path), size: size)
        #expect(throws: error) { _ = try XTSKey(file: path, size: size) }
        // One differing byte, even the last, is enough.
        var almost = half + half
        almost[almost.count - 1] ^= 1
        _ = try XTSKey(file: try files.write("almost", almost), size: size)
        #expect(!error.description.contains(Hex.string(half)))
    }

    @Test func missingFileSaysHowToMakeOne() throws {
        let path = "\(files.directory)/missing"
        let error = XTSKeyError.cannotOpen(path: path, size: .bits512, SystemError("open \(path)", errno: ENOENT))
        #expect(throws: error) { _ = try XTSKey(file: path) }
        #expect(error.description == "key file \(path) does not exist: check the path (only for a new image, make a key with head -c 64 /dev/urandom > \(path))")
    }

    @Test func directoryCannotBeRead() throws {
        #expect(throws: XTSKeyError.cannotRead(source: .file(files.directory), SystemError("read", errno: EISDIR))) {
            _ = try XTSKey(file: files.directory)
        }
    }

    /// A pipe whose write end is closed after `bytes` were written into it.
    static func pipe(holding bytes: [UInt8]) throws -> FileDescriptor {
        // (Not in withUnsafeBytes, whose result must be copyable.)
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 1)
        defer { copy.deallocate() }
        copy.copyBytes(from: bytes)
        return try FileDescriptor.pipe(holding: UnsafeRawBufferPointer(copy))
    }

    /// The CLI hands the server the key through a pipe; the key is read from it as it comes.
    @Test func readsFromAPipe() throws {
        let reader = try XTSKeyTests.pipe(holding: XTSVectors.key10 + [1, 2, 3])
        let key = try XTSKey(reading: reader, named: "the key pipe")
        #expect(Array(key.bytes) == XTSVectors.key10)
    }

    /// `ublk upgrade` reads a key from standard input, checks it, and hands it to the new
    /// server in a pipe of its own: the same key comes out, then the end, on a descriptor
    /// above the ones the launch puts at 3 and 4.
    @Test func keyGoesOnThroughAPipe() throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        let pipe = try key.pipe(lowest: 5)
        #expect(pipe.rawValue >= 5)
        #expect(fcntl(pipe.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        let again = try XTSKey(reading: pipe, named: "the key pipe")
        #expect(Array(again.bytes) == XTSVectors.key10)
        var byte: UInt8 = 0
        #expect(read(pipe.rawValue, &byte, 1) == 0)
    }

    @Test func shortPipeIsRefused() throws {
        let reader = try XTSKeyTests.pipe(holding: Array(XTSVectors.key10[..<40]))
        let error = XTSKeyError.tooShort(source: .stream("the key pipe"), bytes: 40, size: .bits512)
        #expect(throws: error) { _ = try XTSKey(reading: reader, named: "the key pipe") }
        #expect(error.description == "the key pipe has 40 bytes, --key-size 512 needs 64: "
            + "send the whole key; for a new image, make a key with head -c 64 /dev/urandom")
    }

    /// The key is in locked memory while it lives, and zero once its owner is gone (seen
    /// through the seam that lets the test own the memory the key is read into).
    @Test func keyIsLockedAndWipedWhenItGoesAway() throws {
        let path = try files.write("wipe", XTSVectors.key10)
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
        defer { memory.deallocate() }
        do {
            let file = try FileDescriptor(path: path, flags: O_RDONLY)
            let key = try XTSKey(readingRaw: file.rawValue, source: .file(path), size: .bits512,
                                 into: try LockedMemory(lockingCallerMemory: memory, count: 64))
            #expect(Array(UnsafeRawBufferPointer(start: memory, count: 64)) == XTSVectors.key10)
            #expect(XTSKeyTests.isLocked(memory))
            _ = consume key
        }
        #expect(UnsafeRawBufferPointer(start: memory, count: 64).allSatisfy { $0 == 0 })
        #expect(!XTSKeyTests.isLocked(memory))
    }

    /// A refused key is wiped too: the bytes read before the refusal do not stay behind.
    @Test func refusedKeyIsWiped() throws {
        let half = Array(XTSVectors.key10[..<32])
        let path = try files.write("equal", half + half)
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
        defer { memory.deallocate() }
        let file = try FileDescriptor(path: path, flags: O_RDONLY)
        #expect(throws: XTSKeyError.equalHalves(source: .file(path), size: .bits512)) {
            _ = try XTSKey(readingRaw: file.rawValue, source: .file(path), size: .bits512,
                           into: try LockedMemory(lockingCallerMemory: memory, count: 64))
        }
        #expect(UnsafeRawBufferPointer(start: memory, count: 64).allSatisfy { $0 == 0 })
    }

    /// Whether the page holding `address` is locked (`mincore` cannot tell; the kernel's
    /// per-mapping VmLck in /proc/self/smaps can).
    static func isLocked(_ address: UnsafeMutableRawPointer) -> Bool {
        let page = UInt(bitPattern: address) & ~UInt(MappedRegion.pageSize - 1)
        guard let smaps = SmallFile.text("/proc/self/smaps") else { return false }
        var inMapping = false
        for line in smaps.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if let range = fields.first, range.contains("-"), !range.hasSuffix(":") {
                let bounds = range.split(separator: "-").compactMap { UInt($0, radix: 16) }
                inMapping = bounds.count == 2 && bounds[0] <= page && page < bounds[1]
            } else if inMapping, fields.first == "Locked:" {
                return fields.count > 1 && fields[1] != "0"
            }
        }
        return false
    }
}
