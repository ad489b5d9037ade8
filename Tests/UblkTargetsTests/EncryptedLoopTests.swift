import FoundationEssentials
import Glibc
import Testing
import UblkCrypto
@testable import UblkQueue
import UblkSystem
import UblkTesting
@testable import UblkTargets

/// The loop target with encryption, driven through io_uring on the host: what reaches the
/// backing file is dm-crypt plain aes-xts-plain64's ciphertext of the right sectors.
@Suite struct EncryptedLoopTests {
    typealias ScratchFile = LoopTargetTests.ScratchFile

    /// IEEE 1619 / Linux testmgr "XTS-AES 10": a 512-bit key, sector 255, plaintext 00..ff twice.
    static let key10 = bytes("2718281828459045235360287471352662497757247093699959574966967627"
        + "3141592653589793238462643383279502884197169399375105820974944592")
    static let ciphertext10Start = bytes("1c3b3a102f770386e4836c99e370cf9b")
    static let ciphertext10End = bytes("c4f36ffda9fcea70b9c6e693e148c151")

    static func bytes(_ hex: String) -> [UInt8] {
        let digits = Array(hex.utf8)
        return stride(from: 0, to: digits.count, by: 2).map {
            UInt8(String(decoding: digits[$0..<$0 + 2], as: UTF8.self), radix: 16)!
        }
    }

    /// A key file with `bytes` (random 64 by default), removed when the test ends.
    final class KeyFile {
        let path: String
        let bytes: [UInt8]
        init(_ bytes: [UInt8]? = nil) throws {
            self.bytes = bytes ?? (0..<64).map { _ in UInt8.random(in: 0...255) }
            var template = Array("\(FileManagerless.tmp)/ublk-key-XXXXXX".utf8CString)
            let fd = mkstemp(&template)
            path = String(cString: template)
            _ = self.bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        deinit { unlink(path) }

        func key(bits: Int = 512) throws -> EncryptionKey {
            EncryptionKey(try XTSKey(file: path, size: XTSKeySize(bits: bits)))
        }

        /// What dm-crypt would write for `plaintext` at IV sector `sector`, from an independent cipher.
        func reference(_ plaintext: [UInt8], sector: UInt64, unit: Int = 512, bits: Int = 512) throws -> [UInt8] {
            let key = try XTSKey(file: path, size: XTSKeySize(bits: bits))
            var cipher = try XTSCipher(key: key, unitSize: unit)
            // A buffer of our own rather than a closure over the array (typed throws through
            // withUnsafeMutableBytes crashes Swift 6.3.1's IRGen).
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: plaintext.count, alignment: 16)
            defer { buffer.deallocate() }
            buffer.copyBytes(from: plaintext)
            try cipher.encrypt(buffer.baseAddress!, into: buffer.baseAddress!, count: buffer.count, sector: sector)
            return Array(buffer)
        }
    }

    func encrypted(_ file: ScratchFile, _ key: KeyFile, bits: Int = 512,
                   configure: (inout LoopConfiguration) -> Void = { _ in }) throws -> LoopTarget {
        var configuration = LoopConfiguration(path: file.path)
        var settings = EncryptionConfiguration()
        settings.keySize = bits
        configuration.encryption = settings
        configure(&configuration)
        return try LoopTarget(configuration, key: try key.key(bits: bits))
    }

