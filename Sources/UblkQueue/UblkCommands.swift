import CUblk
import UblkSystem

/// The ublk I/O commands a queue sends on /dev/ublkcN.
public enum IOCommand: UInt32, Sendable {
    case fetch = 0x20
    case commitAndFetch = 0x21

    public var opcode: UblkOpcode {
        UblkOpcode(number: rawValue, direction: .readWrite, payloadSize: MemoryLayout<ublksrv_io_cmd>.size)
    }
}

/// Requests from the ublk driver: FETCH_REQ and COMMIT_AND_FETCH_REQ as URING_CMDs on
/// /dev/ublkcN (fixed file 0), and the queue's descriptor array the driver fills.
public final class UblkCommands: CommandSource {
    @usableFromInline let descriptors: DescriptorArray
    @usableFromInline let queueID: UInt16
    @usableFromInline let fetchOpcode: UInt32
    @usableFromInline let commitOpcode: UInt32

    public init(characterDevice: Int32, queueID: UInt16, depth: Int, encoding: OpcodeEncoding) throws(SystemError) {
        descriptors = try DescriptorArray(characterDevice: characterDevice, queueID: Int(queueID), depth: depth)
        self.queueID = queueID
        fetchOpcode = IOCommand.fetch.opcode.encoded(encoding)
        commitOpcode = IOCommand.commitAndFetch.opcode.encoded(encoding)
    }

    @inlinable
    public func fetch(_ request: IORequest, _ ring: IORing.Handle) throws(SystemError) {
        try send(fetchOpcode, request, result: 0, ring)
    }

    @inlinable
    public func descriptor(tag: Int) -> ublksrv_io_desc { descriptors[tag] }

    @inlinable
    public func commit(_ request: IORequest, result: Int32, _ ring: IORing.Handle) throws(SystemError) {
        try send(commitOpcode, request, result: result, ring)
    }

    /// The 16-byte `ublksrv_io_cmd`, written straight into the SQE's command area.
    @inlinable
    func send(_ opcode: UInt32, _ request: IORequest, result: Int32, _ ring: IORing.Handle) throws(SystemError) {
        let command = ublksrv_io_cmd(q_id: queueID, tag: request.tag, result: result,
                                     addr: UInt64(UInt(bitPattern: request.buffer)))
        try ring.prepareCommand(fd: 0, fixedFile: true, opcode: opcode, userData: UserData(.command, tag: request.tag).rawValue)
            .storeBytes(of: command, as: ublksrv_io_cmd.self)
    }
}
