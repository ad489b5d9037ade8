import CUblk
import Glibc
import UblkCrypto
import UblkQueue
import UblkSystem

/// Whether the backing file is opened with O_DIRECT.
public enum DirectIOMode: String, Sendable, Codable, CaseIterable {
    /// O_DIRECT; fail if the backing cannot do it.
    case on
    /// Buffered I/O through the page cache.
    case off
    /// O_DIRECT when the backing allows it and the block size fits, else buffered (said once).
    case auto
}

/// How a loop target maps a backing file (losetup's options).
public struct LoopConfiguration: Sendable, Equatable, Codable {
    public var path: String
    public var directIO: DirectIOMode = .auto
    public var readOnly = false
    /// A writable device or none (`--no-read-only`): a backing that cannot be written is
    /// refused rather than served read-only (as losetup serves it when nothing is said).
    public var writableRequired: Bool?
    /// Start of the window in the backing, in bytes (losetup --offset).
    public var offset: UInt64 = 0
    /// Size limit of the window in bytes (losetup --sizelimit): the window ends there or at
    /// the backing's end, whichever comes first; nil: at the backing's end. 0 reads as nil
    /// (losetup's --sizelimit 0 is none), however it came, set or decoded from a record, so
    /// every reader sees one kind of "no limit".
    public var size: UInt64? {
        get { storedSize == 0 ? nil : storedSize }
        set { storedSize = newValue }
    }
    private var storedSize: UInt64?
    /// Logical block size of the device; nil: `LoopTarget.defaultBlockSize` (512 for a file,
    /// a block device's own). Encrypted: also the encryption sector, 512 or 4096.
    public var logicalBlockSize: Int?
    /// Encrypt the backing as dm-crypt plain mode does; nil: plain.
    public var encryption: EncryptionConfiguration?

    public init(path: String) { self.path = path }

    enum CodingKeys: String, CodingKey {
        case path, directIO, readOnly, writableRequired, offset, storedSize = "size", logicalBlockSize, encryption
    }
}

/// A block device backed by a regular file or another block device: the kernel loop
/// driver's job. Reads and writes become io_uring reads and writes at the same offset
/// (plus the window's start), FLUSH becomes fsync, DISCARD punches a hole and
/// WRITE_ZEROES zeroes (or punches) the range; FUA writes are RWF_DSYNC.
///
/// With `encryption` (and its key) the same target encrypts: the backing handling and the
/// request state machine are this one, the handler only encrypts writes into a bounce
/// buffer and decrypts reads in place (`QueueEncryption`). WRITE_ZEROES is then not
/// advertised (zeroing the backing would not read back as zeros).
public final class LoopTarget: SpecifiedTarget {
    public var name: String { spec.displayName }
    public let configuration: LoopConfiguration
    public let properties: TargetProperties
    /// The backing is opened with O_DIRECT.
    public let directIO: Bool
    /// Set when `auto` fell back to buffered I/O: why.
    public let directIOFallback: DirectIOFallback?
    /// Set when the backing could not be opened for writing and the device is read-only
    /// for it (as losetup makes it): why.
    public let readOnlyFallback: SystemError?
    /// Bytes at the end of the backing left out of the device, not being a whole block
    /// (without a size limit; 0 if none).
    public let unusedTail: UInt64
    /// Bytes of the backing after the offset, when it was opened.
    let available: UInt64
    let file: FileDescriptor
    /// The encryption key when `configuration.encryption` is set, else nil.
    private let key: EncryptionKey?
    /// The backing is a regular file that is written: its times are stamped by the queues
    /// (`ModificationStamp`). A block device's are not the file system's to update.
    private let stampsWrites: Bool

    public var fixedFiles: [Int32] { [file.rawValue] }
    /// Every byte moves by READ/WRITE(_FIXED) on the backing, so requests may keep their own
    /// pages, unless the target encrypts: then it must see the data.
    public var supportsZeroCopy: Bool { configuration.encryption == nil }

