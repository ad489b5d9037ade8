import ArgumentParser
import UblkControl
import UblkServer

extension Ublk {
    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Give a device the backing's current size up to its size limit (as losetup -c does), or --size BYTES (UBLK_F_UPDATE_SIZE, Linux 6.16+).",
            discussion: """
            Grow the backing first (truncate -s, lvextend), then resize the device, then the \
            file system on it (resize2fs, xfs_growfs). Shrinking below a file system that is \
            mounted is the administrator's business, as with loop devices.
            """)

        @OptionGroup var device: OneDevice

        @Option(name: .long, help: "The new size in bytes, a multiple of the block size, within the backing. It becomes the device's size limit; 0 lifts a loop device's limit (all the backing holds after --offset). Default: all the backing holds after --offset, up to the limit (the add's --size, or the last resize --size). \(ByteCount.suffixHelp)",
                transform: ByteCount.parse)
        var size: ByteCount?

        func validate() throws {
            guard Ublk.validating else { return }
            _ = try device.required()
        }

        func run() throws {
            let id = try device.required()
            let control = try ControlDevice()
            _ = try control.deviceInfo(id)
            guard control.features?.contains(.updateSize) == true else { throw ServerError.noUpdateSize }
            try ServedDevice.requireServer(id)
            let bytes = try ServerControl.request(id, size.map { "resize \($0.value)" } ?? "resize")
            print("/dev/ublkb\(id): \(bytes) bytes")
        }
    }
}

/// A device and the server that runs it, for the commands that ask the server.
enum ServedDevice {
    /// The live server's pid, or a one-line error saying what to do.
    @discardableResult
    static func requireServer(_ id: UInt32) throws -> Int32 {
        guard let record = RuntimeDirectory.load(id), RuntimeDirectory.isAlive(record.pid) else {
            throw CLIError("device \(id) has no running server: recover it first (ublk recover --id \(id)) or delete it")
        }
        return record.pid
    }
}
