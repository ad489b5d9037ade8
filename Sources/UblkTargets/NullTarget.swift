import Glibc
import UblkQueue
import UblkSystem

/// A null device's settings.
public struct NullConfiguration: Sendable, Equatable, Codable {
    /// Device size in bytes, a multiple of `logicalBlockSize`.
    public var size: UInt64
    public var logicalBlockSize: Int
    /// The device refuses writes.
    public var readOnly = false

    public init(size: UInt64, logicalBlockSize: Int = 512) {
        self.size = size
        self.logicalBlockSize = logicalBlockSize
    }

    enum CodingKeys: String, CodingKey { case size, logicalBlockSize, readOnly }

    /// A record written before `readOnly` existed reads as writable.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        size = try container.decode(UInt64.self, forKey: .size)
        logicalBlockSize = try container.decode(Int.self, forKey: .logicalBlockSize)
        readOnly = try container.decodeIfPresent(Bool.self, forKey: .readOnly) ?? false
    }
}

/// A target with no backing: every request completes at once, reads return zeros and
/// writes are dropped. It measures the ublk runtime alone (as the kernel's null_blk
/// measures the block layer alone).
public final class NullTarget: SpecifiedTarget {
    public let name = "null"
    public let configuration: NullConfiguration
    public let properties: TargetProperties
    /// /dev/zero, which fills a read's own pages with zero copy (nil if it cannot be opened).
    private let zeros: FileDescriptor?
    public let fixedFiles: [Int32]
    /// Writes complete without their data; a read's pages are zeroed from /dev/zero by
    /// the kernel, with no copy through a buffer of ours.
    public var supportsZeroCopy: Bool { !fixedFiles.isEmpty }

    public init(_ configuration: NullConfiguration) {
        self.configuration = configuration
        do {
            let zeros = try FileDescriptor(path: "/dev/zero", flags: O_RDONLY)
            fixedFiles = [zeros.rawValue]
            self.zeros = consume zeros
        } catch {
            zeros = nil
            fixedFiles = []
        }
        var properties = TargetProperties(size: configuration.size)
        properties.logicalBlockSize = configuration.logicalBlockSize
        properties.physicalBlockSize = max(configuration.logicalBlockSize, 4096)
        properties.volatileCache = false
        properties.readOnly = configuration.readOnly
        properties.supportsDiscard = !configuration.readOnly
        properties.supportsWriteZeroes = !configuration.readOnly
        self.properties = properties
    }

    /// - Parameter size: device size in bytes, a multiple of `logicalBlockSize`.
    public convenience init(size: UInt64, logicalBlockSize: Int = 512) {
        self.init(NullConfiguration(size: size, logicalBlockSize: logicalBlockSize))
    }

    public func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) -> NullQueueHandler {
        NullQueueHandler(depth: depth, readOnly: configuration.readOnly)
    }

    public func sync() throws {}

    public var spec: TargetSpec { .null(configuration) }
    public var directIOState: String { "-" }
    public var note: String? { nil }
}

public final class NullQueueHandler: QueueHandler {
    /// Per tag, how many leading bytes of its buffer hold data a write brought in (the
    /// kernel copied it there); zeroed before a read hands the buffer out again.
    /// (A raw buffer: an array property would pay an exclusivity check per request.)
    private let dirtyBytes: UnsafeMutableBufferPointer<Int>
    /// Writes are refused (the kernel refuses them first: the disk is read-only).
    private let readOnly: Bool

    init(depth: Int, readOnly: Bool = false) {
        self.readOnly = readOnly
        dirtyBytes = .allocate(capacity: depth)
        dirtyBytes.initialize(repeating: 0)
    }

    deinit { dirtyBytes.deallocate() }

    public func start(_ request: IORequest, _ io: BackingSubmitter) -> RequestStep {
        let descriptor = request.descriptor
        switch descriptor.operation {
        case .read:
            // Zero copy: the reader's own pages, which hold whatever they held before (a
            // page cache page is not cleared before a read fills it): /dev/zero fills them.
            guard case .buffer(let buffer) = request.data else { return zeroFill(request, from: 0, io) }
            let tag = Int(request.tag)
            if dirtyBytes[tag] > 0 {
                buffer.initializeMemory(as: UInt8.self, repeating: 0, count: dirtyBytes[tag])
                dirtyBytes[tag] = 0
            }
            return .done(Int32(descriptor.byteCount))
        case .write where readOnly, .discard where readOnly, .writeZeroes where readOnly:
            return .done(-EROFS)
        case .write:
            guard case .buffer = request.data else { return .done(Int32(descriptor.byteCount)) }
            let tag = Int(request.tag)
            dirtyBytes[tag] = max(dirtyBytes[tag], descriptor.byteCount)
            return .done(Int32(descriptor.byteCount))
        case .flush, .discard, .writeZeroes:
            return .done(0)
        case .unsupported:
            return .done(-EOPNOTSUPP)
        }
    }

    /// A zero-copy read's fill from /dev/zero completed (visibly only if it failed or was
    /// short: else the commit linked behind it went): the rest is filled again.
    public func complete(_ request: IORequest, backingResult: Int32, _ io: BackingSubmitter) -> RequestStep {
        let tag = Int(request.tag)
        guard backingResult > 0 else { return .done(backingResult < 0 ? backingResult : -EIO) }
        dirtyBytes[tag] += Int(backingResult)
        if dirtyBytes[tag] >= request.descriptor.byteCount { return .done(Int32(request.descriptor.byteCount)) }
        return zeroFill(request, from: dirtyBytes[tag], io)
    }

    /// Reads /dev/zero into a zero-copy read's pages from byte `done` (`dirtyBytes` counts
    /// what is filled: with zero copy no buffer of ours is dirty).
    func zeroFill(_ request: IORequest, from done: Int, _ io: BackingSubmitter) -> RequestStep {
        dirtyBytes[Int(request.tag)] = done
        let count = request.descriptor.byteCount - done
        do { try io.read(file: BackingSubmitter.firstTargetFile, into: request.data.advanced(by: done), count: count, offset: 0) }
        catch { return .done(-error.errno) }
        return .finishing(result: Int32(request.descriptor.byteCount))
    }
}
