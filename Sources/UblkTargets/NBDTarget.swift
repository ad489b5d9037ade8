import Glibc
import Synchronization
import UblkNBD
import UblkQueue
import UblkSystem

/// An NBD export to serve as a device (`ublk add --target nbd --uri ...`).
public struct NBDConfiguration: Sendable, Equatable, Codable {
    /// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    public var uri: String
    /// Refuse writes even when the export takes them.
    public var readOnly = false
    /// A writable device or none (`--no-read-only`): a read-only export is refused rather
    /// than served read-only (as it is when nothing is said, with a note).
    public var writableRequired: Bool?
    /// Seconds I/O waits for a dropped connection to come back before failing with EIO.
    public var reconnectTimeout = NBDConfiguration.defaultReconnectTimeout

    public static let defaultReconnectTimeout = 30

    public init(uri: String) { self.uri = uri }
}

/// A block device backed by an NBD export: each queue has its own connection (one
/// queue only, unless the server allows several connections with CAN_MULTI_CONN),
/// on which requests and replies travel through the queue's ring (`NBDQueueHandler`).
///
/// The handshake is done here, blocking, before the device exists: an unreachable
/// server or an unknown export fails `ublk add` with one line and leaves no device.
public final class NBDTarget: SpecifiedTarget {
    public let name = "nbd"
    public let configuration: NBDConfiguration
    public let address: NBDAddress
    /// What the first handshake agreed; later connections must offer the same (`replacementProblem`).
    public let export: NBDExport
    public let properties: TargetProperties
    public let fixedFiles: [Int32] = []
    /// The least time requests wait on a connection on which nothing moves before it counts
    /// as lost (`NBDQueueHandler.watchdogFired`), however short the reconnect timeout: a
    /// server that takes long over a FLUSH or a large transfer is slow, not gone. (Tests
    /// shorten it.)
    public let minimumSilence: Duration
    /// Raised by `stopRequested`; each queue handler polls it.
    let stopping: Latch
    /// How long queues stay in stopping mode: a stop that does not come (STOP_DEV failed,
    /// `ublk del` interrupted) must not leave the device without reconnects. (Tests shorten it.)
    let stopExpiry: Duration
    /// Queue handlers whose next FLUSH must fail (`NBDQueueHandler.lostWrites`).
    let lossPending = Atomic<Int>(0)
    /// Queue handlers that ended with answered writes no FLUSH covered: `sync` sends one.
    let unflushed = Atomic<Int>(0)
    /// Set by `writesWereLost`: every queue handler starts with a loss to report.
    let lossInherited = Atomic<Bool>(false)
    /// The first connection, kept for the first queue handler that asks.
    private let firstSocket: Mutex<FileDescriptor?>

    public init(_ configuration: NBDConfiguration, minimumSilence: Duration = .seconds(30),
                stopExpiry: Duration = .seconds(30)) throws(TargetError) {
        self.configuration = configuration
        self.minimumSilence = minimumSilence
        self.stopExpiry = stopExpiry
        guard configuration.reconnectTimeout >= 0 else { throw .nbd(Self.badTimeout(configuration.reconnectTimeout)) }
        do { stopping = try Latch() } catch { throw .nbd(NBDError(.connect, "cannot make a pipe: \(error)")) }
        do throws(NBDError) {
            address = try NBDAddress(uri: configuration.uri)
            let connection = try NBDClient.connect(to: address)
            export = connection.export
            properties = try Self.properties(of: export, readOnly: configuration.readOnly)
            if configuration.writableRequired == true && export.flags.contains(.readOnly) {
                throw NBDError(.refused, "the export at \(configuration.uri) is read-only (the server says so), and --no-read-only (read-only = no) asks for a writable device: make the export writable, or leave that out for a read-only device")
            }
            firstSocket = Mutex(connection.takeSocket())
        } catch {
            throw .nbd(error)
        }
    }

    static func badTimeout(_ seconds: Int) -> NBDError {
        NBDError(.badURI, "--reconnect-timeout \(seconds) is negative: give seconds, 0 or more")
    }

    /// The device's attributes from the export's flags and block sizes.
    static func properties(of export: NBDExport, readOnly: Bool) throws(NBDError) -> TargetProperties {
        let capabilities = try export.deviceCapabilities()
        let logical = UInt64(capabilities.logicalBlockSize)
        let size = export.size / logical * logical
        guard size > 0 else {
            throw NBDError(.unusable, "export \(export.shownName) is smaller than one \(logical)-byte block: give it a size")
        }
        var properties = TargetProperties(size: size)
        properties.logicalBlockSize = Int(capabilities.logicalBlockSize)
        properties.physicalBlockSize = Int(capabilities.physicalBlockSize)
        properties.readOnly = readOnly || capabilities.readOnly
        properties.rotational = capabilities.rotational
        // A read-only device writes nothing to flush: a cache announced would only get FLUSHes refused.
        properties.volatileCache = !properties.readOnly && capabilities.volatileCache
        properties.supportsFUA = properties.volatileCache && capabilities.fua
        properties.supportsDiscard = !properties.readOnly && capabilities.discard
        properties.supportsWriteZeroes = !properties.readOnly && capabilities.writeZeroes
        properties.discardGranularity = Int(capabilities.physicalBlockSize)
        properties.maximumTransferBytes = Int(capabilities.maximumTransferBytes)
        return properties
    }

