import UblkCrypto
import UblkQueue
import UblkSystem

/// The ciphers the loop target can encrypt with (cryptsetup's `--cipher` names).
public enum CipherName: String, Sendable, Codable, CaseIterable {
    /// dm-crypt plain mode's AES-XTS with the plain64 IV.
    case aesXTSPlain64 = "aes-xts-plain64"
}

/// How a loop target encrypts its backing: dm-crypt's plain mode, so the same image opens
/// with `cryptsetup open --type plain`. Everything here may be shown and recorded; the key
/// is not part of it (it comes as an `EncryptionKey`, read again by every server).
///
/// The sector size of the encryption is the device's logical block size (512 or 4096),
/// cryptsetup's `--sector-size`. The window's start (`LoopConfiguration.offset`) is in
/// bytes; cryptsetup's `--offset` is in 512-byte sectors, so `--offset N` there is
/// `N × 512` here.
public struct EncryptionConfiguration: Sendable, Equatable, Codable {
    public var cipher: CipherName = .aesXTSPlain64
    /// Bits of the whole XTS key: 512 (AES-256-XTS) or 256 (AES-128-XTS).
    public var keySize: Int = XTSKeySize.standard.rawValue
    /// 512-byte sectors added to every IV (cryptsetup's `--skip`); it moves no data.
    public var skip: UInt64 = 0
    /// Discards punch holes in the backing (cryptsetup's `--allow-discards`); nil or false:
    /// not offered, as dm-crypt does not by default: holes show which blocks are unused.
    /// (Optional so that records of servers from before it decode.)
    public var allowDiscards: Bool?
    /// Cipher worker threads per queue (`--cipher-threads`); 0: all AES on the queue
    /// thread; nil: one per CPU besides the queue thread's, at most 4.
    public var cipherThreads: Int?

    public init() {}

    /// The cipher worker threads a queue gets: `cipherThreads`, or the default for this machine.
    public var workerThreads: Int { cipherThreads ?? CipherWorkers.defaultCount }

    /// The most cipher threads a queue may have.
    public static let maximumCipherThreads = 64
    /// Each tag's bounce buffer (a write's ciphertext), besides its request buffer.
    public static var bounceBytesPerRequest: Int { QueueEncryption.defaultChunk }

    /// The sector sizes dm-crypt's default IV numbering is used with here.
    public static let sectorSizes = [512, 4096]
}

/// The key of an encrypting target: one per device, in locked memory, wiped when the last
/// reference goes (when the server exits). A class so the target and the spec that made it
/// can share the one `~Copyable` key without copying its bytes.
///
/// `@unchecked Sendable`: the key is immutable after it is read; queue threads only read
/// it, once each, to key their own cipher (`XTSCipher` copies the expanded key into
/// OpenSSL's context).
public final class EncryptionKey: @unchecked Sendable {
    let key: XTSKey

    public init(_ key: consuming XTSKey) { self.key = key }

    public var size: XTSKeySize { key.size }

    /// A pipe that holds the key (`XTSKey.pipe`).
    public func pipe(lowest: Int32 = 0) throws(SystemError) -> FileDescriptor { try key.pipe(lowest: lowest) }

    /// A new check value of the key, for the device's record (`KeyCheck`).
    public func check() -> KeyCheck? { key.check() }

    /// Whether this is the key `check` was made of.
    public func matches(_ check: KeyCheck) -> Bool { key.matches(check) }
}

/// What became of a request's cipher work.
enum CipherOutcome {
    /// Done on the queue thread.
    case done
    /// The cipher failed (the request fails with EIO).
    case failed
    /// Handed to a worker: its answer comes back as the request's next completion.
    case handedOff
}

