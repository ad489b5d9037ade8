import CUblk
import Glibc

/// What the block layer asks for.
public enum IOOperation: Sendable, Equatable {
    case read, write, flush, discard, writeZeroes
    /// Anything else (zoned operations, WRITE_SAME): refused with EOPNOTSUPP.
    case unsupported(UInt8)

    @inlinable
    init(_ raw: UInt8) {
        switch Int(raw) {
        case UBLK_IO_OP_READ: self = .read
        case UBLK_IO_OP_WRITE: self = .write
        case UBLK_IO_OP_FLUSH: self = .flush
        case UBLK_IO_OP_DISCARD: self = .discard
        case UBLK_IO_OP_WRITE_ZEROES: self = .writeZeroes
        default: self = .unsupported(raw)
        }
    }

    /// The `UBLK_IO_OP_*` number.
    @inlinable
    public var rawValue: UInt8 {
        switch self {
        case .read: UInt8(UBLK_IO_OP_READ)
        case .write: UInt8(UBLK_IO_OP_WRITE)
        case .flush: UInt8(UBLK_IO_OP_FLUSH)
        case .discard: UInt8(UBLK_IO_OP_DISCARD)
        case .writeZeroes: UInt8(UBLK_IO_OP_WRITE_ZEROES)
        case .unsupported(let raw): raw
        }
    }

    /// The operation moves data through the tag's buffer.
    @inlinable
    public var usesBuffer: Bool { self == .read || self == .write }
}

/// Request flags (`UBLK_IO_F_*`, bits 8-31 of `op_flags`). The flags are inlinable computed
/// constants, not `static let`s: a global `let` from another module is read through a
/// lazy-initialisation accessor call, which the engine would pay per request.
public struct IOFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Forced unit access: the write must be durable when it completes.
    @inlinable public static var fua: IOFlags { IOFlags(rawValue: UBLK_IO_F_FUA) }
    /// WRITE_ZEROES must not deallocate (so zero the range, don't punch it).
    @inlinable public static var noUnmap: IOFlags { IOFlags(rawValue: UBLK_IO_F_NOUNMAP) }
    @inlinable public static var failFastDevice: IOFlags { IOFlags(rawValue: UBLK_IO_F_FAILFAST_DEV) }
    @inlinable public static var meta: IOFlags { IOFlags(rawValue: UBLK_IO_F_META) }
    @inlinable public static var swap: IOFlags { IOFlags(rawValue: UBLK_IO_F_SWAP) }
    /// Zero copy: the driver could not register the request's pages at the tag's index
    /// (UBLK_AUTO_BUF_REG_FALLBACK): the server registers them itself.
    @inlinable public static var needsBufferRegistration: IOFlags { IOFlags(rawValue: UBLK_IO_F_NEED_REG_BUF) }
}

/// One request, decoded from the `ublksrv_io_desc` the driver wrote for a tag.
public struct IODescriptor: Sendable, Equatable {
    public var operation: IOOperation
    public var flags: IOFlags
    public var startSector: UInt64
    public var sectorCount: UInt32

    @inlinable
    public init(operation: IOOperation, flags: IOFlags = [], startSector: UInt64, sectorCount: UInt32) {
        self.operation = operation
        self.flags = flags
        self.startSector = startSector
        self.sectorCount = sectorCount
    }

    /// Decodes the raw descriptor. Nothing is trusted yet: see `validated(for:)`.
    /// (Always inlined, as `validated`: once per request, a few instructions of work.)
    @inlinable @inline(__always)
    public init(raw: ublksrv_io_desc) {
        operation = IOOperation(UInt8(truncatingIfNeeded: raw.op_flags))
        flags = IOFlags(rawValue: raw.op_flags & ~0xff)
        startSector = raw.start_sector
        sectorCount = raw.nr_sectors
    }

    /// The descriptor as the driver would write it (for requests made up by tests and benchmarks).
    @inlinable
    public var raw: ublksrv_io_desc {
        var raw = ublksrv_io_desc()
        raw.op_flags = UInt32(operation.rawValue) | flags.rawValue
        raw.start_sector = startSector
        raw.nr_sectors = sectorCount
        return raw
    }

    /// Byte offset on the device (meaningful once `validated(for:)` bounded the sector).
    @inlinable public var byteOffset: Int64 { Int64(bitPattern: startSector &<< 9) }
    /// Length in bytes.
    @inlinable public var byteCount: Int { Int(sectorCount) << 9 }
}

/// What a descriptor may ask of this device; anything outside is refused before it
/// touches memory or the backing file.
public struct DeviceLimits: Sendable, Equatable {
    /// Device size in 512-byte sectors.
    public var sectors: UInt64
    /// Size of each tag's buffer: the longest read or write.
    public var maxIOBytes: Int

    @inlinable
    public init(sectors: UInt64, maxIOBytes: Int) {
        self.sectors = sectors
        self.maxIOBytes = maxIOBytes
    }
}

/// Why a descriptor was refused.
public enum DescriptorError: Error, Equatable, CustomStringConvertible, Sendable {
    case beyondDevice(start: UInt64, count: UInt32, deviceSectors: UInt64)
    case longerThanBuffer(bytes: Int, buffer: Int)
    case emptyTransfer
    case unsupported(UInt8)

    /// The errno the request completes with.
    public var errno: Int32 {
        if case .unsupported = self { return EOPNOTSUPP }
        return EIO
    }

    public var description: String {
        switch self {
        case let .beyondDevice(start, count, sectors): "sectors \(start)+\(count) lie beyond the device's \(sectors)"
        case let .longerThanBuffer(bytes, buffer): "\(bytes) bytes do not fit the \(buffer)-byte buffer"
        case .emptyTransfer: "read or write of zero sectors"
        case let .unsupported(op): "unsupported operation \(op)"
        }
    }
}

extension IODescriptor {
    /// Checks the descriptor against the device before anything acts on it: the sector
    /// range must lie inside the device (no overflow) and a transfer must fit the buffer.
    @inlinable @inline(__always)
    public func validated(for limits: DeviceLimits) -> Result<IODescriptor, DescriptorError> {
        switch operation {
        case .unsupported(let op):
            return .failure(.unsupported(op))
        case .flush:
            // The range of a flush means nothing (the driver may leave junk there): drop it.
            return .success(IODescriptor(operation: .flush, flags: flags, startSector: 0, sectorCount: 0))
        case .read, .write, .discard, .writeZeroes:
            let (end, overflow) = startSector.addingReportingOverflow(UInt64(sectorCount))
            if overflow || end > limits.sectors {
                return .failure(.beyondDevice(start: startSector, count: sectorCount, deviceSectors: limits.sectors))
            }
            if operation.usesBuffer {
                if sectorCount == 0 { return .failure(.emptyTransfer) }
                if byteCount > limits.maxIOBytes {
                    return .failure(.longerThanBuffer(bytes: byteCount, buffer: limits.maxIOBytes))
                }
            }
            return .success(self)
        }
    }
}
