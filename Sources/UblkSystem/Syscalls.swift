import CUblk
import Glibc

// Every raw system call the project makes outside io_uring lives in this file, so
// error handling (EINTR, errno capture) is written once.

enum Syscalls {
    static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0) throws(SystemError) -> Int32 {
        try retryingOnInterrupt("open \(path)") { Glibc.open(path, flags, mode) }
    }

    static func close(_ fd: Int32) {
        // Linux releases the descriptor even when close reports EINTR: never retry.
        _ = Glibc.close(fd)
    }

    static func fstat(_ fd: Int32) throws(SystemError) -> stat {
        var st = stat()
        _ = try retryingOnInterrupt("fstat") { Glibc.fstat(fd, &st) }
        return st
    }

    static func fsync(_ fd: Int32) throws(SystemError) {
        _ = try retryingOnInterrupt("fsync") { Glibc.fsync(fd) }
    }

    static func fallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) throws(SystemError) {
        _ = try retryingOnInterrupt("fallocate") { cublk_fallocate(fd, mode, offset, length) }
    }

    static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws(SystemError) -> Int {
        try retryingOnInterrupt("pread") { Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: Int64) throws(SystemError) -> Int {
        try retryingOnInterrupt("pwrite") { Glibc.pwrite(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    static func mmap(length: Int, protection: Int32, flags: Int32, fd: Int32, offset: Int64) throws(SystemError) -> UnsafeMutableRawPointer {
        guard let address = Glibc.mmap(nil, length, protection, flags, fd, off_t(offset)),
              address != MAP_FAILED else {
            throw SystemError.last("mmap")
        }
        return address
    }

    static func munmap(_ address: UnsafeMutableRawPointer, length: Int) {
        _ = Glibc.munmap(address, length)
    }

    static func blockDeviceSize(_ fd: Int32) throws(SystemError) -> UInt64 {
        var bytes: UInt64 = 0
        let result = cublk_block_device_size(fd, &bytes)
        if result < 0 { throw SystemError("ioctl BLKGETSIZE64", errno: result) }
        return bytes
    }

    static func blockDeviceSectorSizes(_ fd: Int32) throws(SystemError) -> (logical: UInt32, physical: UInt32) {
        var logical: UInt32 = 0, physical: UInt32 = 0
        let result = cublk_block_device_sector_sizes(fd, &logical, &physical)
        if result < 0 { throw SystemError("ioctl BLKSSZGET", errno: result) }
        return (logical, physical)
    }

    static var pageSize: Int { Int(sysconf(Int32(_SC_PAGESIZE))) }
}

extension Syscalls {
    static func rename(_ from: String, _ to: String) throws(SystemError) {
        _ = try retryingOnInterrupt("rename \(from)") { Glibc.rename(from, to) }
    }

    static func unlink(_ path: String) {
        _ = Glibc.unlink(path)
    }

    static func mkdir(_ path: String, _ mode: mode_t) {
        _ = Glibc.mkdir(path, mode)
    }

    static func directoryEntries(_ path: String) throws(SystemError) -> [String] {
        guard let dir = opendir(path) else { throw SystemError.last("opendir \(path)") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}