    /// One queue unless the server lets several connections share the export.
    public var queueLimit: (queues: Int, reason: String)? {
        if export.allowsMultipleConnections { return nil }
        return (1, "the NBD server does not allow several connections (no CAN_MULTI_CONN): serving with one queue")
    }

    public func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) throws -> NBDQueueHandler {
        let socket = try firstSocket.withLock { $0.take() } ?? connectAgain()
        return NBDQueueHandler(socket: socket, target: self, queueID: queueID, depth: depth)
    }

    /// A further connection to the same export, which must still be the one the device describes.
    func connectAgain(timeout: Duration = NBDClient.defaultTimeout) throws(NBDError) -> FileDescriptor {
        let connection = try NBDClient.connect(to: address, timeout: timeout)
        if let problem = export.replacementProblem(connection.export) { throw problem }
        return connection.takeSocket()
    }

    /// Requests that wait for a server that is down fail at once, and so does new I/O
    /// while it is, with no reconnects; a connection that is up is left alone
    /// (`NBDQueueHandler.stopRequested`).
    public func stopRequested() { stopping.raise() }

    public var writesLost: Bool { lossPending.load(ordering: .relaxed) > 0 }
    public func writesWereLost() { lossInherited.store(true, ordering: .relaxed) }
    public func takesOverWrites() { unflushed.add(1, ordering: .relaxed) }

    /// A FLUSH on a connection of its own once the queues are gone: every write the
    /// device completed is then on the server's stable storage. None where no write waits
    /// for one (a server that is down then does not fail the stop).
    public func sync() throws {
        guard !properties.readOnly && export.flags.contains(.sendFlush), unflushed.load(ordering: .relaxed) > 0 else { return }
        let socket = try connectAgain(timeout: .seconds(5))
        try socket.setStreamTimeout(.seconds(30))
        try Self.exchange(NBDRequest(.flush, cookie: 1), on: socket)
        try? Self.disconnect(socket)
    }

    /// Sends `request` (no data) and waits for its reply, blocking.
    static func exchange(_ request: NBDRequest, on socket: borrowing FileDescriptor) throws {
        var bytes = [UInt8](repeating: 0, count: NBDRequest.headerSize)
        bytes.withUnsafeMutableBytes { request.encode(into: $0) }
        try bytes.withUnsafeBytes { try socket.sendAll($0) }
        var reply = [UInt8](repeating: 0, count: NBDSimpleReplyHeader.size)
        guard try reply.withUnsafeMutableBytes({ try socket.receiveAll(into: $0) }),
              let header = reply.withUnsafeBytes({ NBDSimpleReplyHeader(decoding: $0) }), header.cookie == request.cookie
        else { throw NBDError(.closed, "the NBD server did not answer a FLUSH") }
        if header.errno != 0 { throw SystemError("NBD FLUSH", errno: header.errno) }
    }

    /// NBD_CMD_DISC: the polite end of a session (no reply). Sent within 2 s or not at all:
    /// a server that stopped reading (its socket buffer full) must not hold up the device's
    /// removal, which closes the connection anyway.
    static func disconnect(_ socket: borrowing FileDescriptor) throws {
        try socket.setStreamTimeout(.seconds(2))
        var bytes = [UInt8](repeating: 0, count: NBDRequest.headerSize)
        bytes.withUnsafeMutableBytes { NBDRequest(.disconnect, cookie: 0).encode(into: $0) }
        try bytes.withUnsafeBytes { try socket.sendAll($0) }
    }

    public var spec: TargetSpec { .nbd(configuration) }
    public var directIOState: String { "-" }
    /// A read-only export makes a read-only device, as losetup makes one of a file it
    /// cannot write: said, unless `--read-only` asked for it. So is a tail that is no whole
    /// block, as the loop target says of a file's.
    public var note: String? {
        let tail = export.size % UInt64(properties.logicalBlockSize)
        let tailNote = tail == 0 ? nil : TargetProperties.unusedTailNote(tail, of: "export \(export.shownName)",
                                                                          blockSize: properties.logicalBlockSize)
        guard export.flags.contains(.readOnly), !configuration.readOnly else { return tailNote }
        return ["the export at \(configuration.uri) is read-only (the server says so): the device is read-only (give --read-only to ask for that without this line)", tailNote]
            .compactMap { $0 }.joined(separator: "; ")
    }
}
