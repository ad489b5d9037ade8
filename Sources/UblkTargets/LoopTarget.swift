import CUblk
import Glibc
import UblkQueue
import UblkSystem

/// Whether the backing file is opened with O_DIRECT.
public enum DirectIOMode: String, Sendable, CaseIterable {
    /// O_DIRECT; fail if the backing cannot do it.
    case on
    /// Buffered I/O through the page cache.
    case off
    /// O_DIRECT when the backing allows it and the block size fits, else buffered (said once).
    case auto
}

/// How a loop target maps a backing file (losetup's options).
public struct LoopConfiguration: Sendable, Equatable {
    public var path: String
    public var directIO: DirectIOMode = .auto
    public var readOnly = false
    /// Start of the window in the backing, in bytes (losetup --offset).
    public var offset: UInt64 = 0
    /// Length of the window in bytes (losetup --sizelimit); nil: to the end of the backing.
    public var size: UInt64?
    /// Logical block size of the device; nil: 512 (or the backing device's, if larger).
    public var logicalBlockSize: Int?

    public init(path: String) { self.path = path }
}

/// Why a loop target could not be set up; each says what to do.
public struct LoopTargetError: Error, CustomStringConvertible, Equatable {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// A block device backed by a regular file or another block device: the kernel loop
/// driver's job. Reads and writes become io_uring reads and writes at the same offset
/// (plus the window's start), FLUSH becomes fsync, DISCARD punches a hole and
/// WRITE_ZEROES zeroes (or punches) the range; FUA writes are RWF_DSYNC.
public final class LoopTarget: Target {
    public let name = "loop"
    public let configuration: LoopConfiguration
    public let properties: TargetProperties
    /// The backing is opened with O_DIRECT.
    public let directIO: Bool
    /// Set when `auto` fell back to buffered I/O: the one-line reason.
    public let directIONote: String?
    let file: FileDescriptor

    public var fixedFiles: [Int32] { [file.rawValue] }

    public init(_ configuration: LoopConfiguration) throws(LoopTargetError) {
        self.configuration = configuration
        let path = configuration.path
        let mode = configuration.readOnly ? O_RDONLY : O_RDWR

        // What the backing is, before deciding how to open it.
        let status: FileStatus
        do {
            status = try FileDescriptor(path: path, flags: O_RDONLY | O_NONBLOCK).status()
        } catch let error as SystemError {
            switch error.errno {
            case ENOENT: throw LoopTargetError("backing file \(path) does not exist: create it first (e.g. truncate -s 1G \(path))")
            case EACCES, EPERM: throw LoopTargetError("backing file \(path) is not readable: check its permissions")
            default: throw LoopTargetError("cannot open backing file \(path): \(error.reason)")
            }
        } catch { throw LoopTargetError("cannot open backing file \(path): \(error)") }
        if status.isDirectory { throw LoopTargetError("backing file \(path) is a directory: give a regular file or a block device") }
        guard status.isRegularFile || status.isBlockDevice else {
            throw LoopTargetError("backing file \(path) is neither a regular file nor a block device")
        }

        // The backing's own block sizes: O_DIRECT needs I/O aligned to its logical block.
        let backingBlocks = Self.backingBlockSizes(status: status)
        let logical = configuration.logicalBlockSize ?? max(512, backingBlocks.logical)

        var file: FileDescriptor? = nil
        var note: String? = nil
        switch configuration.directIO {
        case .off:
            break
        case .on, .auto:
            if logical < backingBlocks.logical || configuration.offset % UInt64(backingBlocks.logical) != 0 {
                note = "direct I/O needs \(backingBlocks.logical)-byte alignment, but the block size is \(logical) and the offset \(configuration.offset)"
            } else {
                do { file = try FileDescriptor(path: path, flags: mode | FileDescriptor.directIOFlag) }
                catch { note = "\(path) cannot be opened with O_DIRECT (\(error.reason))" }
            }
            if configuration.directIO == .on, let note {
                throw LoopTargetError("\(note): use --direct-io off or auto")
            }
        }
        directIO = file != nil
        directIONote = note
        if file == nil {
            do { file = try FileDescriptor(path: path, flags: mode) }
            catch {
                if error.errno == EROFS || error.errno == EACCES {
                    throw LoopTargetError("backing file \(path) cannot be opened for writing (\(error.reason)): use --read-only")
                }
                throw LoopTargetError("cannot open backing file \(path): \(error.reason)")
            }
        }
        let backing = file!

        // The window [offset, offset + size) of the backing.
        let backingSize: UInt64
        do { backingSize = status.isBlockDevice ? try backing.blockDeviceSize() : UInt64(status.size) }
        catch { throw LoopTargetError("cannot read the size of \(path): \(error)") }
        if backingSize == 0 { throw LoopTargetError("backing file \(path) is empty: give it a size (e.g. truncate -s 1G \(path))") }
        guard [512, 1024, 2048, 4096].contains(logical) else {
            throw LoopTargetError("block size \(logical) is not one of 512, 1024, 2048, 4096")
        }
        if configuration.offset % UInt64(logical) != 0 {
            throw LoopTargetError("offset \(configuration.offset) is not a multiple of the block size \(logical)")
        }
        if configuration.offset >= backingSize {
            throw LoopTargetError("offset \(configuration.offset) is beyond the end of \(path) (\(backingSize) bytes)")
        }
        var size = backingSize - configuration.offset
        if let limit = configuration.size {
            if limit == 0 || limit % UInt64(logical) != 0 {
                throw LoopTargetError("size \(limit) is not a positive multiple of the block size \(logical)")
            }
            if limit > size {
                throw LoopTargetError("size \(limit) at offset \(configuration.offset) goes beyond the end of \(path) (\(backingSize) bytes)")
            }
            size = limit
        }
        size -= size % UInt64(logical)
        if size == 0 { throw LoopTargetError("backing file \(path) is smaller than one \(logical)-byte block") }

        var properties = TargetProperties(size: size)
        properties.logicalBlockSize = logical
        properties.physicalBlockSize = max(logical, backingBlocks.physical)
        properties.readOnly = configuration.readOnly
        properties.rotational = backingBlocks.rotational
        let canPunch = !configuration.readOnly && Self.supportsPunchHole(backing, status: status, size: backingSize)
        properties.supportsDiscard = canPunch
        properties.supportsWriteZeroes = canPunch
        properties.discardGranularity = max(logical, min(status.blockSize, 64 * 1024))
        self.properties = properties
        self.file = backing
    }