/// One queue's encryption state: its own cipher (OpenSSL contexts are not thread-safe),
/// one bounce buffer per tag, so that a write never encrypts the tag's buffer in place
/// (the kernel's pages are not ours to scramble) and a request never allocates, and the
/// queue's cipher workers, if any.
///
/// Writes longer than a bounce buffer go out in chunks through the loop handler's
/// short-transfer path, each chunk encrypted when the previous one is written.
///
/// Where the cipher runs: on the queue thread while this is the only read or write in
/// flight, or the job is small (a handoff costs two thread wake-ups, more than AES on a
/// few KiB), else in turn on the workers and the queue thread (`lanes`), so that every
/// CPU does AES. Where several threads share the queue's tags instead
/// (`LoopTarget.threadsPerQueue`), each has one of these without workers: its requests'
/// AES all runs on it.
final class QueueEncryption {
    private var cipher: XTSCipher
    /// A buffer of `chunk` bytes per tag of `share` (`TagShare.slot`), 4096-aligned for O_DIRECT.
    private let bounce: UnsafeMutableRawPointer
    private let share: TagShare
    /// Bytes of each tag's bounce buffer: a multiple of every sector size.
    let chunk: Int
    private let skip: UInt64
    /// Nil: every job runs on the queue thread.
    let workers: CipherWorkers?
    /// Per tag: its cipher job is with a worker (which one does not matter: the answer
    /// comes back as the request's completion either way).
    private let handedOff: UnsafeMutableBufferPointer<Bool>
    /// Per tag: a read or write is in flight; `active` counts them.
    private let inFlight: UnsafeMutableBufferPointer<Bool>
    private var active = 0
    /// The last lane a job went to (`lanes`): 0 the queue thread, 1... the workers.
    private var lane = 0
    /// Jobs handed to workers so far (for tests: the workers were used).
    private(set) var handOffs = 0

    /// The smallest job handed to a worker. Measured in the 2-vCPU test VM (kernel 7.3,
    /// 1 worker against none): handing off 4 KiB jobs lost at qd32 (randread 0.77 of dm-crypt
    /// against 0.88 inline, randwrite 0.78 against 0.86), handing off 128 KiB jobs won at
    /// qd16 (seqread 0.68 against 0.50, seqwrite 0.75 against 0.55): a handoff costs two
    /// thread wake-ups, which only a job of some size pays back.
    static let handOffMinimum = 32 * 1024

    /// The turn of jobs: lane 0 is the queue thread's, then the workers'. Decrypting,
    /// one lane per worker (equal shares); encrypting, two per worker, so the queue thread
    /// runs one write's job in 2w + 1. Measured in the 2-vCPU VM, one worker, at 128 KiB
    /// qd16 against dm-crypt, each pair of numbers from one run: writes on 7.3, one job in 2
    /// 0.92, one in 3 1.02 (5 rounds; one in 4: 0.96); on 6.12 1.05 and 1.06 (4 rounds).
    /// Reads on 7.3 0.90 and 0.91; on 6.12 1.08 and 0.98. Handing a worker every job it
    /// could queue (the queue thread running one only when its worker had two waiting)
    /// lost on 7.3: 0.64 read, 0.70 write.
    static func lanes(workers: Int, _ direction: CipherJob.Direction) -> Int {
        direction == .encrypt ? 2 * workers + 1 : workers + 1
    }

    /// The tag's bounce buffer.
    private func bounceBuffer(tag: UInt16) -> UnsafeMutableRawPointer { bounce + share.slot(of: Int(tag)) * chunk }

    /// Enough for the requests file systems send most (up to 128 KiB) in one write.
    static let defaultChunk = 128 * 1024

    /// `workers` cipher worker threads (by default the configuration's); bounce buffers for
    /// the tags of `share` only.
    init(key: EncryptionKey, configuration: EncryptionConfiguration, sectorSize: Int, depth: Int,
         share: TagShare = .all, chunk: Int = QueueEncryption.defaultChunk, workers count: Int? = nil) throws {
        cipher = try XTSCipher(key: key.key, unitSize: sectorSize)
        let count = count ?? configuration.workerThreads
        workers = count > 0 ? try CipherWorkers(count: count, depth: depth, key: key, unitSize: sectorSize) : nil
        self.chunk = chunk
        skip = configuration.skip
        self.share = share
        bounce = .allocate(byteCount: share.slotCount(depth: depth) * chunk, alignment: 4096)
        handedOff = .allocate(capacity: depth)
        handedOff.initialize(repeating: false)
        inFlight = .allocate(capacity: depth)
        inFlight.initialize(repeating: false)
    }

    deinit {
        // The workers first: they may still be writing into the bounce buffers.
        workers?.stop()
        bounce.deallocate()
        handedOff.deallocate()
        inFlight.deallocate()
    }

    /// Stops and joins the workers (the queue is ending); jobs posted before are done first.
    func stop() { workers?.stop() }