    /// Encrypting, the queue thread and each cipher worker thread (`--cipher-threads`) may
    /// instead serve a share of the queue's tags themselves, where the device lets them
    /// (UBLK_F_PER_IO_DAEMON): each request is then read or written, ciphered and committed
    /// on one thread, with no hand-off and no wake-up between threads.
    public var threadsPerQueue: Int { configuration.encryption.map { 1 + $0.workerThreads } ?? 1 }

    /// `key` is required with `configuration.encryption` and refused without it.
    public init(_ requested: LoopConfiguration, key: EncryptionKey? = nil) throws(TargetError) {
        var configuration = requested
        try Self.checkEncryption(configuration, key: key)
        self.key = key
        let status = try Self.inspect(configuration.path)
        // The backing's own block sizes: O_DIRECT needs I/O aligned to its logical block.
        let backingBlocks = Self.backingBlockSizes(status: status, path: configuration.path)
        let logical = configuration.logicalBlockSize
            ?? Self.defaultBlockSize(configuration, isBlockDevice: status.isBlockDevice, backingLogical: backingBlocks.logical)
        var fallback: DirectIOFallback?
        var notWritable: SystemError?
        let backing = try Self.open(&configuration, logical: logical, backingLogical: backingBlocks.logical,
                                    fallback: &fallback, notWritable: &notWritable)
        self.configuration = configuration
        readOnlyFallback = notWritable
        let backingSize: UInt64
        do { backingSize = status.isBlockDevice ? try backing.blockDeviceSize() : UInt64(status.size) }
        catch { throw .cannotMeasure(configuration.path, error) }
        let size = try Self.window(configuration, backingSize: backingSize, logical: logical)
        // (A device that ends where the backing does: no limit, or one beyond the end.)
        let available = backingSize - configuration.offset
        let toTheEnd = configuration.size.map { $0 >= available } ?? true
        self.available = available
        unusedTail = toTheEnd ? available - size : 0

        var properties = TargetProperties(size: size)
        properties.logicalBlockSize = logical
        properties.physicalBlockSize = max(logical, backingBlocks.physical)
        properties.readOnly = configuration.readOnly
        properties.rotational = backingBlocks.rotational
        let canPunch = !configuration.readOnly && Self.supportsPunchHole(backing, status: status, size: backingSize)
        // Encrypted, only where asked for, as dm-crypt (`EncryptionConfiguration.allowDiscards`).
        properties.supportsDiscard = canPunch && Self.allowsDiscards(configuration)
        properties.supportsWriteZeroes = canPunch && key == nil && Self.zeroesInPlace(backing, status: status)
        properties.discardGranularity = max(logical, min(status.blockSize, 64 * 1024))
        self.properties = properties
        directIOFallback = fallback
        directIO = fallback == nil && configuration.directIO != .off
        file = backing
        stampsWrites = status.isRegularFile && !configuration.readOnly
    }

