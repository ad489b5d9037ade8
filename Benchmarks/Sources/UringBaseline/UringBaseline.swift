// The baseline of the host benchmark: the same 4k random reads or writes as the loop
// target's path through `OfflineQueue`, but straight on a liburing ring, with nothing
// in between: what io_uring itself costs. Also the pieces both sides share (the
// scratch file, the random offsets), so the two differ only in the path under test.
import CBenchUring
import Glibc

public enum BenchOperation: Sendable {
    case read, write
}

/// xorshift64*: random block numbers without allocating or locking.
public struct RandomBlocks: Sendable {
    private var state: UInt64
    public let blocks: UInt64

    public init(blocks: UInt64, seed: UInt64 = 0x9E37_79B9_7F4A_7C15) {
        self.blocks = blocks
        state = seed | 1
    }

    @inline(__always)
    public mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return (state &* 0x2545_F491_4F6C_DD1D) % blocks
    }
}

public struct BenchFailure: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The scratch file both sides read and write: `size` bytes, every block written once
/// (so reads find data, not holes), in `$UBLK_BENCH_DIR` or `$TMPDIR` or /var/tmp.
/// Buffered reads of a disk file system's page cache complete inline in io_uring (no
/// worker thread), which makes them the most sensitive to userspace overhead; tmpfs
/// (/dev/shm) reads go through io_uring's worker threads on 6.x kernels, writes on
/// both do.
/// Removed when the process exits.
public final class ScratchFile: Sendable {
    public let path: String
    public let size: Int
    /// O_DIRECT on both sides (`UBLK_BENCH_DIRECT=1`); default buffered (page cache).
    public let direct: Bool

    public static let blockSize = 4096

    public static let shared: ScratchFile = {
        let mib = Int(getenv("UBLK_BENCH_FILE_MIB").map { String(cString: $0) } ?? "") ?? 256
        let direct = getenv("UBLK_BENCH_DIRECT").map { String(cString: $0) == "1" } ?? false
        do { return try ScratchFile(size: mib << 20, direct: direct) } catch { fatalError("\(error)") }
    }()

    init(size: Int, direct: Bool) throws {
        self.size = size
        self.direct = direct
        let env = { (name: String) in getenv(name).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } }
        let dir = env("UBLK_BENCH_DIR") ?? env("TMPDIR") ?? "/var/tmp"
        var template = Array("\(dir)/ublk-bench.XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw BenchFailure("mkstemp in \(dir): errno \(errno)") }
        path = String(cString: template)
        defer { close(fd) }
        let chunk = 1 << 20
        let data = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { data.deallocate() }
        var random = RandomBlocks(blocks: UInt64.max)
        let words = data.bindMemory(to: UInt64.self, capacity: chunk / 8)
        for i in 0..<(chunk / 8) { words[i] = random.next() }
        var offset = 0
        while offset < size {
            let n = pwrite(fd, data, chunk, off_t(offset))
            guard n == chunk else { throw BenchFailure("writing \(path): errno \(errno)") }
            offset += chunk
        }
        fsync(fd)
        Self.cleanupPath = path
        atexit { if let path = ScratchFile.cleanupPath { unlink(path) } }
    }

    // Set once, by `shared`'s initialiser (which Swift runs exactly once), before atexit can read it.
    nonisolated(unsafe) static var cleanupPath: String?

    /// O_DIRECT (Glibc hides it without _GNU_SOURCE); 0o40000 on x86_64, 0o200000 on arm64.
    #if arch(arm64)
    static let oDirect: Int32 = 0o200000
    #else
    static let oDirect: Int32 = 0o40000
    #endif

    /// Opens the file the way both sides do (O_RDWR, plus O_DIRECT when `direct`).
    public func open() throws -> Int32 {
        let fd = Glibc.open(path, O_RDWR | (direct ? Self.oDirect : 0))
        guard fd >= 0 else { throw BenchFailure("open \(path): errno \(errno)") }
        return fd
    }
}

