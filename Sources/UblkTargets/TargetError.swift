import Glibc
import UblkNBD
import UblkQueue
import UblkSystem

/// Why `auto` direct I/O fell back to buffered I/O (or `on` failed).
public enum DirectIOFallback: Equatable, Sendable, CustomStringConvertible {
    /// O_DIRECT needs I/O aligned to the backing's logical block.
    case misaligned(backingBlock: Int, blockSize: Int, offset: UInt64)
    /// The backing refused O_DIRECT (tmpfs, some network file systems).
    case refused(String, SystemError)

    public var description: String {
        switch self {
        case let .misaligned(backingBlock, blockSize, offset):
            "direct I/O needs \(backingBlock)-byte alignment, but the block size is \(blockSize) and the offset \(offset)"
        case let .refused(path, error):
            "\(path) cannot be opened with O_DIRECT (\(error.reason))"
        }
    }
}

/// Why a target could not be set up. The failing call and its errno are kept where
/// there was one; `description` is the one sentence for the user, saying what to do.
public enum TargetError: Error, Equatable, Sendable, CustomStringConvertible {
    case cannotOpen(String, SystemError)
    case isDirectory(String)
    case notFileOrDevice(String)
    case directIOUnavailable(DirectIOFallback)
    case notWritable(String, SystemError)
    case cannotMeasure(String, SystemError)
    case empty(String)
    case unsupportedBlockSize(Int)
    case offsetMisaligned(offset: UInt64, blockSize: Int)
    case offsetBeyondEnd(offset: UInt64, path: String, backingSize: UInt64)
    case sizeMisaligned(size: UInt64, blockSize: Int)
    /// A size limit that leaves not one block.
    case limitBelowBlock(size: UInt64, blockSize: Int)
    case sizeTooLarge(UInt64)
    case sizeBeyondEnd(size: UInt64, offset: UInt64, path: String, backingSize: UInt64)
    /// Less than one block in the backing after the offset (`offset` 0: in the whole file).
    case smallerThanBlock(String, blockSize: Int, offset: UInt64, left: UInt64)
    /// `ublk resize` without --size on a target with no backing to measure.
    case sizeRequired(String)
    case keyMissing
    case keyWithoutEncryption
    case keySizeMismatch(key: Int, configured: Int)
    case encryptionBlockSize(Int)
    /// dm-crypt refuses an IV offset that is not a whole number of encryption sectors.
    case skipMisaligned(skip: UInt64, blockSize: Int)
    /// The NBD export could not be reached, negotiated or served (its message says what to do).
    case nbd(NBDError)

    /// The system call that failed, if one did.
    public var systemError: SystemError? {
        switch self {
        case .cannotOpen(_, let error), .notWritable(_, let error), .cannotMeasure(_, let error): error
        case .directIOUnavailable(.refused(_, let error)): error
        default: nil
        }
    }

    public var description: String {
        switch self {
        case let .cannotOpen(path, error):
            switch error.errno {
            case ENOENT: "backing file \(path) does not exist: create it first (e.g. truncate -s 1G \(path.shellWord))"
            case EACCES, EPERM: "backing file \(path) is not readable: check its permissions"
            default: "cannot open backing file \(path): \(error.reason)"
            }
        case .isDirectory(let path): "backing file \(path) is a directory: give a regular file or a block device"
        case .notFileOrDevice(let path): "backing file \(path) is neither a regular file nor a block device"
        case .directIOUnavailable(let fallback): "\(fallback): use --direct-io off or auto"
        case let .notWritable(path, error):
            "backing file \(path) cannot be opened for writing (\(error.reason)), and --no-read-only (read-only = no) "
                + "asks for a writable device: make the backing writable, or leave that out for a read-only device"
        case let .cannotMeasure(path, error): "cannot read the size of \(path): \(error)"
        case .empty(let path): "backing file \(path) is empty: give it a size (e.g. truncate -s 1G \(path.shellWord))"
        case .unsupportedBlockSize(let size): "block size \(size) is not one of 512, 1024, 2048, 4096"
        case let .offsetMisaligned(offset, block):
            "an encrypted device starts at a whole \(block)-byte sector of its backing: offset \(offset) is not a multiple of \(block)"
        case let .offsetBeyondEnd(offset, path, backing):
            "offset \(offset) is beyond the end of \(path) (\(backing) bytes)"
        case let .sizeMisaligned(size, block):
            "size \(size) is not a positive multiple of the block size \(block): give one, e.g. \(max(size / UInt64(block), 1) * UInt64(block))"
        case let .limitBelowBlock(size, block): "--size \(size) is less than one \(block)-byte block: give at least \(block)"
        case .sizeTooLarge(let size): "size \(size) is more than 2^63 - 1 bytes, which no block device addresses: give a smaller size"
        case let .sizeBeyondEnd(size, offset, path, backing):
            "size \(size) at offset \(offset) goes beyond the end of \(path) (\(backing) bytes)"
        case let .smallerThanBlock(path, block, 0, _): "backing file \(path) is smaller than one \(block)-byte block"
        case let .smallerThanBlock(path, block, offset, left):
            "backing file \(path) holds \(left) bytes after --offset \(offset), less than one \(block)-byte block: give a smaller offset"
        case .sizeRequired(let name): "the \(name) target has no backing to take the size from: give --size"
        case .keyMissing: "an encrypted device needs its key: give --key-file PATH (or - for standard input)"
        case .keyWithoutEncryption: "a key was given for a device that is not encrypted: leave out --key-file"
        case let .keySizeMismatch(key, configured):
            "the key has \(key) bits but the device is set up for \(configured): give --key-size \(configured)"
        case .encryptionBlockSize(let size):
            "encryption works in 512- or 4096-byte sectors, not \(size): use --block-size 512 or 4096"
        case let .skipMisaligned(skip, block):
            "--skip \(skip) is not a multiple of \(block / 512) (\(block)-byte sectors): dm-crypt could not open the image; give a multiple of \(block / 512)"
        case .nbd(let error): error.message
        }
    }
}

extension String {
    /// The path as one word of a shell command the user can paste: as it is when only
    /// harmless characters make it up, else in single quotes (`'my disk.img'`).
    var shellWord: String {
        let plain = !isEmpty && unicodeScalars.allSatisfy { scalar in
            scalar.isASCII && (("a"..."z").contains(scalar) || ("A"..."Z").contains(scalar) || ("0"..."9").contains(scalar)
                               || "/._-+,:@%=".unicodeScalars.contains(scalar))
        }
        // (A relative path that starts with a dash would be taken for an option.)
        let word = hasPrefix("-") ? "./" + self : self
        return plain ? word : "'" + word.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "'\\''") + "'"
    }
}

extension TargetProperties {
    /// The note for a backing's tail that is no whole block, which the device leaves out, as
    /// losetup warns of it ("the end of the file will be ignored").
    static func unusedTailNote(_ bytes: UInt64, of backing: String, blockSize: Int, unit: String = "block") -> String {
        "the last \(bytes) bytes of \(backing) are not a whole \(blockSize)-byte \(unit) and stay unused"
    }
}