    public func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) throws -> LoopQueueHandler {
        var encryption: QueueEncryption?
        if let key, let settings = configuration.encryption {
            // On the queue's thread: the cipher's contexts are this thread's alone; its
            // workers start here and end with the queue (`queueEnding`). Where threads share
            // the queue (`threadsPerQueue`), they are what the workers would be: none more.
            encryption = try QueueEncryption(key: key, configuration: settings,
                                             sectorSize: properties.logicalBlockSize, depth: depth, share: share,
                                             workers: share.count > 1 ? 0 : settings.workerThreads)
        }
        return LoopQueueHandler(depth: depth, offset: Int64(configuration.offset), blockSize: properties.logicalBlockSize,
                                readOnly: configuration.readOnly,
                                allowsDiscards: Self.allowsDiscards(configuration),
                                stamp: ModificationStamp(fd: file.rawValue, enabled: stampsWrites), encryption: encryption)
    }

    /// Whether discards may punch holes: always, unless encrypted without `allowDiscards`.
    static func allowsDiscards(_ configuration: LoopConfiguration) -> Bool {
        configuration.encryption.map { $0.allowDiscards == true } ?? true
    }

    /// An encrypted configuration needs its key, of its size, and a sector size dm-crypt uses.
    static func checkEncryption(_ configuration: LoopConfiguration, key: EncryptionKey?) throws(TargetError) {
        guard let encryption = configuration.encryption else {
            if key != nil { throw .keyWithoutEncryption }
            return
        }
        guard let key else { throw .keyMissing }
        if key.size.rawValue != encryption.keySize { throw .keySizeMismatch(key: key.size.rawValue, configured: encryption.keySize) }
        if let block = configuration.logicalBlockSize, !EncryptionConfiguration.sectorSizes.contains(block) {
            throw .encryptionBlockSize(block)
        }
        // As dm-crypt's constructor ("Invalid iv_offset sector"): the IVs count 512-byte
        // sectors, and a sector's must be a multiple of its size in them.
        let block = configuration.logicalBlockSize ?? 512
        if encryption.skip % UInt64(block / 512) != 0 { throw .skipMisaligned(skip: encryption.skip, blockSize: block) }
        // The offset counts sectors (cryptsetup's --offset), whole ones of the format's size.
        if configuration.offset % UInt64(block) != 0 { throw .offsetMisaligned(offset: configuration.offset, blockSize: block) }
    }

    public func sync() throws {
        if !configuration.readOnly { try file.sync() }
    }

    /// The configuration with the block size this target settled on, so a recovering
    /// server makes the same device.
    public var spec: TargetSpec {
        var resolved = configuration
        resolved.logicalBlockSize = properties.logicalBlockSize
        return .loop(resolved)
    }

    public var directIOState: String { directIO ? "on" : "off" }

    public var keyCheck: KeyCheck? { key?.check() }

    public var backingIdentity: FileIdentity? { try? file.status().identity }

    public var note: String? {
        let readOnly = readOnlyFallback.map {
            "backing file \(configuration.path) cannot be written (\($0.reason)): the device is read-only (give --read-only to ask for that without this line)"
        }
        let notes = [readOnly, directIOFallback.map { "\($0): using buffered I/O\(blockSizeHint)" }, tailNote, limitNote]
            .compactMap { $0 }
        return notes.isEmpty ? nil : notes.joined(separator: "; ")
    }

    /// The block size unless one is given: 512 for a file, as the kernel loop driver's
    /// default, since a disk image counts 512-byte sectors (its partition table, its file
    /// systems' offsets): a larger one would show such an image empty. The backing's own
    /// (at most 4096) for a block device, whose data counts its own sectors, and for a file
    /// with `--direct-io on`, which needs I/O aligned to it (a file on a 4096-byte-sector
    /// disk; `auto` uses buffered I/O there, and says so). Encrypted, the format's sector size.
    static func defaultBlockSize(_ configuration: LoopConfiguration, isBlockDevice: Bool, backingLogical: Int) -> Int {
        let own = min(4096, max(512, backingLogical))
        if configuration.encryption != nil { return 512 }
        return isBlockDevice || configuration.directIO == .on ? own : 512
    }

    /// A size limit the device does not have: beyond the backing's end (the device ends
    /// where the backing does), or not whole blocks (rounded down, as losetup's; where the
    /// limit is the backing's end, `tailNote` says so).
    var limitNote: String? {
        guard let limit = configuration.size, limit > properties.size else { return nil }
        if limit <= available {
            guard unusedTail == 0 else { return nil }
            return "--size \(limit) is not a whole number of \(properties.logicalBlockSize)-byte blocks: the device has \(properties.size) bytes"
        }
        return "--size \(limit) is more than \(configuration.path) holds after the offset: the device has \(properties.size) bytes, and ublk resize grows it up to the limit as the file grows"
    }

    /// Where the default block size cost direct I/O: how to have it.
    var blockSizeHint: String {
        guard configuration.logicalBlockSize == nil, case .misaligned(let backing, _, let offset) = directIOFallback,
              offset % UInt64(backing) == 0 else { return "" }
        return " (--block-size \(backing) gives direct I/O, for an image of \(backing)-byte sectors)"
    }

    /// A backing that is not whole blocks after the offset loses its tail, as under loop;
    /// said as losetup says it ("the end of the file will be ignored"). Encrypted, such an
    /// image is one cryptsetup refuses to open ("Device size is not aligned to requested
    /// sector size") unless the loop device under it leaves the tail out too.
    var tailNote: String? {
        guard unusedTail > 0 else { return nil }
        let encrypted = configuration.encryption != nil
        let note = TargetProperties.unusedTailNote(unusedTail, of: configuration.path, blockSize: properties.logicalBlockSize,
                                                   unit: encrypted ? "sector" : "block")
        guard encrypted else { return note }
        return note + "; cryptsetup opens the image through losetup --sizelimit \(configuration.offset + properties.size)"
    }

    // MARK: Opening the backing

    /// What the backing is, before deciding how to open it.
    static func inspect(_ path: String) throws(TargetError) -> FileStatus {
        let status: FileStatus
        do { status = try FileDescriptor(path: path, flags: O_RDONLY | O_NONBLOCK).status() } catch {
            throw .cannotOpen(path, error)
        }
        if status.isDirectory { throw .isDirectory(path) }
        guard status.isRegularFile || status.isBlockDevice else { throw .notFileOrDevice(path) }
        return status
    }

    /// `open`, and as losetup: a backing that cannot be written (a read-only mount, an
    /// immutable file) makes a read-only device, `notWritable` saying why (for `note`),
    /// unless a writable one is required.
    static func open(_ configuration: inout LoopConfiguration, logical: Int, backingLogical: Int,
                     fallback: inout DirectIOFallback?, notWritable: inout SystemError?) throws(TargetError) -> FileDescriptor {
        do {
            return try open(configuration, logical: logical, backingLogical: backingLogical, fallback: &fallback)
        } catch .notWritable(_, let error) where configuration.writableRequired != true {
            (configuration.readOnly, fallback, notWritable) = (true, nil, error)
            return try open(configuration, logical: logical, backingLogical: backingLogical, fallback: &fallback)
        } catch { throw error }
    }

    /// Opens the backing with O_DIRECT when asked and possible, else buffered; `fallback`
    /// says why `auto` could not have O_DIRECT.
    static func open(_ configuration: LoopConfiguration, logical: Int, backingLogical: Int,
                     fallback: inout DirectIOFallback?) throws(TargetError) -> FileDescriptor {
        let path = configuration.path
        let mode = configuration.readOnly ? O_RDONLY : O_RDWR
        if configuration.directIO != .off {
            if logical < backingLogical || configuration.offset % UInt64(backingLogical) != 0 {
                fallback = .misaligned(backingBlock: backingLogical, blockSize: logical, offset: configuration.offset)
            } else {
                do { return try FileDescriptor(path: path, flags: mode | FileDescriptor.directIOFlag) }
                catch where [EACCES, EPERM, EROFS].contains(error.errno) && !configuration.readOnly {
                    // Not O_DIRECT's fault: the backing cannot be written at all.
                    throw .notWritable(path, error)
                } catch { fallback = .refused(path, error) }
            }
            if configuration.directIO == .on, let fallback { throw .directIOUnavailable(fallback) }
        }
        do { return try FileDescriptor(path: path, flags: mode) } catch {
            // EPERM: an immutable file (chattr +i).
            if [EROFS, EACCES, EPERM].contains(error.errno) && !configuration.readOnly { throw .notWritable(path, error) }
            throw .cannotOpen(path, error)
        }
    }

    /// The size of the window [offset, offset + size) of a backing of `backingSize` bytes.
    static func window(_ configuration: LoopConfiguration, backingSize: UInt64,
                       logical: Int) throws(TargetError) -> UInt64 {
        let (path, offset, block) = (configuration.path, configuration.offset, UInt64(logical))
        if backingSize == 0 { throw .empty(path) }
        guard [512, 1024, 2048, 4096].contains(logical) else { throw .unsupportedBlockSize(logical) }
        // Any offset, as losetup takes one: the backing is read and written at offset plus
        // the request's byte offset, which buffered I/O does anywhere (`open` leaves O_DIRECT
        // out where the offset is not aligned for it). (Encrypted: `checkEncryption`.)
        if offset >= backingSize { throw .offsetBeyondEnd(offset: offset, path: path, backingSize: backingSize) }
        var size = backingSize - offset
        // A limit, as losetup's --sizelimit: rounded down to whole blocks (`limitNote` says
        // so), and one beyond the end leaves the device at the end (`ublk resize` grows it
        // up to the limit as the file grows).
        if let limit = configuration.size {
            if limit < block { throw .limitBelowBlock(size: limit, blockSize: logical) }
            size = min(size, limit)
        }
        size -= size % block
        if size == 0 { throw .smallerThanBlock(path, blockSize: logical, offset: offset, left: backingSize - offset) }
        return size
    }

    // MARK: Probing the backing

    /// Logical/physical block size and rotational flag of the backing (of the block
    /// device itself, or of the device holding the file), from sysfs. The logical block is
    /// at least the alignment the file's direct I/O needs where statx says it (as loop.c
    /// takes it): a file on overlayfs, btrfs or NFS has a device number sysfs does not
    /// know, and 512 there would make every O_DIRECT request fail on a 4K-sector disk.
    static func backingBlockSizes(status: FileStatus, path: String) -> (logical: Int, physical: Int, rotational: Bool) {
        let device = status.isBlockDevice ? status.rdev : status.device
        let base = "/sys/dev/block/\(major(device)):\(minor(device))"
        func value(_ name: String) -> Int? {
            // A partition's queue/ is its parent's.
            readSysfs("\(base)/queue/\(name)") ?? readSysfs("\(base)/../queue/\(name)")
        }
        let alignment = FileDescriptor.directIOAlignment(path: path) ?? 0
        let logical = max(value("logical_block_size") ?? 512, alignment)
        let physical = value("physical_block_size") ?? 4096
        return (logical, max(physical, logical), (value("rotational") ?? 0) == 1)
    }

    private static func readSysfs(_ path: String) -> Int? { SmallFile.integer(path) }

    /// Can the backing deallocate ranges? For a file: punch a hole past its end (a no-op
    /// where holes are supported, EOPNOTSUPP where not). For a block device: its
    /// write-zeroes limit, as loop.c takes it: a hole punched in a block device is a
    /// zero-out that may not fall back to writing zeros (blkdev_fallocate), so a disk
    /// that discards but cannot write zeroes would refuse every one. A file within a page
    /// of the largest file size (tmpfs and XFS make sparse ones of 2^63 - 1 bytes) has no
    /// room past its end to try: it is taken as one that cannot.
    static func supportsPunchHole(_ file: borrowing FileDescriptor, status: FileStatus, size: UInt64) -> Bool {
        if status.isBlockDevice {
            let device = status.rdev
            return (readSysfs("/sys/dev/block/\(major(device)):\(minor(device))/queue/write_zeroes_max_bytes") ?? 0) > 0
        }
        guard size <= UInt64(Int64.max) - 2 * 4096 else { return false }
        let end = MappedRegion.roundUp(Int(size), to: 4096)
        do {
            try file.allocate(mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset: Int64(end), length: 4096)
            return true
        } catch {
            return false
        }
    }

    /// Can the backing zero a range in place (FALLOC_FL_ZERO_RANGE, what a write-zeroes that
    /// must keep its blocks becomes)? tmpfs cannot (it punches holes and allocates, no
    /// more): each such request would fail, logged by the kernel as an I/O error, before
    /// the block layer wrote the zeros itself. So a file there is offered no write-zeroes
    /// (the kernel writes zeros, quietly), as loop stops offering it after the first failure.
    /// Not asked by trying: a zeroed range past the end keeps its block (ext4 does not
    /// punch past the end), and only a truncate, which could race a writer, frees it.
    static func zeroesInPlace(_ file: borrowing FileDescriptor, status: FileStatus) -> Bool {
        !(status.isRegularFile && file.isOnTmpfs)
    }

    private static func major(_ device: UInt64) -> UInt64 { ((device >> 32) & 0xffff_f000) | ((device >> 8) & 0xfff) }
    private static func minor(_ device: UInt64) -> UInt64 { ((device >> 12) & 0xffff_ff00) | (device & 0xff) }
}

