import Glibc
import Testing
import UblkCrypto
@testable import UblkQueue
import UblkSystem
@testable import UblkTesting
@testable import UblkTargets

/// The cipher workers on the host's io_uring: jobs go out by MSG_RING from a ring set up
/// as a queue's, answers come back on it; and the encrypting loop target with workers,
/// many requests in flight, writes dm-crypt's ciphertext and reads it back.
@Suite struct CipherWorkersTests {
    typealias KeyFile = EncryptedLoopTests.KeyFile
    typealias ScratchFile = LoopTargetTests.ScratchFile

    /// Buffers of `count` bytes per tag, freed with the value.
    final class Buffers {
        let base: UnsafeMutableRawPointer
        let count: Int
        init(tags: Int, count: Int) {
            base = .allocate(byteCount: tags * count, alignment: 4096)
            self.count = count
        }
        deinit { base.deallocate() }
        subscript(tag: Int) -> UnsafeMutableRawPointer { base + tag * count }
        func bytes(_ tag: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: self[tag], count: count)) }
    }

    /// Posts every tag's job to a worker in turn and collects the answers from `ring`.
    func roundTrip(_ workers: CipherWorkers, ring: borrowing IORing, tags: Int) throws -> [UInt64: Int32] {
        for tag in 0..<tags {
            try ring.handle.prepareMessage(toRing: workers.rings[tag % workers.count], data: UInt64(tag), result: 0,
                                           userData: 0xdead)
        }
        var answers: [UInt64: Int32] = [:]
        while answers.count < tags {
            try ring.handle.submit(waitingFor: 1)
            ring.handle.reap { userData, result in answers[userData] = result }
        }
        return answers
    }

    @Test func workersAnswerOnAQueueRingByMessage() throws {
        let key = try KeyFile()
        let (tags, count) = (8, 8192)
        let ring = try IORing(entries: 16, preferredFlags: IORing.singleThreadFlags)
        let workers = try CipherWorkers(count: 2, depth: tags, key: try key.key(), unitSize: 512)
        let (input, output) = (Buffers(tags: tags, count: count), Buffers(tags: tags, count: count))
        for tag in 0..<tags {
            let plaintext = EncryptedLoopTests.pattern(count, seed: tag + 3)
            plaintext.withUnsafeBytes { input[tag].copyMemory(from: $0.baseAddress!, byteCount: count) }
            var job = CipherJob()
            (job.direction, job.source, job.destination) = (.encrypt, UnsafeRawPointer(input[tag]), output[tag])
            (job.count, job.sector) = (count, UInt64(tag * 100))
            (job.replyRing, job.replyData) = (ring.descriptor, UserData(.target, tag: UInt16(tag)).rawValue)
            workers.jobs[tag] = job
        }
        let answers = try roundTrip(workers, ring: ring, tags: tags)
        // Every answer is its request's user data with result 0; no send failed.
        #expect(answers == Dictionary(uniqueKeysWithValues: (0..<tags).map { (UserData(.target, tag: UInt16($0)).rawValue, Int32(0)) }))
        for tag in 0..<tags {
            #expect(output.bytes(tag) == (try key.reference(input.bytes(tag), sector: UInt64(tag * 100))))
        }
        workers.stop()
        workers.stop()
    }

    @Test func aMessageThatCannotBeSentComesBackAsAFailedCompletion() throws {
        let ring = try IORing(entries: 4, preferredFlags: IORing.singleThreadFlags)
        let notARing = try FileDescriptor(path: "/dev/null", flags: O_RDONLY)
        try ring.handle.prepareMessage(toRing: notARing.rawValue, data: 1, result: 0, userData: 0xdead)
        var completions: [(UInt64, Int32)] = []
        try ring.handle.submit(waitingFor: 1)
        ring.handle.reap { completions.append(($0, $1)) }
        #expect(completions.count == 1)
        #expect(completions.first?.0 == 0xdead)
        #expect(completions.first?.1 == -EBADFD)
    }

    func encrypted(_ file: ScratchFile, _ key: KeyFile, threads: Int) throws -> LoopTarget {
        var configuration = LoopConfiguration(path: file.path)
        var settings = EncryptionConfiguration()
        settings.cipherThreads = threads
        configuration.encryption = settings
        return try LoopTarget(configuration, key: try key.key())
    }

    /// `operation` of 32 KiB on every tag at once, tag t at sector 64 × t; returns each result.
    func allAtOnce(_ queue: OfflineQueue<LoopTarget>, _ operation: IOOperation) throws -> [Int32] {
        var results = [Int32](repeating: 1, count: queue.depth)
        for tag in 0..<queue.depth {
            try queue.start(tag: tag, IODescriptor(operation: operation, startSector: UInt64(64 * tag), sectorCount: 64))
        }
        while queue.inFlight > 0 { try queue.reap { results[$0] = $1 } }
        return results
    }

    func encryption(_ queue: OfflineQueue<LoopTarget>) -> QueueEncryption { queue.queue.handler.encryption! }

    @Test(arguments: [1, 3])
    func manyRequestsInFlightAreSpreadOverTheWorkers(threads: Int) throws {
        let file = try ScratchFile(size: 4 << 20)
        let key = try KeyFile()
        let queue = try OfflineQueue(target: try encrypted(file, key, threads: threads), depth: 16, bufferSize: 64 * 1024)
        #expect(encryption(queue).workerCount == threads)
        let count = 32 * 1024
        let plaintexts = (0..<16).map { EncryptedLoopTests.pattern(count, seed: $0 + 5) }
        for tag in 0..<16 { plaintexts[tag].withUnsafeBytes { queue.buffer(tag: tag).copyMemory(from: $0.baseAddress!, byteCount: count) } }
        #expect(try allAtOnce(queue, .write) == Array(repeating: Int32(count), count: 16))
        let written = encryption(queue).handOffs
        // The first write was alone in flight (run here); of the 15 after it, the queue
        // thread ran one in `lanes` and the workers the rest.
        #expect(written == 15 - 15 / QueueEncryption.lanes(workers: threads, .encrypt))
        for tag in 0..<16 {
            #expect(file.bytes(at: 64 * 512 * tag, count: count) == (try key.reference(plaintexts[tag], sector: UInt64(64 * tag))))
            memset(queue.buffer(tag: tag), 0, count)
        }
        #expect(try allAtOnce(queue, .read) == Array(repeating: Int32(count), count: 16))
        #expect(encryption(queue).handOffs > written)
        for tag in 0..<16 {
            #expect(Array(UnsafeRawBufferPointer(start: queue.buffer(tag: tag), count: count)) == plaintexts[tag])
        }
    }

    @Test func smallJobsAreCipheredOnTheQueueThread() throws {
        let file = try ScratchFile(size: 1 << 20)
        let queue = try OfflineQueue(target: try encrypted(file, try KeyFile(), threads: 2), depth: 8, bufferSize: 64 * 1024)
        for tag in 0..<8 {
            try queue.start(tag: tag, IODescriptor(operation: .write, startSector: UInt64(8 * tag), sectorCount: 8))
        }
        while queue.inFlight > 0 { try queue.reap { #expect($1 == 4096) } }
        #expect(encryption(queue).handOffs == 0)
    }

    @Test func aLoneRequestIsCipheredOnTheQueueThread() throws {
        let file = try ScratchFile(size: 1 << 20)
        let queue = try OfflineQueue(target: try encrypted(file, try KeyFile(), threads: 2), depth: 4, bufferSize: 64 * 1024)
        for _ in 0..<4 {
            #expect(try queue.perform(IODescriptor(operation: .write, startSector: 8, sectorCount: 64), tag: 1) == 32768)
            #expect(try queue.perform(IODescriptor(operation: .read, startSector: 8, sectorCount: 64), tag: 2) == 32768)
        }
        #expect(encryption(queue).handOffs == 0)
    }

    @Test func aFailedHandoffIsCipheredOnTheQueueThread() throws {
        let file = try ScratchFile(size: 4 << 20)
        let key = try KeyFile()
        let queue = try OfflineQueue(target: try encrypted(file, key, threads: 1), depth: 8, bufferSize: 64 * 1024)
        let workers = try #require(queue.queue.handler.encryption?.workers)
        let notARing = try FileDescriptor(path: "/dev/null", flags: O_RDONLY)
        let ring = workers.rings[0]
        workers.rings[0] = notARing.rawValue
        defer { workers.rings[0] = ring }
        let count = 32 * 1024
        let plaintexts = (0..<8).map { EncryptedLoopTests.pattern(count, seed: $0 + 9) }
        for tag in 0..<8 { plaintexts[tag].withUnsafeBytes { queue.buffer(tag: tag).copyMemory(from: $0.baseAddress!, byteCount: count) } }
        #expect(try allAtOnce(queue, .write) == Array(repeating: Int32(count), count: 8))
        #expect(encryption(queue).handOffs > 0)
        for tag in 0..<8 {
            #expect(file.bytes(at: 64 * 512 * tag, count: count) == (try key.reference(plaintexts[tag], sector: UInt64(64 * tag))))
            memset(queue.buffer(tag: tag), 0, count)
        }
        #expect(try allAtOnce(queue, .read) == Array(repeating: Int32(count), count: 8))
        for tag in 0..<8 {
            #expect(Array(UnsafeRawBufferPointer(start: queue.buffer(tag: tag), count: count)) == plaintexts[tag])
        }
    }
}