/// A plain liburing loop: `depth` 4k requests in flight on a ring set up with the same
/// flags and size as ublk-swift's queue rings, the file registered as fixed file 0, one
/// `io_uring_submit_and_wait(1)` per loop turn. Each request is the ring work a ublk
/// server does per request, with the same stand-in for the ublk command as
/// `OfflineQueue`: a READ or WRITE linked to a NOP in place of COMMIT_AND_FETCH
/// (IOSQE_IO_LINK, the READ's completion skipped unless it fails, as the queue engine
/// links a commit behind a request's last operation); when the NOP completes, the tag
/// starts its next request. A short READ posts its completion and cancels the NOP
/// silently: it is counted as a failure and its NOP sent on its own.
/// Completions are reaped in batches (`io_uring_peek_batch_cqe`, one `io_uring_cq_advance`).
public final class PlainRingLoop {
    private let ring: UnsafeMutablePointer<io_uring>
    private let fd: Int32
    private let buffers: UnsafeMutableRawPointer
    public let depth: Int
    public let operation: BenchOperation
    // Touched only by `run`'s thread, never with overlapping accesses: no dynamic
    // exclusivity checks (a bare loop has none; OfflineLoopDriver's are unchecked too).
    @exclusivity(unchecked) private var random: RandomBlocks
    /// Requests that did not move 4096 bytes (should stay 0).
    @exclusivity(unchecked) public private(set) var failures = 0

    /// The flags of `IORing.singleThreadFlags` in the root package.
    static let flags: UInt32 = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_DEFER_TASKRUN
    /// Bit of `user_data` that marks a tag's NOP (its READ/WRITE carries just the tag).
    static let nopBit: UInt64 = 1 << 63

    public init(file: ScratchFile, depth: Int, operation: BenchOperation) throws {
        self.depth = depth
        self.operation = operation
        random = RandomBlocks(blocks: UInt64(file.size / ScratchFile.blockSize))
        ring = .allocate(capacity: 1)
        ring.initialize(to: io_uring())
        // Two SQEs per request, as the queue engine's rings (`Queue.ring`).
        var result = io_uring_queue_init(UInt32(2 * depth), ring, Self.flags)
        if result == -EINVAL { result = io_uring_queue_init(UInt32(2 * depth), ring, 0) }
        guard result == 0 else { throw BenchFailure("io_uring_queue_init: \(result)") }
        fd = try file.open()
        var files = [fd]
        result = io_uring_register_files(ring, &files, 1)
        guard result == 0 else { throw BenchFailure("io_uring_register_files: \(result)") }
        buffers = .allocate(byteCount: depth * ScratchFile.blockSize, alignment: 4096)
        buffers.initializeMemory(as: UInt8.self, repeating: 0xA5, count: depth * ScratchFile.blockSize)
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
        close(fd)
        buffers.deallocate()
    }

    @inline(__always)
    private func prepare(tag: Int) {
        guard let sqe = io_uring_get_sqe(ring) else { fatalError("SQ ring full at depth \(depth)") }
        let offset = random.next() &* UInt64(ScratchFile.blockSize)
        let op = operation == .read ? IORING_OP_READ : IORING_OP_WRITE
        io_uring_prep_rw(Int32(op.rawValue), sqe, 0, buffers + tag * ScratchFile.blockSize,
                         UInt32(ScratchFile.blockSize), offset)
        sqe.pointee.flags |= UInt8(1 << IOSQE_FIXED_FILE_BIT | 1 << IOSQE_IO_LINK_BIT | 1 << IOSQE_CQE_SKIP_SUCCESS_BIT)
        io_uring_sqe_set_data64(sqe, UInt64(tag))
        prepareNop(tag: tag)
    }

    @inline(__always)
    private func prepareNop(tag: Int) {
        guard let sqe = io_uring_get_sqe(ring) else { fatalError("SQ ring full at depth \(depth)") }
        io_uring_prep_nop(sqe)
        io_uring_sqe_set_data64(sqe, UInt64(tag) | Self.nopBit)
    }

    /// Performs `count` requests, `depth` at a time.
    public func run(count: Int) {
        var issued = 0
        var done = 0
        while issued < min(depth, count) {
            prepare(tag: issued)
            issued += 1
        }
        let batch = UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>.allocate(capacity: 32)
        defer { batch.deallocate() }
        while done < count {
            var result: Int32
            repeat { result = io_uring_submit_and_wait(ring, 1) } while result == -EINTR
            if result < 0 { fatalError("io_uring_submit_and_wait: \(result)") }
            while true {
                let ready = Int(io_uring_peek_batch_cqe(ring, batch, 32))
                for i in 0..<ready {
                    let cqe = batch[i].unsafelyUnwrapped
                    let (userData, res) = (cqe.pointee.user_data, cqe.pointee.res)
                    let tag = Int(truncatingIfNeeded: userData & ~Self.nopBit)
                    if userData & Self.nopBit == 0 {
                        failures += 1
                        prepareNop(tag: tag)
                        continue
                    }
                    done += 1
                    if issued < count {
                        prepare(tag: tag)
                        issued += 1
                    }
                }
                io_uring_cq_advance(ring, UInt32(ready))
                if ready < 32 { break }
            }
        }
    }
}
