import Glibc
import Testing
import UblkQueue
import UblkSystem
@testable import UblkTargets
import UblkTesting
@testable import UblkNBD

/// A server that breaks the protocol on its first connection (bad magic, an unknown
/// cookie, a reply cut short) and answers properly on the next: the nbd target drops
/// the bad connection, reconnects, sends the READ again, and completes it only with the
/// good connection's data.
@Suite struct NBDTargetViolationTests {
    enum Lie: CaseIterable { case badMagic, unknownCookie, cutShort }

    static let size: UInt64 = 1 << 20
    static let good: UInt8 = 0x5A

    @Test(arguments: Lie.allCases) func aLyingReplyNeverCompletesARequest(lie: Lie) throws {
        let listener = try SilentListener(backlog: 4)
        let fd = listener.fd
        let server = try Self.acceptTwo(fd) { client, connection in
            Self.serve(client, lie: connection == 0 ? lie : nil)
            if connection == 0 { close(client) }
        }
        let data = try readThroughTarget(port: listener.port)
        shutdown(fd, Int32(SHUT_RDWR))
        server.join()
        #expect(data == [UInt8](repeating: Self.good, count: 8192), "\(lie): the read completed with data of the bad reply")
    }

    /// A server thread that takes two connections on `fd`, one after the other, and hands
    /// each to `serve` with its number (0, then 1).
    static func acceptTwo(_ fd: Int32, _ serve: @escaping @Sendable (Int32, Int) -> Void) throws -> OSThread {
        try OSThread {
            for connection in 0..<2 {
                let client = accept(fd, nil, nil)
                guard client >= 0 else { return }
                serve(client, connection)
            }
        }
    }