    static func pattern(_ count: Int, seed: Int = 7) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 * seed + $0 >> 9) }
    }

    func put(_ bytes: [UInt8], in queue: OfflineQueue<LoopTarget>, tag: Int) {
        bytes.withUnsafeBytes { queue.buffer(tag: tag).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    }

    func contents(of queue: OfflineQueue<LoopTarget>, tag: Int, count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: queue.buffer(tag: tag), count: count))
    }

    @Test func aSectorIsTheKnownAnswerOfDmCrypt() throws {
        let file = try ScratchFile(size: 1 << 20)
        let key = try KeyFile(Self.key10)
        let queue = try OfflineQueue(target: try encrypted(file, key), depth: 2, bufferSize: 64 * 1024)
        let plaintext = (0..<512).map { UInt8(truncatingIfNeeded: $0) }
        put(plaintext, in: queue, tag: 0)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 255, sectorCount: 1)) == 512)
        let onDisk = file.bytes(at: 255 * 512, count: 512)
        #expect(Array(onDisk.prefix(16)) == Self.ciphertext10Start)
        #expect(Array(onDisk.suffix(16)) == Self.ciphertext10End)
        // The tag's buffer still holds the plaintext: the kernel's pages are not scrambled.
        #expect(contents(of: queue, tag: 0, count: 512) == plaintext)
        memset(queue.buffer(tag: 1), 0, 512)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 255, sectorCount: 1), tag: 1) == 512)
        #expect(contents(of: queue, tag: 1, count: 512) == plaintext)
    }

    @Test(arguments: [(512, 512), (4096, 512), (512, 256), (4096, 256)])
    func writesAreCiphertextOfTheirSectorsAndReadBack(unit: Int, bits: Int) throws {
        let file = try ScratchFile(size: 4 << 20)
        let key = try KeyFile(bits == 512 ? nil : (0..<32).map { UInt8($0 * 3 + 1) })
        let target = try encrypted(file, key, bits: bits) { $0.logicalBlockSize = unit }
        #expect(target.properties.logicalBlockSize == unit)
        #expect(target.name == "loop+crypt")
        let queue = try OfflineQueue(target: target, depth: 4, bufferSize: 512 * 1024)
        // Longer than a bounce buffer: the write goes out in chunks.
        let count = 2 * QueueEncryption.defaultChunk + 3 * 4096
        let plaintext = Self.pattern(count)
        put(plaintext, in: queue, tag: 2)
        let start: UInt64 = 64 // 32 KiB in: a multiple of both units
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: start, sectorCount: UInt32(count / 512)),
                                  tag: 2) == Int32(count))
        let onDisk = file.bytes(at: Int(start) * 512, count: count)
        #expect(onDisk == (try key.reference(plaintext, sector: start, unit: unit, bits: bits)))
        #expect(!onDisk.elementsEqual(plaintext))
        #expect(file.bytes(at: Int(start) * 512 - 1, count: 1) == [0xA5])
        memset(queue.buffer(tag: 3), 0, count)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: start, sectorCount: UInt32(count / 512)),
                                  tag: 3) == Int32(count))
        #expect(contents(of: queue, tag: 3, count: count) == plaintext)
    }

    @Test func offsetMovesTheDataAndSkipOnlyTheIV() throws {
        let file = try ScratchFile(size: 1 << 20)
        let key = try KeyFile()
        let target = try encrypted(file, key) { $0.offset = 64 * 1024; $0.encryption?.skip = 24 }
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        let plaintext = Self.pattern(8192, seed: 13)
        put(plaintext, in: queue, tag: 0)
        #expect(try queue.perform(IODescriptor(operation: .write, flags: .fua, startSector: 8, sectorCount: 16)) == 8192)
        // Data at offset + 8 sectors; IV = 8 + skip (cryptsetup --offset 128 --skip 24).
        #expect(file.bytes(at: 64 * 1024 + 8 * 512, count: 8192) == (try key.reference(plaintext, sector: 8 + 24)))
        #expect(file.bytes(at: 64 * 1024 - 1, count: 1) == [0xA5])
        #expect(try queue.perform(IODescriptor(operation: .flush, startSector: 0, sectorCount: 0)) == 0)
        memset(queue.buffer(tag: 1), 0, 8192)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 8, sectorCount: 16), tag: 1) == 8192)
        #expect(contents(of: queue, tag: 1, count: 8192) == plaintext)
    }

    /// A backing that shrank under the device: a read that meets its end fails whole with
    /// EIO (the first read returns 4 KiB, the next 0), as the kernel loop driver fails a
    /// read past the end, rather than deciphering zeros into noise.
    @Test func aReadPastTheEndOfAShrunkBackingFails() throws {
        let file = try ScratchFile(size: 64 * 1024)
        let key = try KeyFile()
        let queue = try OfflineQueue(target: try encrypted(file, key) { $0.directIO = .off }, depth: 2,
                                     bufferSize: 64 * 1024)
        let plaintext = Self.pattern(8192)
        put(plaintext, in: queue, tag: 0)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 112, sectorCount: 16)) == 8192)
        #expect(truncate(file.path, 60 * 1024) == 0)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 112, sectorCount: 16), tag: 1) == -EIO)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 112, sectorCount: 8), tag: 1) == 4096)
        #expect(contents(of: queue, tag: 1, count: 4096) == Array(plaintext.prefix(4096)))
    }

    @Test func aShortWriteResumesFromTheCiphertextAlreadyMade() throws {
        let key = try KeyFile()
        var settings = EncryptionConfiguration()
        settings.cipherThreads = 0
        let encryption = try QueueEncryption(key: try key.key(), configuration: settings, sectorSize: 512,
                                             depth: 2, chunk: 8192)
        let ring = try IORing(entries: 4)
        let io = BackingSubmitter(ring: ring.handle, tag: 1)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 12288, alignment: 4096)
        defer { buffer.deallocate() }
        let plaintext = Self.pattern(12288)
        plaintext.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: 12288) }
        let request = IORequest(tag: 1, descriptor: IODescriptor(operation: .write, startSector: 4, sectorCount: 24),
                                buffer: buffer)
        let reference = try key.reference(plaintext, sector: 4)
        #expect(try encryption.encrypt(request, from: 0, io) == .done)
        let first = encryption.ciphertext(request, from: 0)
        #expect(first.1 == 8192)
        #expect(Array(UnsafeRawBufferPointer(start: first.0, count: 8192)) == Array(reference.prefix(8192)))
        // The backing took 1000 bytes: the rest of the chunk's ciphertext goes next, unchanged.
        let rest = encryption.ciphertext(request, from: 1000)
        #expect(rest.0 == first.0 + 1000)
        #expect(rest.1 == 8192 - 1000)
        // At the chunk's end the next chunk is encrypted into the same bounce buffer.
        #expect(try encryption.encrypt(request, from: 8192, io) == .done)
        let second = encryption.ciphertext(request, from: 8192)
        #expect(second.1 == 4096)
        #expect(Array(UnsafeRawBufferPointer(start: second.0, count: 4096)) == Array(reference.suffix(4096)))
    }

    /// cryptsetup refuses a device that is not whole sectors: the user is told how to open
    /// the image (a plain device leaves the tail unused, as the loop driver does, and says so).
    @Test func aTailThatIsNoWholeSectorIsNamed() throws {
        let file = try ScratchFile(size: (1 << 20) + 512)
        let target = try encrypted(file, try KeyFile()) { $0.logicalBlockSize = 4096 }
        #expect(target.properties.size == 1 << 20 && target.unusedTail == 512)
        #expect(target.note?.hasSuffix("the last 512 bytes of \(file.path) are not a whole 4096-byte sector and stay unused; cryptsetup opens the image through losetup --sizelimit 1048576") == true)
        #expect(try encrypted(file, try KeyFile()).note == nil)
        var plain = LoopConfiguration(path: file.path)
        plain.logicalBlockSize = 4096
        plain.directIO = .off
        #expect(try LoopTarget(plain).note == "the last 512 bytes of \(file.path) are not a whole 4096-byte block and stay unused")
    }

    /// As dm-crypt without --allow-discards: holes in the backing would show which blocks
    /// are unused, so discard is offered only when asked for.
    @Test func discardOnlyWhenAllowed() throws {
        let file = try ScratchFile(size: 1 << 20)
        let target = try encrypted(file, try KeyFile())
        #expect(!target.properties.supportsDiscard)
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        #expect(try queue.perform(IODescriptor(operation: .discard, startSector: 0, sectorCount: 8)) == -EOPNOTSUPP)
        #expect(file.bytes(at: 0, count: 4096).allSatisfy { $0 == 0xA5 })
        let allowed = try encrypted(file, try KeyFile()) { $0.encryption?.allowDiscards = true }
        #expect(allowed.properties.supportsDiscard)
        let allowedQueue = try OfflineQueue(target: allowed, depth: 2, bufferSize: 64 * 1024)
        #expect(try allowedQueue.perform(IODescriptor(operation: .discard, startSector: 0, sectorCount: 8)) == 0)
        #expect(file.bytes(at: 0, count: 4096).allSatisfy { $0 == 0 })
    }

    @Test func writeZeroesIsNotAdvertisedNorDone() throws {
        let file = try ScratchFile(size: 1 << 20)
        let target = try encrypted(file, try KeyFile())
        #expect(!target.properties.supportsWriteZeroes)
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 64 * 1024)
        #expect(try queue.perform(IODescriptor(operation: .writeZeroes, startSector: 0, sectorCount: 8)) == -EOPNOTSUPP)
        #expect(file.bytes(at: 0, count: 4096).allSatisfy { $0 == 0xA5 })
    }

    @Test func badSettingsAreRefused() throws {
        let file = try ScratchFile(size: 1 << 20)
        let key = try KeyFile()
        var configuration = LoopConfiguration(path: file.path)
        configuration.encryption = EncryptionConfiguration()
        #expect(throws: TargetError.keyMissing) { try LoopTarget(configuration) }
        configuration.logicalBlockSize = 1024
        #expect(throws: TargetError.encryptionBlockSize(1024)) { try LoopTarget(configuration, key: try key.key()) }
        configuration.logicalBlockSize = nil
        configuration.encryption?.keySize = 256
        #expect(throws: TargetError.keySizeMismatch(key: 512, configured: 256)) {
            try LoopTarget(configuration, key: try key.key())
        }
        #expect(throws: TargetError.keyWithoutEncryption) {
            try LoopTarget(LoopConfiguration(path: file.path), key: try key.key())
        }
    }

    /// dm-crypt refuses an IV offset that is not a whole number of 4096-byte sectors: such an
    /// image would open nowhere else.
    @Test func aSkipMustBeWholeSectors() throws {
        let file = try ScratchFile(size: 1 << 20)
        let key = try KeyFile()
        #expect(throws: TargetError.skipMisaligned(skip: 3, blockSize: 4096)) {
            try encrypted(file, key) { $0.logicalBlockSize = 4096; $0.encryption?.skip = 3 }
        }
        #expect(try encrypted(file, key) { $0.logicalBlockSize = 4096; $0.encryption?.skip = 16 }.properties.size == 1 << 20)
        #expect(try encrypted(file, key) { $0.encryption?.skip = 3 }.properties.size == 1 << 20)
    }

    @Test func theSpecCarriesTheSettingsButNeverTheKey() throws {
        let file = try ScratchFile(size: 1 << 20)
        let key = try KeyFile()
        let target = try encrypted(file, key) { $0.encryption?.skip = 5 }
        let json = String(decoding: try JSONEncoder().encode(target.spec), as: UTF8.self)
        #expect(json.contains("aes-xts-plain64") && json.contains("\"skip\":5") && json.contains("\"keySize\":512"))
        let hex = key.bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        #expect(!json.lowercased().contains(hex))
        #expect(!json.contains(key.path))
        #expect(target.spec.displayName == "loop+crypt")
        #expect(try JSONDecoder().decode(TargetSpec.self, from: Data(json.utf8)) == target.spec)
    }
}