/// One queue's share of a loop target: turns each request into one ring operation on
/// the backing (fixed file 1), like loop.c's do_req_filebacked. Encrypting, the same
/// state machine with `encryption` set: writes go out from its bounce buffers, reads are
/// decrypted once complete; plain, that costs one check of a nil `let` per read or write.
public final class LoopQueueHandler: QueueHandler {
    // Internal, not private, and the two request methods `@inlinable`: the queue engine is
    // specialised for this handler in the daemon (and the host benchmark), and a call
    // into another module per request is what it would otherwise pay.
    @usableFromInline let file = BackingSubmitter.firstTargetFile
    @usableFromInline let offset: Int64
    /// The device's logical block size: a short read completes in whole blocks.
    let blockSize: Int
    @usableFromInline let readOnly: Bool
    /// Discards punch holes (false: encrypted without `allowDiscards`, where none is advertised).
    @usableFromInline let allowsDiscards: Bool
    /// Keeps the backing file's times current so that writes need not update them (and
    /// io_uring need not hand them to a worker thread): called before every backing write.
    @usableFromInline let stamp: ModificationStamp
    /// Encrypting: the per-queue cipher and bounce buffers (`encrypting` says so to the
    /// inlined request methods, which then call the out-of-line helpers below).
    let encryption: QueueEncryption?
    @usableFromInline let encrypting: Bool
    // Per-tag state, touched on every request. Raw buffers rather than arrays: a
    // class's array property pays a runtime exclusivity check on each mutation
    // (about 40% of this handler's instructions, measured with callgrind).
    /// Bytes of each tag's read or write done so far (short transfers are resubmitted).
    @usableFromInline let transferred: UnsafeMutableBufferPointer<Int>
    /// Times each tag's read or write came back with EAGAIN or EINTR and was submitted again.
    @usableFromInline let retries: UnsafeMutableBufferPointer<UInt8>
    /// How often a read or write is submitted again after EAGAIN or EINTR (io_uring gives
    /// one back where it could not reissue it itself) before the error is the result.
    static let retryLimit: UInt8 = 8

