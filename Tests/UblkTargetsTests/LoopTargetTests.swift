import FoundationEssentials
import Glibc
import Testing
import UblkQueue
import UblkSystem
import UblkTesting
@testable import UblkTargets

/// The loop target's forwarding, driven through io_uring on the host (no ublk driver needed).
@Suite struct LoopTargetTests {
    /// A scratch file of `size` bytes filled with `fill`, removed when the test ends.
    final class ScratchFile {
        let path: String
        init(size: Int, fill: UInt8 = 0xA5, directory: String = FileManagerless.tmp) throws {
            var template = Array("\(directory)/ublk-test-XXXXXX".utf8CString)
            let fd = mkstemp(&template)
            path = String(cString: template)
            let chunk = [UInt8](repeating: fill, count: 64 * 1024)
            var written = 0
            while written < size {
                written += chunk.withUnsafeBytes { pwrite(fd, $0.baseAddress, min(chunk.count, size - written), off_t(written)) }
            }
            close(fd)
        }
        deinit { unlink(path) }

        func bytes(at offset: Int, count: Int) -> [UInt8] {
            let fd = open(path, O_RDONLY)
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: count)
            _ = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
            return buffer
        }

        var allocated: Int {
            var st = stat()
            stat(path, &st)
            return Int(st.st_blocks) * 512
        }
    }

    func loop(_ file: ScratchFile, configure: (inout LoopConfiguration) -> Void = { _ in }) throws -> LoopTarget {
        var configuration = LoopConfiguration(path: file.path)
        configure(&configuration)
        return try LoopTarget(configuration)
    }

    /// A disk image counts 512-byte sectors: a file gets 512-byte blocks unless direct I/O
    /// is required (then the backing's, which it needs); a block device gets its own.
    @Test func theDefaultBlockSizeKeepsAnImagesSectors() {
        func size(_ mode: DirectIOMode, device: Bool = false, backing: Int = 4096, encrypted: Bool = false) -> Int {
            var configuration = LoopConfiguration(path: "/x")
            configuration.directIO = mode
            if encrypted { configuration.encryption = EncryptionConfiguration() }
            return LoopTarget.defaultBlockSize(configuration, isBlockDevice: device, backingLogical: backing)
        }
        #expect(size(.auto) == 512 && size(.off) == 512)
        #expect(size(.on) == 4096 && size(.on, backing: 512) == 512 && size(.on, backing: 65536) == 4096)
        #expect(size(.auto, device: true) == 4096 && size(.off, device: true) == 4096)
        #expect(size(.on, encrypted: true) == 512)
    }

    @Test func writeThenReadForwardsToTheFile() throws {
        let file = try ScratchFile(size: 1 << 20)
        let queue = try OfflineQueue(target: try loop(file), depth: 4, bufferSize: 64 * 1024)
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 * 7) }
        pattern.withUnsafeBytes { queue.buffer(tag: 1).copyMemory(from: $0.baseAddress!, byteCount: 8192) }
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 16, sectorCount: 16), tag: 1) == 8192)
        #expect(file.bytes(at: 16 * 512, count: 8192) == pattern)
        #expect(file.bytes(at: 16 * 512 - 1, count: 1) == [0xA5])

        memset(queue.buffer(tag: 2), 0, 8192)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 16, sectorCount: 16), tag: 2) == 8192)
        #expect(Array(UnsafeRawBufferPointer(start: queue.buffer(tag: 2), count: 8192)) == pattern)
        #expect(try queue.perform(IODescriptor(operation: .flush, startSector: 0, sectorCount: 0)) == 0)
        #expect(try queue.perform(IODescriptor(operation: .write, flags: .fua, startSector: 0, sectorCount: 8), tag: 1) == 4096)
    }

    @Test func manyRequestsInFlight() throws {
        let file = try ScratchFile(size: 4 << 20)
        let depth = 32
        let queue = try OfflineQueue(target: try loop(file), depth: depth, bufferSize: 4096)
        for tag in 0..<depth { memset(queue.buffer(tag: tag), Int32(tag + 1), 4096) }
        var results = [Int32](repeating: 0, count: depth)
        for tag in 0..<depth {
            try queue.start(tag: tag, IODescriptor(operation: .write, startSector: UInt64(tag * 8), sectorCount: 8))
        }
        while queue.inFlight > 0 { try queue.reap { results[$0] = $1 } }
        #expect(results.allSatisfy { $0 == 4096 })
        for tag in 0..<depth { #expect(file.bytes(at: tag * 4096, count: 4096).allSatisfy { $0 == UInt8(tag + 1) }) }
    }

    @Test func windowLeavesTheRestUntouched() throws {
        let file = try ScratchFile(size: 1 << 20)
        let target = try loop(file) { $0.offset = 64 * 1024; $0.size = 128 * 1024 }
        #expect(target.properties.size == 128 * 1024)
        let queue = try OfflineQueue(target: target, depth: 2, bufferSize: 128 * 1024)
        memset(queue.buffer(tag: 0), 0x11, 128 * 1024)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 256)) == 128 * 1024)
        #expect(file.bytes(at: 64 * 1024, count: 128 * 1024).allSatisfy { $0 == 0x11 })
        #expect(file.bytes(at: 0, count: 64 * 1024).allSatisfy { $0 == 0xA5 })
        #expect(file.bytes(at: 192 * 1024, count: 64 * 1024).allSatisfy { $0 == 0xA5 })
        // One sector past the window is refused before it reaches the file.
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 256, sectorCount: 1)) == -EIO)
        #expect(file.bytes(at: 192 * 1024, count: 512).allSatisfy { $0 == 0xA5 })
    }

    /// As losetup: any offset (the backing is read and written there, buffered), and a
    /// limit that is not whole blocks rounded down, said in the note.
    @Test func anOddOffsetAndLimitAreTakenAsLosetupTakesThem() throws {
        let file = try ScratchFile(size: 64 * 1024)
        let target = try loop(file) { $0.offset = 1000; $0.size = 9000; $0.directIO = .auto }
        #expect(target.properties.size == 8704)
        #expect(!target.directIO)
        #expect(target.note?.hasSuffix("--size 9000 is not a whole number of 512-byte blocks: the device has 8704 bytes") == true)
        #expect(target.note?.contains("the block size is 512 and the offset 1000: using buffered I/O") == true)
        #expect(target.note?.contains("--block-size") == false)
        let queue = try OfflineQueue(target: target, depth: 1, bufferSize: 8192)
        memset(queue.buffer(tag: 0), 0x22, 1024)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 1, sectorCount: 2)) == 1024)
        #expect(file.bytes(at: 1000, count: 512).allSatisfy { $0 == 0xA5 })
        #expect(file.bytes(at: 1512, count: 1024).allSatisfy { $0 == 0x22 })
        #expect(file.bytes(at: 2536, count: 512).allSatisfy { $0 == 0xA5 })
        memset(queue.buffer(tag: 0), 0, 2048)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 4)) == 2048)
        let read = UnsafeRawBufferPointer(start: queue.buffer(tag: 0), count: 2048)
        #expect(read[..<512].allSatisfy { $0 == 0xA5 } && read[512..<1536].allSatisfy { $0 == 0x22 } && read[1536...].allSatisfy { $0 == 0xA5 })
        // With --direct-io on, such an offset is refused; encrypted, offsets are whole sectors.
        #expect(throws: TargetError.directIOUnavailable(.misaligned(backingBlock: 512, blockSize: 512, offset: 1000))) {
            _ = try loop(file) { $0.offset = 1000; $0.directIO = .on; $0.logicalBlockSize = 512 }
        }
    }

    /// tmpfs punches holes but cannot zero a range in place: it gets discard and no
    /// write-zeroes (each would fail, logged as an I/O error, before the kernel wrote zeros);
    /// ext4 gets both. The file is left as it was.
    @Test func writeZeroesIsOfferedWhereTheFileZeroesInPlace() throws {
        let shm = try ScratchFile(size: 64 * 1024, directory: "/dev/shm")
        let onTmpfs = try loop(shm).properties
        #expect(onTmpfs.supportsDiscard && !onTmpfs.supportsWriteZeroes)
        let file = try ScratchFile(size: 64 * 1024)
        let before = file.allocated
        let onDisk = try loop(file).properties
        #expect(onDisk.supportsDiscard && onDisk.supportsWriteZeroes)
        #expect(file.allocated == before)
    }

    @Test func discardPunchesAndWriteZeroesZeroes() throws {
        let file = try ScratchFile(size: 1 << 20)
        let target = try loop(file)
        try #require(target.properties.supportsDiscard, "the host's /tmp cannot punch holes")
        let queue = try OfflineQueue(target: target, depth: 2)
        let before = file.allocated
        #expect(try queue.perform(IODescriptor(operation: .discard, startSector: 0, sectorCount: 1024)) == 0)
        #expect(file.allocated <= before - 512 * 1024)
        #expect(file.bytes(at: 0, count: 512 * 1024).allSatisfy { $0 == 0 })
        #expect(try queue.perform(IODescriptor(operation: .writeZeroes, flags: .noUnmap, startSector: 1024, sectorCount: 8)) == 0)
        #expect(file.bytes(at: 512 * 1024, count: 4096).allSatisfy { $0 == 0 })
        #expect(file.bytes(at: 512 * 1024 + 4096, count: 1) == [0xA5])
    }

    /// A failed fallocate (or fsync) reaches the request: io_uring does not break a link
    /// behind one, so its commit must not be linked (it was, and committed 0). tmpfs
    /// punches holes but cannot zero a range in place (ZERO_RANGE: EOPNOTSUPP); such a
    /// write-zeroes is not offered there, but a forged one gets what the file said.
    @Test func aFailedFallocateFailsTheRequest() throws {
        let file = try ScratchFile(size: 1 << 20, directory: "/dev/shm")
        let target = try loop(file)
        try #require(target.properties.supportsDiscard, "/dev/shm cannot punch holes here")
        let queue = try OfflineQueue(target: target, depth: 2)
        #expect(try queue.perform(IODescriptor(operation: .writeZeroes, flags: .noUnmap, startSector: 8, sectorCount: 8))
            == -EOPNOTSUPP)
        #expect(file.bytes(at: 4096, count: 4096).allSatisfy { $0 == 0xA5 }) // left as it was, not punched
        #expect(try queue.perform(IODescriptor(operation: .writeZeroes, startSector: 8, sectorCount: 8)) == 0)
        #expect(file.bytes(at: 4096, count: 4096).allSatisfy { $0 == 0 })
        #expect(try queue.perform(IODescriptor(operation: .flush, startSector: 0, sectorCount: 0)) == 0)
    }

    /// With direct I/O required, the default block size is at least what the file's direct
    /// I/O needs (statx), so O_DIRECT requests are never smaller than the backing takes.
    @Test func blockSizeCoversTheDirectIOAlignment() throws {
        let file = try ScratchFile(size: 1 << 20)
        let alignment = FileDescriptor.directIOAlignment(path: file.path)
        let target = try loop(file) { $0.directIO = .on }
        if let alignment, alignment > 0 { #expect(target.properties.logicalBlockSize >= alignment) }
        #expect(FileDescriptor.directIOAlignment(path: "/nonexistent/file") == nil)
    }

    @Test func readOnlyRefusesWrites() throws {
        let file = try ScratchFile(size: 64 * 1024)
        let queue = try OfflineQueue(target: try loop(file) { $0.readOnly = true }, depth: 1)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 8)) == -EROFS)
        #expect(try queue.perform(IODescriptor(operation: .discard, startSector: 0, sectorCount: 8)) == -EROFS)
        #expect(file.bytes(at: 0, count: 4096).allSatisfy { $0 == 0xA5 })
    }

    @Test func badBackingsAreRefusedWithAHint() throws {
        func message(_ configure: (inout LoopConfiguration) -> Void) -> String {
            var configuration = LoopConfiguration(path: "/nonexistent/disk.img")
            configure(&configuration)
            do { _ = try LoopTarget(configuration); return "accepted" } catch { return error.description }
        }
        #expect(message { _ in }.contains("does not exist: create it first (e.g. truncate -s 1G /nonexistent/disk.img)"))
        // The hint is a command to paste: a path with spaces or quotes is one word of it.
        #expect(message { $0.path = "/nonexistent/my disk's.img" }.hasSuffix("truncate -s 1G '/nonexistent/my disk'\\''s.img')"))
        #expect(message { $0.path = "/tmp" }.contains("is a directory"))
        let empty = try ScratchFile(size: 0)
        #expect(message { $0.path = empty.path }.contains("is empty"))
        let small = try ScratchFile(size: 64 * 1024)
        #expect(message { $0.path = small.path; $0.offset = 128 * 1024 }.contains("beyond the end"))
        #expect(message { $0.path = small.path; $0.size = 100 } == "--size 100 is less than one 512-byte block: give at least 512")
        // Less than a block after the offset: the offset is named, not the file's size.
        #expect(message { $0.path = small.path; $0.offset = 64 * 1024 - 100; $0.directIO = .off }
                == "backing file \(small.path) holds 100 bytes after --offset 65436, less than one 512-byte block: give a smaller offset")
        let tiny = try ScratchFile(size: 100)
        #expect(message { $0.path = tiny.path; $0.directIO = .off } == "backing file \(tiny.path) is smaller than one 512-byte block")
        // A size is a limit, as losetup's --sizelimit: beyond the end, the device ends with the
        // backing (and says so); 0 is none.
        for limit: UInt64 in [128 * 1024, 0] {
            var configuration = LoopConfiguration(path: small.path)
            (configuration.size, configuration.directIO) = (limit, .off)
            let target = try LoopTarget(configuration)
            #expect(target.properties.size == 64 * 1024)
            #expect(target.note == (limit == 0 ? nil : "--size 131072 is more than \(small.path) holds after the offset: the device has 65536 bytes, and ublk resize grows it up to the limit as the file grows"))
        }
        // Not whole blocks: the tail is left out, and said, as losetup warns of it.
        let odd = try ScratchFile(size: 1_000_000)
        // Buffered: a scratch directory that refuses O_DIRECT would add its own note.
        var configuration = LoopConfiguration(path: odd.path)
        configuration.directIO = .off
        let target = try LoopTarget(configuration)
        #expect(target.properties.size == 999_936)
        #expect(target.note == "the last 64 bytes of \(odd.path) are not a whole 512-byte block and stay unused")
        // A limit beyond the end: to the end too, and its tail said as well.
        configuration.size = 2 << 20
        #expect(try LoopTarget(configuration).note?.hasPrefix("the last 64 bytes of \(odd.path) are not a whole 512-byte block") == true)
        (configuration.path, configuration.size) = (small.path, nil)
        #expect(try LoopTarget(configuration).note == nil)
        #expect(message { $0.path = "-disk.img" }.hasSuffix("truncate -s 1G ./-disk.img)"))
    }

    @Test func nullTargetReadsZerosAfterWrites() throws {
        let queue = try OfflineQueue(target: NullTarget(size: 1 << 20), depth: 1, bufferSize: 8192)
        memset(queue.buffer(tag: 0), 0x5A, 8192)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 16)) == 8192)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 16)) == 8192)
        #expect(UnsafeRawBufferPointer(start: queue.buffer(tag: 0), count: 8192).allSatisfy { $0 == 0 })
    }

    @Test func readOnlyNullTargetRefusesWrites() throws {
        var configuration = NullConfiguration(size: 1 << 20)
        configuration.readOnly = true
        let target = NullTarget(configuration)
        #expect(target.properties.readOnly && !target.properties.supportsDiscard)
        let queue = try OfflineQueue(target: target, depth: 1, bufferSize: 8192)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 16)) == -EROFS)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 0, sectorCount: 16)) == 8192)
        // A record from before the field existed reads as writable.
        let old = try JSONDecoder().decode(NullConfiguration.self, from: Data(#"{"size":4096,"logicalBlockSize":512}"#.utf8))
        #expect(!old.readOnly && old.size == 4096)
    }
}

