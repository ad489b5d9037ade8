import Glibc

/// A block request as the target sees it, independent of the queue's descriptor layout
/// (the NBD target fills it from the ublk descriptor).
public struct BlockRequest: Equatable, Hashable, Sendable {
    public enum Operation: Equatable, Hashable, Sendable {
        case read
        case write
        case flush
        case discard
        case writeZeroes
    }

    public struct Flags: OptionSet, Hashable, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }

        /// Force unit access (ublk `UBLK_IO_F_FUA`).
        public static let fua = Self(rawValue: 1 << 0)
        /// Zeroes must stay allocated (ublk `UBLK_IO_F_NOUNMAP`).
        public static let noUnmap = Self(rawValue: 1 << 1)
    }

    public var operation: Operation
    public var flags: Flags
    /// Byte offset and length on the device.
    public var offset: UInt64
    public var length: UInt32

    public init(_ operation: Operation, flags: Flags = [], offset: UInt64 = 0, length: UInt32 = 0) {
        self.operation = operation
        self.flags = flags
        self.offset = offset
        self.length = length
    }
}

/// What a ublk device serving an export should announce, so the kernel only sends
/// requests the server accepts.
public struct NBDDeviceCapabilities: Equatable, Hashable, Sendable {
    public var readOnly: Bool
    /// The server has a write-back cache: announce a volatile cache, forward FLUSH.
    public var volatileCache: Bool
    /// The server honours FUA (only with a volatile cache; otherwise the kernel emulates FUA with a flush).
    public var fua: Bool
    public var discard: Bool
    public var writeZeroes: Bool
    public var rotational: Bool
    /// At least 512 and at least the server's minimum block size.
    public var logicalBlockSize: UInt32
    /// The server's preferred block size, within [logical, 4096].
    public var physicalBlockSize: UInt32
    /// Largest READ or WRITE the server takes, a multiple of the logical block size, at most 32 MiB.
    public var maximumTransferBytes: UInt32
    /// Largest TRIM or WRITE_ZEROES: the request's 32-bit length, rounded down to the
    /// logical block size (a ublk request can be longer, so the device must announce this).
    public var maximumZeroingBytes: UInt32
}

extension NBDExport {
    /// Largest payload sent even when the server allows more: what interoperable clients use.
    public static let maximumTransferLimit: UInt32 = 32 << 20
    /// ublk's largest logical block size (one page).
    public static let maximumLogicalBlockSize: UInt32 = 4096

    /// The ublk attributes for this export; fails when its minimum block size is beyond what ublk serves.
    public func deviceCapabilities() throws(NBDError) -> NBDDeviceCapabilities {
        let sizes = blockSizes
        guard sizes.minimum <= Self.maximumLogicalBlockSize else {
            throw NBDError(.unusable, "export \(shownName) needs \(sizes.minimum)-byte blocks; ublk devices take at most "
                + "\(Self.maximumLogicalBlockSize)-byte blocks")
        }
        let logical = max(512, sizes.minimum)
        let writable = !flags.contains(.readOnly)
        let cache = writable && flags.contains(.sendFlush)
        let transfer = min(sizes.maximumPayload, Self.maximumTransferLimit) / logical * logical
        // ublk gives each tag a buffer of whole pages (ADD_DEV rounds the request size down
        // to one): an export that takes less than a page per request leaves it none.
        let page = UInt32(sysconf(Int32(_SC_PAGESIZE)))
        guard transfer >= page else {
            throw NBDError(.unusable, "export \(shownName) takes \(sizes.maximumPayload) bytes per request at most; "
                + "a ublk device sends requests of up to a page (\(page) bytes)")
        }
        return NBDDeviceCapabilities(
            readOnly: !writable, volatileCache: cache, fua: cache && flags.contains(.sendFUA),
            discard: writable && flags.contains(.sendTrim), writeZeroes: writable && flags.contains(.sendWriteZeroes),
            rotational: flags.contains(.rotational), logicalBlockSize: logical,
            physicalBlockSize: min(max(sizes.preferred, logical), Self.maximumLogicalBlockSize),
            maximumTransferBytes: max(transfer, logical), maximumZeroingBytes: UInt32.max / logical * logical)
    }

    /// The NBD request for a block request, or nil when this export cannot take it (the
    /// target then fails it with EOPNOTSUPP; with `deviceCapabilities` announced, the
    /// kernel does not send such requests).
    ///
    /// FUA is passed on only when the export has SEND_FUA; NOUNMAP becomes NO_HOLE.
    public func request(for block: BlockRequest, cookie: UInt64) -> NBDRequest? {
        let writable = !flags.contains(.readOnly)
        switch block.operation {
        case .read:
            return NBDRequest(.read, cookie: cookie, offset: block.offset, length: block.length)
        case .write where writable:
            let fua: NBDCommandFlags = block.flags.contains(.fua) && flags.contains(.sendFUA) ? .fua : []
            return NBDRequest(.write, flags: fua, cookie: cookie, offset: block.offset, length: block.length)
        case .flush where writable && flags.contains(.sendFlush):
            return NBDRequest(.flush, cookie: cookie)
        case .discard where writable && flags.contains(.sendTrim):
            return NBDRequest(.trim, cookie: cookie, offset: block.offset, length: block.length)
        case .writeZeroes where writable && flags.contains(.sendWriteZeroes):
            let noHole: NBDCommandFlags = block.flags.contains(.noUnmap) ? .noHole : []
            return NBDRequest(.writeZeroes, flags: noHole, cookie: cookie, offset: block.offset, length: block.length)
        case .write, .flush, .discard, .writeZeroes:
            return nil
        }
    }
}