    /// Workers this queue hands jobs to.
    var workerCount: Int { workers?.count ?? 0 }

    /// A read or write starts on `tag` (a tag whose last request ended by a thrown error
    /// is not counted twice).
    func began(_ tag: Int) {
        if !inFlight[tag] { active += 1 }
        inFlight[tag] = true
    }

    /// The read or write on `tag` is finished.
    func ended(_ tag: Int) {
        if inFlight[tag] { active -= 1 }
        inFlight[tag] = false
    }

    /// The IV sector of the device byte `offset` (dm-crypt: position in 512-byte sectors + skip).
    private func sector(_ offset: Int64) -> UInt64 { UInt64(offset >> 9) &+ skip }

    /// The tag's chunk of a write, from byte `done` of the request: where its ciphertext
    /// is in the bounce buffer, and how much of it to submit (to the end of `done`'s chunk).
    func ciphertext(_ request: IORequest, from done: Int) -> (UnsafeRawPointer, Int) {
        let chunkStart = done - done % chunk
        let chunkEnd = min(chunkStart + chunk, request.descriptor.byteCount)
        return (UnsafeRawPointer(bounceBuffer(tag: request.tag) + (done - chunkStart)), chunkEnd - done)
    }

    /// Encrypts the chunk of a write that starts at byte `done` into the tag's bounce buffer.
    func encrypt(_ request: IORequest, from done: Int, _ io: BackingSubmitter) throws(SystemError) -> CipherOutcome {
        let d = request.descriptor
        var job = CipherJob()
        job.direction = .encrypt
        job.source = UnsafeRawPointer(request.buffer + done)
        job.destination = bounceBuffer(tag: request.tag)
        job.count = ciphertext(request, from: done).1
        job.sector = sector(d.byteOffset + Int64(done))
        return try perform(job, tag: Int(request.tag), io)
    }

    /// Decrypts a completed read in the tag's buffer.
    func decrypt(_ request: IORequest, _ io: BackingSubmitter) throws(SystemError) -> CipherOutcome {
        let d = request.descriptor
        var job = CipherJob()
        job.destination = request.buffer
        job.count = d.byteCount
        job.sector = sector(d.byteOffset)
        return try perform(job, tag: Int(request.tag), io)
    }

    /// Runs `job` here, or hands it to the next worker in turn when other requests are in
    /// flight. Before running a large one here while others are in flight, what is prepared
    /// is submitted: the jobs handed off in this batch, the backing writes of requests
    /// encrypted before it and the commits of reads decrypted before it then proceed while
    /// this one is ciphered, rather than after it (a turn may cipher several in a row).
    private func perform(_ job: CipherJob, tag: Int, _ io: BackingSubmitter) throws(SystemError) -> CipherOutcome {
        if active > 1, job.count >= Self.handOffMinimum {
            if let workers, try handOff(job, tag: tag, to: workers, io) { return .handedOff }
            try io.submitNow()
        }
        return job.run(&cipher) ? .done : .failed
    }

    /// Moves on to the next lane; if it is a worker's, posts the job to that worker and
    /// returns true (the answer comes back as the request's next completion).
    private func handOff(_ job: CipherJob, tag: Int, to workers: CipherWorkers,
                         _ io: BackingSubmitter) throws(SystemError) -> Bool {
        lane = lane + 1 < Self.lanes(workers: workers.count, job.direction) ? lane + 1 : 0
        guard lane > 0 else { return false }
        var sent = job
        (sent.replyRing, sent.replyData) = (io.ringDescriptor, io.requestUserData)
        workers.jobs[tag] = sent
        try io.message(toRing: workers.rings[(lane - 1) % workers.count], data: UInt64(tag))
        handedOff[tag] = true
        handOffs += 1
        return true
    }

    /// The tag's job is with a worker: its answer is the request's next completion.
    func isHandedOff(_ tag: Int) -> Bool { handedOff[tag] }

    /// The worker answered for `tag` with `result`: 0 done, else the job was not done (the
    /// send failed, or the worker's cipher did) and runs here now. True if it is done.
    func handOffCompleted(_ tag: Int, result: Int32) -> Bool {
        handedOff[tag] = false
        guard let workers, result != 0 else { return result == 0 }
        return workers.jobs[tag].run(&cipher)
    }
}