    public func makeQueueHandler(queueID: Int, depth: Int) throws -> any QueueHandler {
        LoopQueueHandler(depth: depth, offset: Int64(configuration.offset), readOnly: configuration.readOnly)
    }

    public func sync() throws {
        if !configuration.readOnly { try file.sync() }
    }

    public var description: [String: String] {
        ["backing": configuration.path, "direct_io": directIO ? "on" : "off",
         "offset": String(configuration.offset), "read_only": configuration.readOnly ? "yes" : "no",
         "direct_io_request": configuration.directIO.rawValue,
         "size_limit": configuration.size.map { String($0) } ?? ""]
    }

    // MARK: Probing the backing

    /// Logical/physical block size and rotational flag of the backing (of the block
    /// device itself, or of the device holding the file), from sysfs.
    static func backingBlockSizes(status: FileStatus) -> (logical: Int, physical: Int, rotational: Bool) {
        let device = status.isBlockDevice ? status.rdev : status.device
        let base = "/sys/dev/block/\(major(device)):\(minor(device))"
        func value(_ name: String) -> Int? {
            // A partition's queue/ is its parent's.
            readSysfs("\(base)/queue/\(name)") ?? readSysfs("\(base)/../queue/\(name)")
        }
        let logical = value("logical_block_size") ?? 512
        let physical = value("physical_block_size") ?? 4096
        return (logical, max(physical, logical), (value("rotational") ?? 0) == 1)
    }

    private static func readSysfs(_ path: String) -> Int? { SmallFile.integer(path) }

    /// Can the backing deallocate ranges? For a file: punch a hole past its end (a no-op
    /// where holes are supported, EOPNOTSUPP where not). For a block device: its discard limit.
    static func supportsPunchHole(_ file: borrowing FileDescriptor, status: FileStatus, size: UInt64) -> Bool {
        if status.isBlockDevice {
            let device = status.rdev
            return (readSysfs("/sys/dev/block/\(major(device)):\(minor(device))/queue/discard_max_bytes") ?? 0) > 0
        }
        let end = MappedRegion.roundUp(Int(size), to: 4096)
        do {
            try file.allocate(mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset: Int64(end), length: 4096)
            return true
        } catch {
            return false
        }
    }