    init(depth: Int, offset: Int64, blockSize: Int, readOnly: Bool, allowsDiscards: Bool = true,
         stamp: consuming ModificationStamp, encryption: QueueEncryption? = nil) {
        self.offset = offset
        self.blockSize = blockSize
        self.readOnly = readOnly
        self.allowsDiscards = allowsDiscards
        self.stamp = stamp
        self.encryption = encryption
        encrypting = encryption != nil
        transferred = .allocate(capacity: depth)
        transferred.initialize(repeating: 0)
        retries = .allocate(capacity: depth)
        retries.initialize(repeating: 0)
    }

    deinit {
        transferred.deallocate()
        retries.deallocate()
    }

    @inlinable
    public func start(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        if encrypting { return try tracked(request, starting: true) { () throws(SystemError) in try begin(request, io) } }
        return try begin(request, io)
    }

    @inlinable
    public func complete(_ request: IORequest, backingResult result: Int32,
                         _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        if encrypting { return try tracked(request, starting: false) { () throws(SystemError) in try encryptedStep(request, result, io) } }
        return try proceed(request, backingResult: result, io)
    }

    /// The workers end with the queue, before its buffers and ring do.
    public func queueEnding() { encryption?.stop() }

    /// Brings the backing's times up to date before a write (`ModificationStamp`), unless
    /// the write carries swap (UBLK_IO_F_SWAP): `futimens` takes the inode's lock, and the
    /// queue thread must not wait for it while the kernel swaps out to the device (its
    /// holder may be waiting for memory). Such a write moves the times itself, on an io-wq
    /// worker where it must block.
    @inlinable @inline(__always)
    func stampBeforeWrite(_ d: IODescriptor) {
        if !d.flags.contains(.swap) { stamp.beforeWrite() }
    }