    /// One READ of 8 KiB through the nbd target (its queue and connection gone on return).
    func readThroughTarget(port: UInt16) throws -> [UInt8] {
        var configuration = NBDConfiguration(uri: "nbd://127.0.0.1:\(port)/x")
        configuration.reconnectTimeout = 10
        let queue = try OfflineQueue(target: try NBDTarget(configuration), depth: 2, bufferSize: 64 * 1024)
        memset(queue.buffer(tag: 0), 0, 8192)
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 8, sectorCount: 16)) == 8192)
        return Array(UnsafeRawBufferPointer(start: queue.buffer(tag: 0), count: 8192))
    }

    /// The handshake, then replies to requests: honest, or with `lie` to the first READ.
    static func serve(_ client: Int32, lie: Lie?) {
        guard handshake(client) else { return }
        while let request = receive(client, NBDRequest.headerSize) {
            let cookie = request.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
            let count = Int(request.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self)) })
            var header = [UInt8](repeating: 0, count: 16)
            header.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: 0, cookie: cookie).encode(into: $0) }
            let data = [UInt8](repeating: good, count: count)
            switch lie {
            case nil:
                guard send(client, header + data) else { return }
            case .badMagic:
                header[0] ^= 0xFF
                _ = send(client, header + [UInt8](repeating: 0xEE, count: count))
                return
            case .unknownCookie:
                header.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: 0, cookie: cookie ^ 0xFFFF_0000).encode(into: $0) }
                _ = send(client, header + [UInt8](repeating: 0xEE, count: count))
                return
            case .cutShort:
                _ = send(client, header + [UInt8](repeating: 0xEE, count: count / 2))
                return
            }
        }
    }

    /// The server's side of the handshake: an export of `size` bytes with `flags`
    /// (HAS_FLAGS and SEND_FLUSH by default).
    static func handshake(_ client: Int32, size: UInt64 = size, flags: UInt16 = 1 | 4) -> Bool {
        let greeting = ByteWriter().u64(NBDHandshake.greetingMagic).u64(NBDHandshake.optionMagic).u16(3).bytes
        guard send(client, greeting), receive(client, 4) != nil, let option = receive(client, 16) else { return false }
        let length = Int(UInt32(bigEndian: option.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 12, as: UInt32.self) }))
        guard receive(client, length) != nil else { return false }
        let info = ByteWriter().u16(0).u64(size).u16(flags).bytes
        let reply = { (type: UInt32, data: [UInt8]) in
            ByteWriter().u64(NBDHandshake.optionReplyMagic).u32(7).u32(type).u32(UInt32(data.count)).raw(data).bytes
        }
        return send(client, reply(3, info) + reply(1, []))
    }

    /// A server that answers a WRITE with success before its data arrived, then hangs up:
    /// the success is not believed (the data never got there), the WRITE goes again on the
    /// next connection and completes only once that one took all of it. (The lost
    /// connection used to complete it with the early answer.)
    @Test func aWriteAnsweredBeforeItsDataArrivedGoesAgain() throws {
        let listener = try SilentListener(backlog: 4)
        var small: Int32 = 4096  // A small window: the 8 MiB cannot all be in flight.
        setsockopt(listener.fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let fd = listener.fd
        let whole = UnsafeMutablePointer<Bool>.allocate(capacity: 1)
        whole.initialize(to: false)
        defer { whole.deallocate() }
        let address = UInt(bitPattern: whole)
        let server = try OSThread {
            // First connection: the header only, an answer at once, then gone.
            let first = accept(fd, nil, nil)
            guard first >= 0, Self.handshake(first, size: 16 << 20), let early = Self.receive(first, NBDRequest.headerSize),
                  Self.reply(first, to: early) else { return }
            usleep(200_000)
            close(first)
            // Second: the whole WRITE, then the answer.
            let second = accept(fd, nil, nil)
            guard second >= 0 else { return }
            defer { close(second) }
            guard Self.handshake(second, size: 16 << 20), let write = Self.receive(second, NBDRequest.headerSize),
                  let data = Self.receive(second, 8 << 20) else { return }
            UnsafeMutablePointer<Bool>(bitPattern: address)!.pointee = data.allSatisfy { $0 == Self.good }
            _ = Self.reply(second, to: write)
            _ = Self.receive(second, NBDRequest.headerSize)  // DISC, or the end
        }
        var configuration = NBDConfiguration(uri: "nbd://127.0.0.1:\(listener.port)/x")
        configuration.reconnectTimeout = 10
        do {
            let queue = try OfflineQueue(target: try NBDTarget(configuration), depth: 1, bufferSize: 8 << 20)
            memset(queue.buffer(tag: 0), Int32(Self.good), 8 << 20)
            #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 16384)) == 8 << 20)
        }
        shutdown(fd, Int32(SHUT_RDWR))
        server.join()
        #expect(whole.pointee, "the WRITE completed without its data reaching the server whole")
    }

    /// A server that takes a READ and then says nothing, its connection up (keepalive and
    /// TCP's timeouts never fire): after the reconnect timeout (2 s here, and the least
    /// silence shortened to match) without a reply
    /// the connection is given up and the READ sent again on a new one. (It waited for
    /// good; the server here gives up after 10 s, which the test tells apart by the time.)
    @Test func aServerThatFallsSilentIsLeft() throws {
        let listener = try SilentListener(backlog: 4)
        let fd = listener.fd
        let server = try OSThread {
            let silent = accept(fd, nil, nil)
            guard silent >= 0 else { return }
            guard Self.handshake(silent), Self.receive(silent, NBDRequest.headerSize) != nil else {
                close(silent)
                return
            }
            var poller = pollfd(fd: silent, events: Int16(POLLIN), revents: 0)
            _ = poll(&poller, 1, 10_000)  // until the client hangs up, or 10 s
            close(silent)
            let client = accept(fd, nil, nil)
            guard client >= 0 else { return }
            Self.serve(client, lie: nil)
            close(client)
        }
        var configuration = NBDConfiguration(uri: "nbd://127.0.0.1:\(listener.port)/x")
        configuration.reconnectTimeout = 2
        let started = ContinuousClock.now
        do {
            let queue = try OfflineQueue(target: try NBDTarget(configuration, minimumSilence: .seconds(2)), depth: 2,
                                         bufferSize: 64 * 1024)
            memset(queue.buffer(tag: 0), 0, 8192)
            #expect(try queue.perform(IODescriptor(operation: .read, startSector: 8, sectorCount: 16)) == 8192)
            #expect(UnsafeRawBufferPointer(start: queue.buffer(tag: 0), count: 8192).allSatisfy { $0 == Self.good })
        }
        let took = started.duration(to: .now)
        shutdown(fd, Int32(SHUT_RDWR))
        server.join()
        #expect(took < .seconds(8), "the READ waited \(took) on a silent server")
    }

    /// A server that loses one reply while it answers the others: the connection moves all
    /// the time, but the READ on tag 0 is not left waiting for good. Once it has waited the
    /// watchdog's period (1 s here) the connection is given up and the READ sent again, and
    /// the next connection answers it, while READs on tag 1 keep coming every 100 ms.
    @Test func aLostReplyIsNoticedWhileOthersFlow() throws {
        let listener = try SilentListener(backlog: 4)
        let fd = listener.fd
        let server = try Self.acceptTwo(fd) { client, connection in
            Self.serve(client, ignoringTagZero: connection == 0)
            close(client)
        }
        var configuration = NBDConfiguration(uri: "nbd://127.0.0.1:\(listener.port)/x")
        configuration.reconnectTimeout = 1
        var lost: Int32?
        let started = ContinuousClock.now
        do {
            let queue = try OfflineQueue(target: try NBDTarget(configuration, minimumSilence: .seconds(1)), depth: 2,
                                         bufferSize: 64 * 1024)
            try queue.start(tag: 0, IODescriptor(operation: .read, startSector: 0, sectorCount: 8))
            while lost == nil && started.duration(to: .now) < .seconds(8) {
                try queue.start(tag: 1, IODescriptor(operation: .read, startSector: 8, sectorCount: 8))
                var other: Int32?
                while other == nil { try queue.reap { tag, result in if tag == 0 { lost = result } else { other = result } } }
                #expect(other == 4096)
                usleep(100_000)
            }
            while lost == nil { try queue.reap { tag, result in if tag == 0 { lost = result } } }
        }
        let took = started.duration(to: .now)
        shutdown(fd, Int32(SHUT_RDWR))
        server.join()
        #expect(lost == 4096)
        #expect(took < .seconds(5), "the READ whose reply was lost waited \(took) while others were answered")
    }

    /// A server that stops reading does not hold up the end of a session: the DISC that
    /// ends it politely cannot go out (the socket's buffer is full), and is given up after
    /// 2 s; the device's removal closes the connection anyway.
    @Test func aDisconnectDoesNotWaitForAServerThatStoppedReading() throws {
        var ends: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        defer { close(ends[1]) }
        let flags = fcntl(ends[0], F_GETFL)
        _ = fcntl(ends[0], F_SETFL, flags | O_NONBLOCK)
        let chunk = [UInt8](repeating: 0, count: 65536)
        while chunk.withUnsafeBytes({ Glibc.send(ends[0], $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) > 0 {}
        _ = fcntl(ends[0], F_SETFL, flags)
        let socket = FileDescriptor(adopting: ends[0])
        let started = ContinuousClock.now
        #expect(throws: (any Error).self) { try NBDTarget.disconnect(socket) }
        #expect(started.duration(to: .now) < .seconds(5))
    }

    /// Replies that wait are not lost ones: a server that answers in order over a slow link
    /// (12 READs, 250 ms each, the last answered after 3 s), and a FLUSH that takes 2.5 s
    /// while READs sent after it are answered, each against a watchdog period of 1 s.
    /// Neither connection is given up, and every request succeeds.
    @Test(arguments: [true, false]) func slowRepliesAreNotLostOnes(inOrder: Bool) throws {
        let listener = try SilentListener(backlog: 4)
        let fd = listener.fd
        let server = try OSThread {
            for _ in 0..<4 {  // (a dropped connection comes back, to fail visibly)
                let client = accept(fd, nil, nil)
                guard client >= 0 else { return }
                Self.serveDelayed(client, inOrder: inOrder) { type in
                    .milliseconds(inOrder ? 250 : type == NBDCommand.flush.rawValue ? 2500 : 0)
                }
                close(client)
            }
        }
        var configuration = NBDConfiguration(uri: "nbd://127.0.0.1:\(listener.port)/x")
        configuration.reconnectTimeout = 1
        var results: [Int: Int32] = [:]
        do {
            let queue = try OfflineQueue(target: try NBDTarget(configuration, minimumSilence: .seconds(1)), depth: 12,
                                         bufferSize: 64 * 1024)
            if inOrder {
                for tag in 0..<12 { try queue.start(tag: tag, IODescriptor(operation: .read, startSector: UInt64(tag * 8), sectorCount: 8)) }
                while results.count < 12 { try queue.reap { tag, result in results[tag] = result } }
            } else {
                try queue.start(tag: 0, IODescriptor(operation: .flush, startSector: 0, sectorCount: 0))
                for round in 0..<40 where results[0] == nil {
                    try queue.start(tag: 1, IODescriptor(operation: .read, startSector: 8, sectorCount: 8))
                    results[1] = nil
                    while results[1] == nil { try queue.reap { tag, result in results[tag] = result } }
                    #expect(results[1] == 4096, "READ \(round) beside the slow FLUSH")
                    usleep(100_000)
                }
                while results[0] == nil { try queue.reap { tag, result in results[tag] = result } }
            }
        }
        shutdown(fd, Int32(SHUT_RDWR))
        server.join()
        #expect(results.allSatisfy { $0.value == ($0.key == 0 && !inOrder ? 0 : 4096) }, "\(results.sorted { $0.key < $1.key })")
    }

    /// The handshake, then every request answered (READs with data) once `delay(type)` has
    /// passed: from its arrival, or, `inOrder`, from the answer before it (a server that
    /// answers one at a time). Returns at DISC or when the client hangs up.
    static func serveDelayed(_ client: Int32, inOrder: Bool, delay: (UInt16) -> Duration) {
        guard handshake(client) else { return }
        var pending: [(due: ContinuousClock.Instant, reply: [UInt8])] = []
        while true {
            var poller = pollfd(fd: client, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, 20)
            while let first = pending.first, first.due <= .now {
                guard send(client, first.reply) else { return }
                pending.removeFirst()
            }
            guard ready > 0 else { continue }
            guard let request = receive(client, NBDRequest.headerSize) else { return }
            let type = request.withUnsafeBytes { UInt16(bigEndian: $0.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) }
            let cookie = request.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
            let count = Int(request.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self)) })
            if type == NBDCommand.disconnect.rawValue { return }
            var header = [UInt8](repeating: 0, count: 16)
            header.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: 0, cookie: cookie).encode(into: $0) }
            let start = inOrder ? max(pending.last?.due ?? .now, .now) : ContinuousClock.now
            let data = type == NBDCommand.read.rawValue ? [UInt8](repeating: good, count: count) : []
            pending.append((start + delay(type), header + data))
            pending.sort { $0.due < $1.due }
        }
    }

    /// The handshake, then honest replies to every request, but none to the first on tag 0
    /// when `ignoringTagZero`; returns when the client hangs up.
    static func serve(_ client: Int32, ignoringTagZero: Bool) {
        guard handshake(client) else { return }
        var ignored = !ignoringTagZero
        while let request = receive(client, NBDRequest.headerSize) {
            let cookie = request.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
            let count = Int(request.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self)) })
            if cookie & 0xffff == 0 && !ignored {
                ignored = true
                continue
            }
            var header = [UInt8](repeating: 0, count: 16)
            header.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: 0, cookie: cookie).encode(into: $0) }
            guard send(client, header + [UInt8](repeating: good, count: count)) else { return }
        }
    }

    /// A server slow to answer (a FLUSH over much dirty data) is not taken for a silent
    /// one: the least silence (30 s) holds however short the reconnect timeout is; nor is a
    /// connection given up for silence taken as a crash (its writes lost, the next FLUSH
    /// failed). Here, 3 s to answer a WRITE and the FLUSH after it, with a reconnect
    /// timeout of 0: both succeed.
    @Test func aSlowServerIsNotASilentOne() throws {
        let listener = try SilentListener(backlog: 4)
        let fd = listener.fd
        let server = try OSThread {
            let client = accept(fd, nil, nil)
            guard client >= 0 else { return }
            defer { close(client) }
            guard Self.handshake(client), let write = Self.receive(client, NBDRequest.headerSize),
                  Self.receive(client, 4096) != nil else { return }
            sleep(3)
            guard Self.reply(client, to: write), let flush = Self.receive(client, NBDRequest.headerSize) else { return }
            sleep(3)
            _ = Self.reply(client, to: flush)
            _ = Self.receive(client, NBDRequest.headerSize)  // DISC, or the end
        }
        var configuration = NBDConfiguration(uri: "nbd://127.0.0.1:\(listener.port)/x")
        configuration.reconnectTimeout = 0
        do {
            let queue = try OfflineQueue(target: try NBDTarget(configuration), depth: 2, bufferSize: 64 * 1024)
            #expect(try queue.perform(IODescriptor(operation: .write, startSector: 0, sectorCount: 8)) == 4096)
            #expect(try queue.perform(IODescriptor(operation: .flush, startSector: 0, sectorCount: 0), tag: 1) == 0)
        }
        shutdown(fd, Int32(SHUT_RDWR))
        server.join()
    }

    /// A FLUSH that arrives while a WRITE is unanswered waits for that answer: the server
    /// holds the WRITE's reply for 300 ms and sees nothing else meanwhile.
    @Test func aFlushWaitsForTheWritesBeforeIt() throws {
        let listener = try SilentListener(backlog: 4)
        let fd = listener.fd
        let seen = UnsafeMutablePointer<Int32>.allocate(capacity: 1) // -1: nothing early; else the command
        seen.initialize(to: -2)
        defer { seen.deallocate() }
        let address = UInt(bitPattern: seen)
        let server = try OSThread {
            let client = accept(fd, nil, nil)
            guard client >= 0 else { return }
            defer { close(client) }
            UnsafeMutablePointer<Int32>(bitPattern: address)!.pointee = Self.commandAfterHeldWrite(client)
        }
        try writeThenFlush(port: listener.port)
        server.join()
        #expect(seen.pointee == Int32(NBDCommand.flush.rawValue), "-1: the FLUSH was sent before the WRITE was answered")
    }

    /// Serves a WRITE, holds its reply 300 ms, then answers the next request: returns that
    /// request's command, or -1 if anything arrived while the WRITE was unanswered.
    static func commandAfterHeldWrite(_ client: Int32) -> Int32 {
        guard handshake(client), let write = receive(client, NBDRequest.headerSize) else { return -2 }
        let length = Int(write.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self)) })
        guard receive(client, length) != nil else { return -2 }
        var poller = pollfd(fd: client, events: Int16(POLLIN), revents: 0)
        let early = poll(&poller, 1, 300) > 0
        guard reply(client, to: write), let next = receive(client, NBDRequest.headerSize), reply(client, to: next) else {
            return -2
        }
        _ = receive(client, NBDRequest.headerSize) // DISC, or the end
        return early ? -1 : Int32(next.withUnsafeBytes { UInt16(bigEndian: $0.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) })
    }

    /// A successful simple reply (no data) to `request`.
    static func reply(_ client: Int32, to request: [UInt8]) -> Bool {
        let cookie = request.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        var header = [UInt8](repeating: 0, count: NBDSimpleReplyHeader.size)
        header.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: 0, cookie: cookie).encode(into: $0) }
        return send(client, header)
    }

    /// A WRITE and, while it is in flight, a FLUSH, through the nbd target.
    func writeThenFlush(port: UInt16) throws {
        let queue = try OfflineQueue(target: try NBDTarget(NBDConfiguration(uri: "nbd://127.0.0.1:\(port)/x")), depth: 2,
                                     bufferSize: 64 * 1024)
        var results: [Int: Int32] = [:]
        try queue.start(tag: 0, IODescriptor(operation: .write, startSector: 0, sectorCount: 8))
        try queue.start(tag: 1, IODescriptor(operation: .flush, startSector: 0, sectorCount: 0))
        while results.count < 2 { try queue.reap { results[$0] = $1 } }
        #expect(results == [0: 4096, 1: 0])
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) == $0.count }
    }

    static func receive(_ fd: Int32, _ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        let got = count == 0 ? 0 : bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress, count, Int32(MSG_WAITALL)) }
        return got == count ? bytes : nil
    }
}
