import CUblk
import Glibc

/// An open file descriptor, closed when its owner goes away.
///
/// `~Copyable` so that exactly one owner closes it: a copy that outlived the
/// original would otherwise use a number the kernel may have handed out again.
public struct FileDescriptor: ~Copyable, Sendable {
    /// The descriptor number, for calls that need it (io_uring registration, ioctl).
    public let rawValue: Int32

    /// Takes ownership of an already open descriptor.
    public init(adopting rawValue: Int32) {
        self.rawValue = rawValue
    }

    /// Opens `path` with `open(2)` flags.
    public init(path: String, flags: Int32, mode: mode_t = 0) throws(SystemError) {
        rawValue = try Syscalls.open(path, flags | O_CLOEXEC, mode)
    }

    deinit { Syscalls.close(rawValue) }

    /// The read end of a new pipe that holds `bytes` and then ends (its write end is
    /// closed), numbered `lowest` or above, close-on-exec. At most `PIPE_BUF` bytes: they are
    /// written at once, never blocking, and never touch a file.
    public static func pipe(holding bytes: UnsafeRawBufferPointer, lowest: Int32 = 0) throws(SystemError) -> FileDescriptor {
        precondition(bytes.count <= Int(PIPE_BUF))
        let (readEnd, writeEnd) = try Syscalls.pipe()
        var reader = FileDescriptor(adopting: readEnd)
        do {
            let writer = FileDescriptor(adopting: writeEnd)
            let written = try Syscalls.write(writer.rawValue, bytes)
            guard written == bytes.count else { throw SystemError("write to a pipe", errno: EAGAIN) }
        }
        if readEnd < lowest {
            let moved = fcntl(readEnd, F_DUPFD_CLOEXEC, lowest)
            guard moved >= 0 else { throw SystemError("fcntl F_DUPFD_CLOEXEC", errno: errno) }
            reader = FileDescriptor(adopting: moved)
        }
        return reader
    }

    /// The `O_DIRECT` flag (GNU-only, so hidden from Swift's Glibc).
    public static var directIOFlag: Int32 { cublk_o_direct() }

    /// `fstat(2)`.
    public func status() throws(SystemError) -> FileStatus { FileStatus(try Syscalls.fstat(rawValue)) }

    /// Whether the file lives on tmpfs (its `fstatfs` magic), which zeroes no range in place.
    public var isOnTmpfs: Bool { (try? Syscalls.fileSystemType(rawValue)) == 0x0102_1994 }

    /// `fsync(2)`.
    public func sync() throws(SystemError) { try Syscalls.fsync(rawValue) }

    /// `fallocate(2)`; `mode` takes `FALLOC_FL_*`.
    public func allocate(mode: Int32, offset: Int64, length: Int64) throws(SystemError) {
        try Syscalls.fallocate(rawValue, mode: mode, offset: offset, length: length)
    }

    /// `pread(2)`: may return fewer bytes than asked.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(SystemError) -> Int {
        try Syscalls.pread(rawValue, buffer, offset: offset)
    }

    /// `pwrite(2)`: may write fewer bytes than asked.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws(SystemError) -> Int {
        try Syscalls.pwrite(rawValue, buffer, offset: offset)
    }

    /// Size in bytes of a block device (`BLKGETSIZE64`).
    public func blockDeviceSize() throws(SystemError) -> UInt64 { try Syscalls.blockDeviceSize(rawValue) }

    /// The file offset (and length) alignment O_DIRECT on `path` needs, as statx reports it
    /// (STATX_DIOALIGN, Linux 6.1+; 0: the file takes no direct I/O); nil where it does not.
    public static func directIOAlignment(path: String) -> Int? { Syscalls.directIOAlignment(path) }

    /// Has the kernel read this disk's partition table again and make its partitions'
    /// devices anew (`BLKRRPART`); EBUSY while a partition is open.
    public func rereadPartitions() throws(SystemError) { try Syscalls.rereadPartitions(rawValue) }

    /// Logical and physical sector sizes of a block device (`BLKSSZGET`, `BLKPBSZGET`).
    public func blockDeviceSectorSizes() throws(SystemError) -> (logical: UInt32, physical: UInt32) {
        try Syscalls.blockDeviceSectorSizes(rawValue)
    }
}

/// The parts of `struct stat` the project uses.
public struct FileStatus: Sendable {
    public var mode: mode_t
    public var size: Int64
    /// Bytes actually allocated (st_blocks × 512): shrinks when holes are punched.
    public var allocatedBytes: Int64
    public var blockSize: Int
    /// Device holding the file.
    public var device: UInt64
    /// The device itself, for block and character devices.
    public var rdev: UInt64
    public var inode: UInt64

    init(_ st: stat) {
        mode = st.st_mode
        size = Int64(st.st_size)
        allocatedBytes = Int64(st.st_blocks) * 512
        blockSize = Int(st.st_blksize)
        device = UInt64(st.st_dev)
        rdev = UInt64(st.st_rdev)
        inode = UInt64(st.st_ino)
    }

    /// Which file this is, whatever path names it: the device number of a block device,
    /// else the file system's device and the inode.
    public var identity: FileIdentity {
        isBlockDevice ? FileIdentity(device: rdev, inode: 0) : FileIdentity(device: device, inode: inode)
    }

    /// The status of open descriptor `fd`, which stays open (one this process does not own,
    /// as standard input).
    public static func of(descriptor fd: Int32) throws(SystemError) -> FileStatus { FileStatus(try Syscalls.fstat(fd)) }

    public var isRegularFile: Bool { (mode & S_IFMT) == S_IFREG }
    public var isBlockDevice: Bool { (mode & S_IFMT) == S_IFBLK }
    public var isDirectory: Bool { (mode & S_IFMT) == S_IFDIR }
}

/// A file as the kernel knows it (`FileStatus.identity`): the same file under any path, and
/// another file under the same path once it was replaced, moved or re-pointed (a symlink).
public struct FileIdentity: Sendable, Equatable, Codable {
    public var device: UInt64
    public var inode: UInt64

    public init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }

    /// The identity of the file `path` names now (following symlinks), or the errno of stat.
    public static func of(path: String) -> Result<FileIdentity, SystemError> {
        Result { () throws(SystemError) in FileStatus(try Syscalls.status(ofPath: path)).identity }
    }
}