    /// The first step of a request.
    @inlinable
    func begin(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        let d = request.descriptor
        let position = offset + d.byteOffset
        switch d.operation {
        case .read:
            transferred[Int(request.tag)] = 0
            retries[Int(request.tag)] = 0
            try io.read(file: file, into: request.data, count: d.byteCount, offset: position)
            // Encrypted data must be deciphered first (`tracked` keeps it from linking).
            return .finishing(result: Int32(d.byteCount))
        case .write:
            if readOnly { return .done(-EROFS) }
            transferred[Int(request.tag)] = 0
            retries[Int(request.tag)] = 0
            if encrypting { return try encryptedWrite(request, from: 0, io) }
            stampBeforeWrite(d)
            try io.write(file: file, from: request.data, count: d.byteCount, offset: position,
                         dsync: d.flags.contains(.fua))
            return .finishing(result: Int32(d.byteCount))
        case .flush:
            try io.fsync(file: file)
        case .discard:
            if readOnly { return .done(-EROFS) }
            // Not advertised then (`supportsDiscard`): a forged request gets what the kernel would say.
            if !allowsDiscards { return .done(-EOPNOTSUPP) }
            try io.fallocate(file: file, mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             offset: position, length: Int64(d.byteCount))
        case .writeZeroes:
            if readOnly { return .done(-EROFS) }
            // Not advertised when encrypting: zeroed backing would read back as noise.
            if encrypting { return .done(-EOPNOTSUPP) }
            // As loop.c: keep the blocks allocated only when asked to (NOUNMAP); where the
            // file system cannot zero in place (tmpfs) that fails with EOPNOTSUPP, and the
            // block layer writes zeros instead.
            let mode = d.flags.contains(.noUnmap) ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE
            try io.fallocate(file: file, mode: mode | FALLOC_FL_KEEP_SIZE, offset: position, length: Int64(d.byteCount))
        case .unsupported:
            return .done(-EOPNOTSUPP)
        }
        // Never `.finishing`: io_uring breaks a link only behind a read or write that fails
        // or ends short; a failed fsync or fallocate would still run the linked commit, with
        // its success result, and its own completion would be skipped: a lost fsync error.
        return .submitted
    }

