import Glibc

/// A shared memory mapping, unmapped when its owner goes away.
///
/// The ublk descriptor array is memory the kernel writes and we only read; the
/// owner is `~Copyable` so the mapping cannot outlive the one place that unmaps it.
public struct MappedRegion: ~Copyable {
    public let address: UnsafeMutableRawPointer
    public let length: Int

    /// `mmap(2)` of `length` bytes of `fd` at `offset`.
    public init(fd: Int32, length: Int, offset: Int64, protection: Int32 = PROT_READ,
                flags: Int32 = MAP_SHARED | MAP_POPULATE) throws(SystemError) {
        address = try Syscalls.mmap(length: length, protection: protection, flags: flags, fd: fd, offset: offset)
        self.length = length
    }

    deinit { Syscalls.munmap(address, length: length) }

    /// The page size, which mapping lengths and offsets are rounded to.
    public static var pageSize: Int { Syscalls.pageSize }

    /// `value` rounded up to a multiple of `alignment` (a power of two).
    public static func roundUp(_ value: Int, to alignment: Int) -> Int {
        (value + alignment - 1) & ~(alignment - 1)
    }
}

/// Page-aligned, zero-filled memory for I/O buffers, released when its owner goes away.
///
/// The queue runtime gives one slice per tag to the kernel (with FETCH) and to the
/// backing file (with read/write), so it must stay put for the queue's lifetime and
/// be aligned for O_DIRECT. An anonymous mapping is both, and its pages are only
/// allocated when first touched: a deep queue of large buffers costs what it uses.
public struct AlignedBuffer: ~Copyable {
    private let region: MappedRegion
    public var base: UnsafeMutableRawPointer { region.address }
    public let count: Int

    public init(count: Int) throws(SystemError) {
        let length = MappedRegion.roundUp(max(count, 1), to: MappedRegion.pageSize)
        region = try MappedRegion(fd: -1, length: length, offset: 0, protection: PROT_READ | PROT_WRITE,
                                  flags: MAP_PRIVATE | MAP_ANONYMOUS)
        self.count = count
    }
}
