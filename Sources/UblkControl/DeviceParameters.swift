import CUblk

/// The block-device limits and attributes a server announces with SET_PARAMS
/// (`struct ublk_params`: basic, discard; devt is filled in by the kernel).
public struct DeviceParameters: Sendable, Equatable {
    /// Size of the device in 512-byte sectors.
    public var sectors: UInt64
    /// log2 of the logical block size (9...12).
    public var logicalBlockShift: UInt8 = 9
    /// log2 of the physical block size (>= logical).
    public var physicalBlockShift: UInt8 = 12
    public var ioOptimalShift: UInt8 = 12
    public var ioMinimalShift: UInt8 = 9
    /// Largest request in sectors; at most the per-tag buffer.
    public var maxSectors: UInt32
    public var readOnly = false
    public var rotational = false
    /// The device has a write cache: the block layer sends FLUSH, and `write_cache` says "write back".
    public var volatileCache = true
    /// The device honours FUA writes.
    public var fua = true
    /// Discard and write-zeroes limits; nil when the backing cannot punch holes.
    public var discard: Discard?
    /// The alignment of request buffers in memory, as a mask (511: 512 bytes); nil leaves
    /// ublk_drv's 4 bytes. With zero copy a request's own pages go to the backing: an
    /// O_DIRECT backing needs them aligned as the block layer aligns them for loop (511).
    public var dmaAlignment: UInt32?
    /// Device numbers of /dev/ublkcN and /dev/ublkbN (GET_PARAMS only).
    public private(set) var deviceNumbers: DeviceNumbers?

    public struct Discard: Sendable, Equatable {
        public var granularity: UInt32
        public var alignment: UInt32 = 0
        public var maxDiscardSectors: UInt32
        public var maxWriteZeroesSectors: UInt32
        public var maxSegments: UInt16 = 1

        public init(granularity: UInt32, maxDiscardSectors: UInt32, maxWriteZeroesSectors: UInt32) {
            self.granularity = granularity
            self.maxDiscardSectors = maxDiscardSectors
            self.maxWriteZeroesSectors = maxWriteZeroesSectors
        }
    }

    public struct DeviceNumbers: Sendable, Equatable {
        public var characterMajor, characterMinor, diskMajor, diskMinor: UInt32
    }

    public init(sectors: UInt64, maxSectors: UInt32) {
        self.sectors = sectors
        self.maxSectors = maxSectors
    }

    /// Logical block size in bytes.
    public var logicalBlockSize: Int { 1 << Int(logicalBlockShift) }

    public init(raw: ublk_params) {
        let basic = raw.basic
        sectors = basic.dev_sectors
        logicalBlockShift = basic.logical_bs_shift
        physicalBlockShift = basic.physical_bs_shift
        ioOptimalShift = basic.io_opt_shift
        ioMinimalShift = basic.io_min_shift
        maxSectors = basic.max_sectors
        readOnly = basic.attrs & UInt32(UBLK_ATTR_READ_ONLY) != 0
        rotational = basic.attrs & UInt32(UBLK_ATTR_ROTATIONAL) != 0
        volatileCache = basic.attrs & UInt32(UBLK_ATTR_VOLATILE_CACHE) != 0
        fua = basic.attrs & UInt32(UBLK_ATTR_FUA) != 0
        if raw.types & UInt32(UBLK_PARAM_TYPE_DISCARD) != 0 {
            var discard = Discard(granularity: raw.discard.discard_granularity,
                                  maxDiscardSectors: raw.discard.max_discard_sectors,
                                  maxWriteZeroesSectors: raw.discard.max_write_zeroes_sectors)
            discard.alignment = raw.discard.discard_alignment
            discard.maxSegments = raw.discard.max_discard_segments
            self.discard = discard
        }
        if raw.types & UInt32(UBLK_PARAM_TYPE_DMA_ALIGN) != 0 { dmaAlignment = raw.dma.alignment }
        if raw.types & UInt32(UBLK_PARAM_TYPE_DEVT) != 0 {
            deviceNumbers = DeviceNumbers(characterMajor: raw.devt.char_major, characterMinor: raw.devt.char_minor,
                                          diskMajor: raw.devt.disk_major, diskMinor: raw.devt.disk_minor)
        }
    }

    public var raw: ublk_params {
        var raw = ublk_params()
        raw.len = UInt32(MemoryLayout<ublk_params>.size)
        raw.types = UInt32(UBLK_PARAM_TYPE_BASIC)
        var attrs: Int32 = 0
        if readOnly { attrs |= UBLK_ATTR_READ_ONLY }
        if rotational { attrs |= UBLK_ATTR_ROTATIONAL }
        if volatileCache { attrs |= UBLK_ATTR_VOLATILE_CACHE }
        if fua { attrs |= UBLK_ATTR_FUA }
        raw.basic.attrs = UInt32(attrs)
        raw.basic.logical_bs_shift = logicalBlockShift
        raw.basic.physical_bs_shift = physicalBlockShift
        raw.basic.io_opt_shift = ioOptimalShift
        raw.basic.io_min_shift = ioMinimalShift
        raw.basic.max_sectors = maxSectors
        raw.basic.dev_sectors = sectors
        if let discard {
            raw.types |= UInt32(UBLK_PARAM_TYPE_DISCARD)
            raw.discard.discard_granularity = discard.granularity
            raw.discard.discard_alignment = discard.alignment
            raw.discard.max_discard_sectors = discard.maxDiscardSectors
            raw.discard.max_write_zeroes_sectors = discard.maxWriteZeroesSectors
            raw.discard.max_discard_segments = discard.maxSegments
        }
        if let dmaAlignment {
            raw.types |= UInt32(UBLK_PARAM_TYPE_DMA_ALIGN)
            raw.dma.alignment = dmaAlignment
        }
        return raw
    }
}
