import CUblk
import Glibc
import UblkSystem

/// A queue's array of I/O descriptors, mmapped read-only from /dev/ublkcN.
///
/// The driver writes a tag's descriptor before completing that tag's fetch, and
/// does not touch it again until the tag is committed, so reading it after the CQE
/// and before the commit sees one consistent request. Owned (`~Copyable`) by the
/// queue: unmapped exactly once, after the last read.
public struct DescriptorArray: ~Copyable {
    private let region: MappedRegion
    public let depth: Int

    /// Where queue `queueID`'s array lives in the character device's mmap space: queues
    /// are spaced by the array size of the deepest possible queue, page-aligned.
    public static func offset(queueID: Int) -> Int64 {
        let stride = MappedRegion.roundUp(Int(UBLK_MAX_QUEUE_DEPTH) * MemoryLayout<ublksrv_io_desc>.size,
                                          to: MappedRegion.pageSize)
        return Int64(UBLKSRV_CMD_BUF_OFFSET) + Int64(queueID) * Int64(stride)
    }

    public init(characterDevice fd: Int32, queueID: Int, depth: Int) throws(SystemError) {
        let length = MappedRegion.roundUp(depth * MemoryLayout<ublksrv_io_desc>.size, to: MappedRegion.pageSize)
        do {
            region = try MappedRegion(fd: fd, length: length, offset: Self.offset(queueID: queueID))
        } catch {
            throw SystemError("mmap descriptors of queue \(queueID)", errno: error.errno)
        }
        self.depth = depth
    }

    /// The raw descriptor of `tag` (a copy: the shared memory is read once).
    @inlinable
    public subscript(tag: Int) -> ublksrv_io_desc {
        precondition(tag >= 0 && tag < depth)
        return rawBase.load(fromByteOffset: tag * MemoryLayout<ublksrv_io_desc>.stride, as: ublksrv_io_desc.self)
    }

    @usableFromInline var rawBase: UnsafeRawPointer { UnsafeRawPointer(region.address) }
}
