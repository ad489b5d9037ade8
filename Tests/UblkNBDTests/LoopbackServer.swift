import Glibc
import Synchronization
import Testing
import UblkQueue
import UblkSystem
import UblkTargets
import UblkTesting
@testable import UblkNBD

/// An NBD server on 127.0.0.1 whose every answer a test scripts: one connection at a
/// time, each gets the handshake (`NBDTargetViolationTests.handshake`), then `script`
/// says what to do with each request it reads. Stopped when it goes out of scope.
final class LoopbackServer: Sendable {
    enum Action: Sendable {
        /// A simple reply with this NBD error (0: success, with data for a READ).
        case reply(error: UInt32)
        /// Close the connection without answering.
        case hangUp
        /// Answer nothing, and keep the connection (a server that hangs).
        case ignore
    }

    /// One request as the server read it.
    struct Request: Sendable {
        var command: UInt16
        var offset: UInt64
        var length: Int
    }

    /// What a successful READ returns.
    static let data: UInt8 = 0x5A

    /// Every connection accepted so far, with the requests it read.
    final class Log: Sendable {
        let requests = Mutex<[[Request]]>([])
        /// The connection being served (-1: none), shut down by `stop`.
        let client = Mutex<Int32>(-1)
    }

    let port: UInt16
    let log: Log
    private let listener: Int32
    private let thread: OSThread
    private let stopped = Atomic<Bool>(false)

    var uri: String { "nbd://127.0.0.1:\(port)/x" }
    var connections: Int { log.requests.withLock { $0.count } }

    init(flags: UInt16 = 1 | 4, size: UInt64 = NBDTargetViolationTests.size,
         script: @escaping @Sendable (_ connection: Int, Request) -> Action) throws {
        let socket = try SilentListener(backlog: 8)
        let (listener, log) = (dup(socket.fd), Log())
        port = socket.port
        self.listener = listener
        self.log = log
        thread = try OSThread { Self.serve(listener, log, flags: flags, size: size, script) }
    }

    /// Stops accepting and ends the connection being served.
    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        shutdown(listener, Int32(SHUT_RDWR))
        log.client.withLock { if $0 >= 0 { shutdown($0, Int32(SHUT_RDWR)) } }
        thread.join()
        close(listener)
    }

    deinit { stop() }

    private static func serve(_ listener: Int32, _ log: Log, flags: UInt16, size: UInt64,
                              _ script: (Int, Request) -> Action) {
        while true {
            let client = accept(listener, nil, nil)
            guard client >= 0 else { return }
            log.client.withLock { $0 = client }
            defer { log.client.withLock { $0 = -1; close(client) } } // never shut down once its number is free
            let connection = log.requests.withLock { $0.append([]); return $0.count - 1 }
            guard NBDTargetViolationTests.handshake(client, size: size, flags: flags) else { continue }
            serving: while let header = NBDTargetViolationTests.receive(client, NBDRequest.headerSize) {
                let request = header.withUnsafeBytes {
                    Request(command: UInt16(bigEndian: $0.loadUnaligned(fromByteOffset: 6, as: UInt16.self)),
                            offset: UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 16, as: UInt64.self)),
                            length: Int(UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self))))
                }
                log.requests.withLock { $0[connection].append(request) }
                if request.command == NBDCommand.disconnect.rawValue { break serving }
                if request.command == NBDCommand.write.rawValue,
                   NBDTargetViolationTests.receive(client, request.length) == nil { break serving }
                let error: UInt32
                switch script(connection, request) {
                case .reply(let code): error = code
                case .ignore: continue
                case .hangUp: break serving
                }
                var reply = [UInt8](repeating: 0, count: NBDSimpleReplyHeader.size)
                let cookie = header.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
                reply.withUnsafeMutableBytes { NBDSimpleReplyHeader(error: error, cookie: cookie).encode(into: $0) }
                let readData = request.command == NBDCommand.read.rawValue && error == 0
                guard NBDTargetViolationTests.send(client, reply + (readData ? [UInt8](repeating: Self.data, count: request.length) : []))
                else { break serving }
            }
        }
    }

    /// An nbd target on this server, with `timeout` seconds of reconnect budget, whose
    /// watchdog gives a silent connection up after `minimumSilence` at the least.
    func target(timeout: Int = 10, minimumSilence: Duration = .seconds(30)) throws -> NBDTarget {
        var configuration = NBDConfiguration(uri: uri)
        configuration.reconnectTimeout = timeout
        return try NBDTarget(configuration, minimumSilence: minimumSilence)
    }
}
