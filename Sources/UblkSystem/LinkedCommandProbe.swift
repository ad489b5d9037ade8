import CLiburing
import Glibc

extension IORing {
    /// Whether this kernel's io_uring copies a linked URING_CMD's SQE when it is submitted.
    ///
    /// A command linked behind another operation (`linkLastPrepared`) starts only once that
    /// operation completed, long after `io_uring_enter` returned and its SQE slot was handed
    /// out again. Some kernels (6.12 among them) read a URING_CMD's command area from the
    /// slot only when the command starts, so a linked ublk commit would run with whatever
    /// the slot holds by then: another tag, another buffer. Where that is so, queues do not
    /// link their commits. Probed once per process, not inferred from a version number:
    /// a socket's GETSOCKOPT command (which also reads its arguments from the command's
    /// SQE when it starts) is linked behind a read of an empty pipe, its result pointer
    /// rewritten in the slot after the submit, and the pipe then written: the command must
    /// write where it was submitted to write. False when the probe cannot run (no socket
    /// commands: before Linux 6.7).
    public static let copiesLinkedCommands: Bool = (try? probeLinkedCommandCopy()) ?? false

    /// `SOCKET_URING_OP_GETSOCKOPT` from linux/io_uring.h (6.7+).
    static let socketGetOption: UInt32 = 2

    static func probeLinkedCommandCopy() throws -> Bool {
        let (readEnd, writeEnd) = try Syscalls.pipe()
        let socket = try Syscalls.datagramSocket()
        // [0]: the pipe's byte; [1]: where the command was submitted to write SO_TYPE;
        // [2]: where the slot says once reused. Freed after the ring (`linkedCommand`).
        let scratch = UnsafeMutablePointer<Int32>.allocate(capacity: 3)
        scratch.initialize(repeating: -1, count: 3)
        defer {
            [readEnd, writeEnd, socket].forEach(Syscalls.close)
            scratch.deallocate()
        }
        let result = try linkedCommand(readEnd: readEnd, writeEnd: writeEnd, socket: socket, scratch: scratch)
        return result >= 0 && scratch[1] > 0 && scratch[2] == -1
    }

    /// The probe's ring work; returns the command's result (-1 when it never completed).
    private static func linkedCommand(readEnd: Int32, writeEnd: Int32, socket: Int32,
                                      scratch: UnsafeMutablePointer<Int32>) throws -> Int32 {
        let ring = try IORing(entries: 4, preferredFlags: IORing.singleThreadFlags)
        io_uring_prep_read(try ring.handle.prepare(userData: 1, zeroed: false), readEnd, scratch, 1, 0)
        guard ring.handle.linkLastPrepared() else { return -1 }
        let command = try ring.handle.prepare(userData: 2)
        getSocketType(command, socket: socket, into: scratch + 1)
        try ring.handle.submit()
        // The slot is the application's again: what a later SQE would write there.
        command.pointee.addr3 = UInt64(UInt(bitPattern: scratch + 2))
        _ = try withUnsafeBytes(of: UInt8(1)) { try Syscalls.write(writeEnd, $0) }
        var commandResult: Int32?
        for _ in 0..<100 where commandResult == nil {
            try ring.handle.submit(waitingFor: 1)
            ring.handle.reap { userData, result in if userData == 2 { commandResult = result } }
        }
        return commandResult ?? -1
    }

    /// A URING_CMD getsockopt(SOL_SOCKET, SO_TYPE) into `value`, laid out as linux/io_uring.h
    /// 6.7+ does (Debian 12's liburing headers predate these fields): `cmd_op` at byte 8,
    /// `level` and `optname` at 16 and 20, `optlen` at 44, `optval` at 48.
    static func getSocketType(_ sqe: UnsafeMutablePointer<io_uring_sqe>, socket: Int32, into value: UnsafeMutablePointer<Int32>) {
        sqe.pointee.opcode = UInt8(IORING_OP_URING_CMD.rawValue)
        sqe.pointee.fd = socket
        sqe.pointee.cmd_op = socketGetOption
        let raw = UnsafeMutableRawPointer(sqe)
        raw.storeBytes(of: UInt32(SOL_SOCKET), toByteOffset: 16, as: UInt32.self)
        raw.storeBytes(of: UInt32(SO_TYPE), toByteOffset: 20, as: UInt32.self)
        raw.storeBytes(of: UInt32(MemoryLayout<Int32>.size), toByteOffset: 44, as: UInt32.self)
        raw.storeBytes(of: UInt64(UInt(bitPattern: value)), toByteOffset: 48, as: UInt64.self)
    }
}