    private static func major(_ device: UInt64) -> UInt64 { ((device >> 32) & 0xffff_f000) | ((device >> 8) & 0xfff) }
    private static func minor(_ device: UInt64) -> UInt64 { ((device >> 12) & 0xffff_ff00) | (device & 0xff) }
}

/// One queue's share of a loop target: turns each request into one ring operation on
/// the backing (fixed file 1), like loop.c's do_req_filebacked.
final class LoopQueueHandler: QueueHandler {
    private let file = BackingSubmitter.firstTargetFile
    private let offset: Int64
    private let readOnly: Bool
    // Per-tag state, touched on every request. Raw buffers rather than arrays: a
    // class's array property pays a runtime exclusivity check on each mutation
    // (about 40% of this handler's instructions, measured with callgrind).
    /// Bytes of each tag's read or write done so far (short transfers are resubmitted).
    private let transferred: UnsafeMutableBufferPointer<Int>
    /// Tags whose WRITE_ZEROES fell back from ZERO_RANGE to punching a hole.
    private let zeroRangeRefused: UnsafeMutableBufferPointer<Bool>

    init(depth: Int, offset: Int64, readOnly: Bool) {
        self.offset = offset
        self.readOnly = readOnly
        transferred = .allocate(capacity: depth)
        transferred.initialize(repeating: 0)
        zeroRangeRefused = .allocate(capacity: depth)
        zeroRangeRefused.initialize(repeating: false)
    }

    deinit {
        transferred.deallocate()
        zeroRangeRefused.deallocate()
    }

    func start(_ request: IORequest, _ io: BackingSubmitter) -> Int32? {
        let d = request.descriptor
        let position = offset + d.byteOffset
        let submitted: Bool
        switch d.operation {
        case .read:
            transferred[Int(request.tag)] = 0
            submitted = io.read(file: file, into: request.buffer, count: d.byteCount, offset: position)
        case .write:
            if readOnly { return -EROFS }
            transferred[Int(request.tag)] = 0
            submitted = io.write(file: file, from: request.buffer, count: d.byteCount, offset: position,
                                 dsync: d.flags.contains(.fua))
        case .flush:
            submitted = io.fsync(file: file)
        case .discard:
            if readOnly { return -EROFS }
            submitted = io.fallocate(file: file, mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                     offset: position, length: Int64(d.byteCount))
        case .writeZeroes:
            if readOnly { return -EROFS }
            // As loop.c: keep the blocks allocated only when asked to (NOUNMAP).
            zeroRangeRefused[Int(request.tag)] = false
            let mode = d.flags.contains(.noUnmap) ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE
            submitted = io.fallocate(file: file, mode: mode | FALLOC_FL_KEEP_SIZE, offset: position, length: Int64(d.byteCount))
        case .unsupported:
            return -EOPNOTSUPP
        }
        return submitted ? nil : -EAGAIN
    }

    func complete(_ request: IORequest, backingResult result: Int32, _ io: BackingSubmitter) -> Int32? {
        let d = request.descriptor
        let tag = Int(request.tag)
        switch d.operation {
        case .read, .write:
            if result < 0 { return result }
            if result == 0 {
                guard d.operation == .read else { return -EIO }
                // Past the end of the backing: the rest reads as zeros (loop.c does the same).
                let done = transferred[tag]
                (request.buffer + done).initializeMemory(as: UInt8.self, repeating: 0, count: d.byteCount - done)
                return Int32(d.byteCount)
            }
            transferred[tag] += Int(result)
            let done = transferred[tag]
            if done >= d.byteCount { return Int32(d.byteCount) }
            // Short transfer: ask for the rest.
            let position = offset + d.byteOffset + Int64(done)
            let ok = d.operation == .read
                ? io.read(file: file, into: request.buffer + done, count: d.byteCount - done, offset: position)
                : io.write(file: file, from: request.buffer + done, count: d.byteCount - done, offset: position,
                           dsync: d.flags.contains(.fua))
            return ok ? nil : -EAGAIN
        case .writeZeroes where result == -EOPNOTSUPP && !zeroRangeRefused[tag] && d.flags.contains(.noUnmap):
            // Some file systems (tmpfs) cannot zero a range in place; a hole reads as zeros too.
            zeroRangeRefused[tag] = true
            let ok = io.fallocate(file: file, mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  offset: offset + d.byteOffset, length: Int64(d.byteCount))
            return ok ? nil : -EAGAIN
        default:
            return result < 0 ? result : 0
        }
    }
}
