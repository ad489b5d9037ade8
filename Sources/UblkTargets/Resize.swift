import UblkQueue
import UblkSystem

/// A target whose device can change size while it is served (`ublk resize`).
public protocol ResizableTarget: Target {
    /// The device size in bytes to take now: `requested`, or (nil) everything the backing
    /// holds, as `losetup -c` does. A multiple of the logical block size, never beyond the
    /// backing; the error says what to do.
    func resizedSize(_ requested: UInt64?) throws -> UInt64
}

extension ResizableTarget {
    /// Checks `requested` against the block size and what is `available`; nil: all of it.
    func fitted(_ requested: UInt64?, available: UInt64, beyond: @autoclosure () -> String) throws -> UInt64 {
        let block = UInt64(properties.logicalBlockSize)
        guard let requested else {
            let size = available - available % block
            if size == 0 { throw LoopTargetError("\(beyond()) holds less than one \(block)-byte block") }
            return size
        }
        if requested == 0 || requested % block != 0 {
            throw LoopTargetError("size \(requested) is not a positive multiple of the block size \(block)")
        }
        if requested > available {
            throw LoopTargetError("size \(requested) goes beyond \(beyond()) (\(available) bytes): extend it first")
        }
        return requested
    }
}

extension LoopTarget: ResizableTarget {
    public func resizedSize(_ requested: UInt64?) throws -> UInt64 {
        let status = try file.status()
        let backing = status.isBlockDevice ? try file.blockDeviceSize() : UInt64(status.size)
        let path = configuration.path
        let offset = configuration.offset
        guard backing > offset else {
            throw LoopTargetError("\(path) (\(backing) bytes) ends before the device's offset \(offset): extend it first")
        }
        let place = offset == 0 ? path : "\(path) after offset \(offset)"
        return try fitted(requested, available: backing - offset, beyond: place)
    }
}

extension NullTarget: ResizableTarget {
    public func resizedSize(_ requested: UInt64?) throws -> UInt64 {
        guard let requested else { throw LoopTargetError("the null target has no backing to take the size from: give --size") }
        return try fitted(requested, available: UInt64.max, beyond: "the null target")
    }
}
