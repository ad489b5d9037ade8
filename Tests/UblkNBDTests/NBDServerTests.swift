import Glibc
import Testing
import UblkNBD
import UblkSystem

/// The handshake and the wire format against real servers (nbdkit, qemu-nbd, nbd-server)
/// on 127.0.0.1, each started for its test on a free port with a 1 MiB scratch image and
/// stopped when the test ends. Serialized: each waits on a server process.
@Suite(.serialized) struct NBDServerTests {
    static let imageSize = 1 << 20

    /// Writes, flushes, reads back (pipelined, so a threaded server may answer out of
    /// order), zeroes and trims over the connection, and checks the image file itself.
    func roundTrip(_ connection: consuming NBDConnection, scratch: ScratchDirectory) throws {
        var driver = try NBDTestDriver(connection)
        let pattern = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        #expect(try driver.perform(BlockRequest(.write, flags: .fua, offset: 8192, length: 65536), data: pattern).errno == 0)
        if driver.export.flags.contains(.sendFlush) {
            #expect(try driver.perform(BlockRequest(.flush)).errno == 0)
        }
        #expect(scratch.imageBytes(at: 8192, count: 65536) == pattern)

        let reads = (0..<24).map { (BlockRequest(.read, offset: UInt64($0) * 4096, length: 4096), data: [UInt8]()) }
        let results = try driver.perform(reads)
        #expect(results.allSatisfy { $0.errno == 0 })
        let original = (0..<Self.imageSize).map { UInt8($0 % 251) }
        var expected = original
        expected.replaceSubrange(8192..<8192 + 65536, with: pattern)
        for (index, result) in results.enumerated() {
            #expect(driver.buffers.bytes(result.cookie) == Array(expected[index * 4096..<(index + 1) * 4096]), "block \(index)")
        }

        if driver.export.flags.contains(.sendWriteZeroes) {
            #expect(try driver.perform(BlockRequest(.writeZeroes, flags: .noUnmap, offset: 8192, length: 4096)).errno == 0)
            #expect(try driver.perform(BlockRequest(.read, offset: 8192, length: 4096)).data == [UInt8](repeating: 0, count: 4096))
        }
        if driver.export.flags.contains(.sendTrim) {
            #expect(try driver.perform(BlockRequest(.discard, offset: 512 * 1024, length: 65536)).errno == 0)
        }
        let beyond = try driver.perform(BlockRequest(.read, offset: UInt64(Self.imageSize), length: 4096))
        #expect(beyond.errno != 0, "a read past the end fails")
        #expect(try driver.perform(BlockRequest(.read, offset: 0, length: 512)).data == Array(original[0..<512]),
                "the connection still works after an error reply")
        try driver.disconnect()
    }

    /// qemu-nbd serving the image as export "disk"; `-t` keeps it up after a client leaves,
    /// `-e` is how many clients may share it (more than 1 announces CAN_MULTI_CONN).
    func qemuNbd(_ scratch: ScratchDirectory, port: UInt16, sharers: Int = 1) throws -> ServerProcess {
        try ServerProcess(["qemu-nbd", "-t", "-f", "raw", "-b", "127.0.0.1", "-p", "\(port)", "-x", "disk", "-e", "\(sharers)",
                           scratch.image], log: scratch.path + "/server.log")
    }

    @Test func nbdkitAnnouncesMultiConnAndServesData() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        let server = try ServerProcess(["nbdkit", "-f", "-i", "127.0.0.1", "-p", "\(port)", "file", scratch.image],
                                       log: scratch.path + "/server.log")
        defer { server.stop() }
        let connection = try server.connect("nbd://127.0.0.1:\(port)/anything")
        let export = connection.export
        #expect(export.size == UInt64(Self.imageSize) && export.negotiation == .go)
        #expect(export.flags.isSuperset(of: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn]))
        #expect(!export.flags.contains(.readOnly))
        #expect(export.allowsMultipleConnections)
        try roundTrip(connection, scratch: scratch)
    }

    @Test func nbdkitOverAUnixSocket() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let socketPath = scratch.path + "/nbd.sock"
        let server = try ServerProcess(["nbdkit", "-f", "-U", socketPath, "file", scratch.image], log: scratch.path + "/server.log")
        defer { server.stop() }
        let connection = try server.connect("nbd+unix:///disk?socket=\(socketPath)")
        #expect(connection.export.size == UInt64(Self.imageSize))
        try roundTrip(connection, scratch: scratch)
    }

    @Test func qemuNbdDefaultHasNoMultiConnAndSendsBlockSizes() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        let server = try qemuNbd(scratch, port: port)
        defer { server.stop() }
        let connection = try server.connect("nbd://127.0.0.1:\(port)/disk")
        let export = connection.export
        #expect(export.size == UInt64(Self.imageSize))
        #expect(!export.flags.contains(.canMultiConn) && !export.allowsMultipleConnections)
        #expect(export.flags.isSuperset(of: [.sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes]))
        #expect(export.serverSentBlockSizes)
        #expect(export.blockSizes == NBDBlockSizes(minimum: 1, preferred: 4096, maximumPayload: 33_554_432))
        try roundTrip(connection, scratch: scratch)
    }

    @Test func qemuNbdSharedAnnouncesMultiConn() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        let server = try qemuNbd(scratch, port: port, sharers: 4)
        defer { server.stop() }
        let first = try server.connect("nbd://127.0.0.1:\(port)/disk")
        #expect(first.export.allowsMultipleConnections)
        // By name: "localhost" may resolve to ::1 first, where nobody listens; the next address is tried.
        let second = try NBDClient.connect(to: try NBDAddress(uri: "nbd://localhost:\(port)/disk"))
        #expect(second.export == first.export, "a second connection (the next queue's) gets the same export")
        #expect(first.export.replacementProblem(second.export) == nil)
        let socket = second.takeSocket()
        #expect(fcntl(socket.rawValue, F_GETFD) >= 0, "the socket moves out of the connection open")
    }

    @Test func qemuNbdUnknownExportIsOneLine() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        let server = try qemuNbd(scratch, port: port)
        defer { server.stop() }
        #expect(throws: NBDError(.exportNotFound, "export nope not found on 127.0.0.1:\(port): "
            + "check the name (nbdinfo --list nbd://127.0.0.1:\(port))")) {
            _ = try server.connect("nbd://127.0.0.1:\(port)/nope")
        }
    }

    @Test func nbdServerSizeComesFromGo() throws {
        let scratch = try ScratchDirectory(imageSize: Self.imageSize)
        let port = try freeLoopbackPort()
        try scratch.write("config", Array("""
            [generic]
                listenaddr = 127.0.0.1
                port = \(port)
            [disk]
                exportname = \(scratch.image)
                flush = true
                fua = true
                trim = true

            """.utf8))
        // -d: stays in the foreground (so it can be stopped) and serves one client.
        let server = try ServerProcess(["nbd-server", "-C", scratch.path + "/config", "-d"], log: scratch.path + "/server.log")
        defer { server.stop() }
        let connection = try server.connect("nbd://127.0.0.1:\(port)/disk")
        #expect(connection.export.size == UInt64(Self.imageSize), "nbd-server reports 0 in OPT_INFO, the real size in GO")
        #expect(connection.export.flags == NBDTransmissionFlags(rawValue: 0x16d))
        #expect(!connection.export.serverSentBlockSizes)
        try roundTrip(connection, scratch: scratch)
    }

    @Test func refusedConnectionIsOneLine() throws {
        #expect(throws: NBDError(.connect, "cannot connect to 127.0.0.1:1: connection refused: is the NBD server running?")) {
            _ = try NBDClient.connect(to: try NBDAddress(uri: "nbd://127.0.0.1:1/disk"))
        }
        #expect(throws: NBDError(.connect, "cannot connect to /nonexistent/nbd.sock: no such file or directory: "
            + "is the NBD server running?")) {
            _ = try NBDClient.connect(to: try NBDAddress(uri: "nbd+unix:///disk?socket=/nonexistent/nbd.sock"))
        }
    }

    @Test func connectTimeoutIsBounded() throws {
        // A listener whose accept queue is full: the kernel drops further SYNs, so the connect hangs.
        let listener = try SilentListener(backlog: 0)
        var fillers: [Int32] = []
        defer { fillers.forEach { close($0) } }
        for _ in 0..<4 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            var address = loopback(port: listener.port)
            _ = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            fillers.append(fd)
        }
        let started = ContinuousClock.now
        #expect(throws: NBDError(.connect, "cannot connect to 127.0.0.1:\(listener.port): no answer within 0.5 seconds: "
            + "check the host, the port and any firewall")) {
            _ = try NBDClient.connect(to: try NBDAddress(uri: "nbd://127.0.0.1:\(listener.port)/disk"), timeout: .milliseconds(500))
        }
        #expect(ContinuousClock.now - started < .seconds(3))
    }

    /// A TCP connection notices a peer that vanished without a word: keepalive probes
    /// after 10 s of silence, and a bound on unacknowledged data (TCP_USER_TIMEOUT).
    @Test func tcpConnectionsNoticeAVanishedPeer() throws {
        let listener = try SilentListener(backlog: 8)
        let socket = try FileDescriptor.connect(to: .tcp(host: "127.0.0.1", port: listener.port), timeout: .seconds(2))
        func option(_ level: Int32, _ name: Int32) -> Int32 {
            var value: Int32 = -1
            var length = socklen_t(MemoryLayout<Int32>.size)
            return getsockopt(socket.rawValue, level, name, &value, &length) == 0 ? value : -1
        }
        let tcp = Int32(IPPROTO_TCP)
        #expect(option(tcp, TCP_NODELAY) == 1 && option(SOL_SOCKET, SO_KEEPALIVE) == 1)
        #expect(option(tcp, TCP_KEEPIDLE) == 10 && option(tcp, TCP_KEEPINTVL) == 5 && option(tcp, TCP_KEEPCNT) == 3)
        #expect(option(tcp, TCP_USER_TIMEOUT) == 15_000)
    }

    @Test func silentServerFailsTheHandshakeInTime() throws {
        let listener = try SilentListener(backlog: 8)
        let started = ContinuousClock.now
        #expect(throws: NBDError(.closed, "NBD server 127.0.0.1:\(listener.port) stopped answering during the handshake: "
            + "is it overloaded?")) {
            _ = try NBDClient.connect(to: try NBDAddress(uri: "nbd://127.0.0.1:\(listener.port)/disk"), timeout: .milliseconds(300))
        }
        #expect(ContinuousClock.now - started < .seconds(3))
    }

    /// A server that sends its whole handshake a byte every 50 ms (3.5 s) never lets one
    /// receive wait long, but the handshake as a whole ends at the timeout.
    @Test func aDrippingServerFailsTheHandshakeInTime() throws {
        let listener = try SilentListener(backlog: 8)
        let fd = listener.fd
        let script = NBDHandshakeTests.greeting() + NBDHandshakeTests.exportInfo(size: 1 << 20, flags: 1) + NBDHandshakeTests.ack
        let server = try OSThread {
            let client = accept(fd, nil, nil)
            guard client >= 0 else { return }
            defer { close(client) }
            for byte in script {
                guard NBDTargetViolationTests.send(client, [byte]) else { return }
                usleep(50_000)
            }
        }
        defer { server.join() }
        let started = ContinuousClock.now
        #expect(throws: NBDError(.closed, "NBD server 127.0.0.1:\(listener.port) stopped answering during the handshake: "
            + "is it overloaded?")) {
            _ = try NBDClient.connect(to: try NBDAddress(uri: "nbd://127.0.0.1:\(listener.port)/disk"), timeout: .seconds(1))
        }
        #expect(ContinuousClock.now - started < .milliseconds(1500))
    }
}