    /// The next step of a request whose backing operation completed with `result`.
    @inlinable
    func proceed(_ request: IORequest, backingResult result: Int32,
                 _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        let d = request.descriptor
        // The common case, a read or write that moved all its bytes (at once unless the
        // backing ended early or the transfer was short), in a few lines the specialised
        // queue engine inlines; `completeRequest`, out of line, handles every case itself.
        if d.operation.usesBuffer && result > 0 && transferred[Int(request.tag)] + Int(result) >= d.byteCount {
            return d.operation == .read ? try readDone(request, io) : .done(Int32(d.byteCount))
        }
        return try completeRequest(request, backingResult: result, io)
    }

    @usableFromInline
    func completeRequest(_ request: IORequest, backingResult result: Int32,
                         _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        let d = request.descriptor
        let tag = Int(request.tag)
        switch d.operation {
        case .read, .write:
            if result == -EAGAIN || result == -EINTR, retries[tag] < Self.retryLimit {
                // As loop.c takes a request the backing could not take at once again.
                retries[tag] += 1
                return try submitRest(request, from: transferred[tag], io)
            }
            if result < 0 { return .done(result) }
            if result == 0 { return .done(endOfBacking(request)) }
            transferred[tag] += Int(result)
            let done = transferred[tag]
            if done >= d.byteCount { return d.operation == .read ? try readDone(request, io) : .done(Int32(d.byteCount)) }
            return try submitRest(request, from: done, io)
        default:
            return .done(result < 0 ? result : 0)
        }
    }

    /// A read or write met the end of the backing (which shrank under the device): as
    /// loop.c ends a short read, the whole blocks moved complete (the driver then sends the
    /// rest again, which meets the end at once) and a request that moved none fails with
    /// EIO, rather than reading zeros the file does not hold. Encrypted, the request fails
    /// whole (its sectors are deciphered together), and so does one in zero copy: ublk_drv
    /// (7.3, UBLK_F_AUTO_BUF_REG) ends such a request whole on a partial result, as if
    /// every byte had been read (traced: `block_rq_complete` of all its sectors, status 0).
    func endOfBacking(_ request: IORequest) -> Int32 {
        let done = transferred[Int(request.tag)] / blockSize * blockSize
        let partialIsHonoured = !encrypting && request.data.isBuffer
        return request.descriptor.operation == .read && done > 0 && partialIsHonoured ? Int32(done) : -EIO
    }