enum FileManagerless {
    static var tmp: String { getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp" }
}

/// `ublk resize`: the size a loop target can take from its backing now.
@Suite struct LoopResizeTests {
    @Test func takesTheBackingsNewSizeWithinItsWindow() throws {
        let file = try LoopTargetTests.ScratchFile(size: 1 << 20)
        var configuration = LoopConfiguration(path: file.path)
        configuration.offset = 64 << 10
        configuration.logicalBlockSize = 4096
        let target = try LoopTarget(configuration)
        #expect(try target.resizedSize(nil, limit: nil).size == (1 << 20) - (64 << 10))
        #expect(truncate(file.path, (2 << 20) + 1000) == 0)
        #expect(try target.resizedSize(nil, limit: nil).size == (2 << 20) - (64 << 10)) // the odd tail is not a block
        #expect(try target.resizedSize(1 << 20, limit: nil).size == 1 << 20)
        #expect(throws: TargetError.self) { try target.resizedSize(3 << 20, limit: nil) }
        #expect(throws: TargetError.self) { try target.resizedSize(1000, limit: nil) }
        #expect(truncate(file.path, 4096) == 0)
        #expect(throws: TargetError.self) { try target.resizedSize(nil, limit: nil) }
    }

    @Test func staysWithinItsSizeLimit() throws {
        let file = try LoopTargetTests.ScratchFile(size: 1 << 20)
        var configuration = LoopConfiguration(path: file.path)
        configuration.offset = 64 << 10
        configuration.size = 512 << 10
        let target = try LoopTarget(configuration)
        #expect(target.spec.window.sizeLimit == 512 << 10)
        #expect(truncate(file.path, 4 << 20) == 0)
        // As losetup -c with --sizelimit: the backing grew, the window did not.
        #expect(try target.resizedSize(nil, limit: 512 << 10).size == 512 << 10)
        #expect(try target.resizedSize(nil, limit: 2 << 20).size == 2 << 20)
        #expect(truncate(file.path, (64 << 10) + (256 << 10)) == 0)
        #expect(try target.resizedSize(nil, limit: 512 << 10).size == 256 << 10)
        // 0 lifts the limit: all the backing holds after the offset.
        #expect(truncate(file.path, 4 << 20) == 0)
        #expect(try target.resizedSize(0, limit: 512 << 10) == ((4 << 20) - (64 << 10), nil))
        // The limit stays, or is the size asked for.
        #expect(try target.resizedSize(nil, limit: 512 << 10).limit == 512 << 10)
        #expect(try target.resizedSize(1 << 20, limit: 512 << 10) == (1 << 20, 1 << 20))
    }

    @Test func nullTargetNeedsASize() throws {
        let target = NullTarget(size: 1 << 20)
        #expect(try target.resizedSize(2 << 20, limit: nil).size == 2 << 20)
        #expect(throws: TargetError.self) { try target.resizedSize(nil, limit: nil) }
        #expect(throws: TargetError.sizeMisaligned(size: 0, blockSize: 512)) { try target.resizedSize(0, limit: nil) }
    }
}
