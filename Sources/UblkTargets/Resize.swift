import UblkQueue
import UblkSystem

/// A target whose device can change size while it is served (`ublk resize`).
public protocol ResizableTarget: Target {
    /// The device size in bytes to take now: `requested`, or (nil) everything the backing
    /// holds up to `limit`, the device's size limit (its `--size`, or the last size asked
    /// for), as `losetup -c` keeps `--sizelimit`. A multiple of the logical block size,
    /// never beyond the backing; the error says what to do. With it the limit the device
    /// keeps from now on.
    func resizedSize(_ requested: UInt64?, limit: UInt64?) throws(TargetError) -> (size: UInt64, limit: UInt64?)
}

extension LoopTarget: ResizableTarget {
    public func resizedSize(_ requested: UInt64?, limit: UInt64?) throws(TargetError) -> (size: UInt64, limit: UInt64?) {
        let path = configuration.path
        let backing: UInt64
        do {
            let status = try file.status()
            backing = status.isBlockDevice ? try file.blockDeviceSize() : UInt64(status.size)
        } catch { throw .cannotMeasure(path, error) }
        let offset = configuration.offset
        guard backing > offset else { throw .offsetBeyondEnd(offset: offset, path: path, backingSize: backing) }
        let block = UInt64(properties.logicalBlockSize)
        // 0 lifts the limit (as `add --size 0` sets none): all the backing holds after the offset.
        let limit = requested == 0 ? nil : limit
        guard let requested, requested != 0 else {
            let room = min(backing - offset, limit ?? .max)
            let size = room - room % block
            if size == 0 { throw .smallerThanBlock(path, blockSize: Int(block), offset: offset, left: backing - offset) }
            return (size, limit)
        }
        if requested % block != 0 { throw .sizeMisaligned(size: requested, blockSize: Int(block)) }
        if requested > backing - offset {
            throw .sizeBeyondEnd(size: requested, offset: offset, path: path, backingSize: backing)
        }
        return (requested, requested)
    }
}

extension NullTarget: ResizableTarget {
    public func resizedSize(_ requested: UInt64?, limit: UInt64?) throws(TargetError) -> (size: UInt64, limit: UInt64?) {
        guard let requested else { throw .sizeRequired(name) }
        let block = UInt64(properties.logicalBlockSize)
        if requested == 0 || requested % block != 0 { throw .sizeMisaligned(size: requested, blockSize: Int(block)) }
        if requested > UInt64(Int64.max) { throw .sizeTooLarge(requested) }
        return (requested, requested)
    }
}
