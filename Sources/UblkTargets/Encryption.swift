import UblkCrypto
import UblkQueue

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

    public init() {}

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
}

/// One queue's encryption state: its own cipher (OpenSSL contexts are not thread-safe)
/// and one bounce buffer per tag, so that a write never encrypts the tag's buffer in place
/// (the kernel's pages are not ours to scramble) and a request never allocates.
///
/// Writes longer than a bounce buffer go out in chunks through the loop handler's
/// short-transfer path, each chunk encrypted when the previous one is written.
final class QueueEncryption {
    private var cipher: XTSCipher
    /// `depth` buffers of `chunk` bytes, 4096-aligned for O_DIRECT.
    private let bounce: UnsafeMutableRawPointer
    /// Bytes of each tag's bounce buffer: a multiple of every sector size.
    let chunk: Int
    private let skip: UInt64

    /// Enough for the requests file systems send most (up to 128 KiB) in one write.
    static let defaultChunk = 128 * 1024

    init(key: borrowing XTSKey, configuration: EncryptionConfiguration, sectorSize: Int, depth: Int,
         chunk: Int = QueueEncryption.defaultChunk) throws(XTSCipherError) {
        cipher = try XTSCipher(key: key, unitSize: sectorSize)
        self.chunk = chunk
        skip = configuration.skip
        bounce = .allocate(byteCount: depth * chunk, alignment: 4096)
    }

    deinit { bounce.deallocate() }

    /// The IV sector of the device byte `offset` (dm-crypt: position in 512-byte sectors + skip).
    private func sector(_ offset: Int64) -> UInt64 { UInt64(offset >> 9) &+ skip }

    /// Where the rest of a write from byte `done` of the request comes from, and how much of
    /// it to submit: the tag's bounce buffer, holding ciphertext up to the end of `done`'s
    /// chunk. A chunk is encrypted when the write reaches its start; a short write of part
    /// of it resubmits the ciphertext already there. Nil if the cipher failed.
    func ciphertext(_ request: IORequest, from done: Int) -> (UnsafeRawPointer, Int)? {
        let d = request.descriptor
        let chunkStart = done - done % chunk
        let chunkEnd = min(chunkStart + chunk, d.byteCount)
        let buffer = bounce + Int(request.tag) * chunk
        if done == chunkStart {
            do {
                try cipher.encrypt(request.buffer + done, into: buffer, count: chunkEnd - done,
                                   sector: sector(d.byteOffset + Int64(done)))
            } catch { return nil }
        }
        return (UnsafeRawPointer(buffer + (done - chunkStart)), chunkEnd - done)
    }

    /// Decrypts a completed read in the tag's buffer; false if the cipher failed.
    func decrypt(_ request: IORequest) -> Bool {
        let d = request.descriptor
        do { try cipher.decrypt(request.buffer, count: d.byteCount, sector: sector(d.byteOffset)) } catch { return false }
        return true
    }
}