    /// Submits a read or write again from byte `done` to its end: the rest of a short
    /// transfer, the next chunk of an encrypted write, or a retry.
    func submitRest(_ request: IORequest, from done: Int, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        let d = request.descriptor
        if d.operation == .write && encrypting { return try encryptedWrite(request, from: done, io) }
        let position = offset + d.byteOffset + Int64(done)
        let rest = request.data.advanced(by: done)
        if d.operation == .read {
            try io.read(file: file, into: rest, count: d.byteCount - done, offset: position)
        } else {
            stampBeforeWrite(d)
            try io.write(file: file, from: rest, count: d.byteCount - done, offset: position, dsync: d.flags.contains(.fua))
        }
        return .submitted
    }

    /// Encrypting: counts the requests in flight around one step of a request (where the
    /// cipher runs depends on it).
    @usableFromInline
    func tracked(_ request: IORequest, starting: Bool,
                 _ step: () throws(SystemError) -> RequestStep) throws(SystemError) -> RequestStep {
        let (tag, encryption) = (Int(request.tag), encryption.unsafelyUnwrapped)
        if starting { encryption.began(tag) }
        do {
            switch try step() {
            case .done(let result):
                encryption.ended(tag)
                return .done(result)
            // The count must see each request end: no commit linked behind its last operation.
            case .submitted, .finishing: return .submitted
            }
        } catch {
            encryption.ended(tag)
            throw error
        }
    }

    /// Encrypting: submits the rest of a write from byte `done`, its ciphertext from the
    /// tag's bounce buffer (a chunk at a time for writes longer than the bounce buffer),
    /// once the chunk that starts there is encrypted.
    @usableFromInline
    func encryptedWrite(_ request: IORequest, from done: Int, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        guard let encryption else { return .done(-EIO) }
        if done % encryption.chunk == 0 {
            switch try encryption.encrypt(request, from: done, io) {
            case .done: break
            case .failed: return .done(-EIO)
            case .handedOff: return .submitted
            }
        }
        return try writeCiphertext(request, from: done, io)
    }

    /// Submits the write of the tag's ciphertext from byte `done` to the end of its chunk.
    func writeCiphertext(_ request: IORequest, from done: Int, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        let d = request.descriptor
        guard let (source, count) = encryption?.ciphertext(request, from: done) else { return .done(-EIO) }
        stampBeforeWrite(d)
        try io.write(file: file, from: source, count: count, offset: offset + d.byteOffset + Int64(done),
                     dsync: d.flags.contains(.fua))
        return .submitted
    }

    /// Encrypting: a completion of the request is a worker's answer if its cipher job was
    /// handed off, else its backing operation's.
    @usableFromInline
    func encryptedStep(_ request: IORequest, _ result: Int32, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        if encryption.unsafelyUnwrapped.isHandedOff(Int(request.tag)) { return try cipherCompleted(request, result: result, io) }
        return try proceed(request, backingResult: result, io)
    }

    /// A worker answered for the request's cipher job (or the handoff failed, and the job
    /// ran here): a read is done, a write's chunk goes to the backing.
    @usableFromInline
    func cipherCompleted(_ request: IORequest, result: Int32, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        guard let encryption, encryption.handOffCompleted(Int(request.tag), result: result) else { return .done(-EIO) }
        if request.descriptor.operation == .read { return .done(Int32(request.descriptor.byteCount)) }
        return try writeCiphertext(request, from: transferred[Int(request.tag)], io)
    }

    /// The result of a read whose data is all in the tag's buffer: decrypted first, if
    /// encrypting (nil: a worker is decrypting it).
    @inlinable
    func readDone(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        if encrypting { return try decrypted(request, io) }
        return .done(Int32(request.descriptor.byteCount))
    }

    @usableFromInline
    func decrypted(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> RequestStep {
        switch try encryption.unsafelyUnwrapped.decrypt(request, io) {
        case .done: return .done(Int32(request.descriptor.byteCount))
        case .failed: return .done(-EIO)
        case .handedOff: return .submitted
        }
    }
}
