import COpenSSL

/// Encrypts and decrypts sectors exactly as dm-crypt's `aes-xts-plain64` does in plain mode.
///
/// Every unit (a sector of `unitSize` bytes, 512 or 4096, cryptsetup's `--sector-size`)
/// is one XTS message on its own: no chaining, no ciphertext stealing. Its tweak is the
/// plain64 IV, the 512-byte sector number of the unit's first byte as dm-crypt counts it
/// (position in the mapping plus `--skip`), 64-bit little-endian, zero-padded to 16 bytes.
/// The IV advances by `unitSize / 512` per unit (cryptsetup's default, no
/// `--iv-large-sectors`).
///
/// Not thread-safe: an `EVP_CIPHER_CTX` keeps the current IV and the provider's working
/// state between `EVP_CipherInit_ex` and `EVP_CipherUpdate`, so two threads in one context
/// would encrypt with each other's tweak. Make one cipher per queue thread (each holds
/// its own copy of the expanded key); the functions are `mutating` so Swift's exclusivity
/// checks catch overlapping use, and the type is `~Copyable` so sending it to a thread
/// moves it there.
///
/// Two contexts, not one: OpenSSL expands the data key for one direction when the key is
/// set, and a later `EVP_CipherInit_ex` that only changes the IV and direction keeps that
/// schedule, so decrypting through an encryption context yields garbage. Keying both once
/// costs nothing per call; re-keying on every direction change would.
///
/// The expanded keys live in OpenSSL's heap, which it cleanses when the context is freed
/// but does not lock; the raw key stays in `XTSKey`'s locked pages.
///
/// `@unchecked Sendable` (the context pointers are not Sendable) is safe: a cipher is
/// `~Copyable` and its calls are `mutating`, so it has one owner at a time; it may be made
/// on one thread and moved to the queue thread that then alone uses it.
public struct XTSCipher: ~Copyable, @unchecked Sendable {
    /// Bytes per encryption unit: 512 or 4096.
    public let unitSize: Int
    private let encryptor: OpaquePointer
    private let decryptor: OpaquePointer

    public init(key: borrowing XTSKey, unitSize: Int = 512) throws(XTSCipherError) {
        guard unitSize == 512 || unitSize == 4096 else { throw .unsupportedUnitSize(unitSize) }
        let cipher = key.size == .bits512 ? EVP_aes_256_xts() : EVP_aes_128_xts()
        guard let cipher else { throw .openSSL(call: "EVP_aes_xts", reason: XTSCipher.lastOpenSSLError()) }
        // OpenSSL takes no key length and reads as many bytes as the cipher wants: check here.
        let expected = Int(EVP_CIPHER_get_key_length(cipher))
        guard expected == key.bytes.count else { throw .keyLengthMismatch(expected: expected, actual: key.bytes.count) }
        let keyBytes = key.bytes.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let encryptor = try XTSCipher.context(cipher, key: keyBytes, encrypting: true)
        do { decryptor = try XTSCipher.context(cipher, key: keyBytes, encrypting: false) }
        catch { EVP_CIPHER_CTX_free(encryptor); throw error }
        self.encryptor = encryptor
        self.unitSize = unitSize
    }

    deinit {
        EVP_CIPHER_CTX_free(encryptor)
        EVP_CIPHER_CTX_free(decryptor)
    }

    /// Encrypts `count` bytes (whole units) from `source` into `destination` (which may be
    /// `source` itself); `sector` is the dm-crypt IV sector of the first byte.
    public mutating func encrypt(_ source: UnsafeRawPointer, into destination: UnsafeMutableRawPointer,
                                 count: Int, sector: UInt64) throws(XTSCipherError) {
        try run(encryptor, encrypting: true, from: source, to: destination, count: count, sector: sector)
    }

    /// Decrypts `count` bytes (whole units) in place; `sector` as for `encrypt`.
    public mutating func decrypt(_ buffer: UnsafeMutableRawPointer, count: Int, sector: UInt64) throws(XTSCipherError) {
        try run(decryptor, encrypting: false, from: buffer, to: buffer, count: count, sector: sector)
    }

    /// One XTS message per unit: set the plain64 IV, then one update over the whole unit
    /// (OpenSSL's XTS runs the whole input of one update under the current IV).
    private func run(_ context: OpaquePointer, encrypting: Bool, from input: UnsafeRawPointer,
                     to output: UnsafeMutableRawPointer, count: Int, sector: UInt64) throws(XTSCipherError) {
        guard count >= 0, count % unitSize == 0 else { throw .misaligned(count: count, unitSize: unitSize) }
        let step = UInt64(unitSize / 512)
        let direction: Int32 = encrypting ? 1 : 0
        var iv: (UInt64, UInt64) = (0, 0)
        var written: Int32 = 0
        for unit in 0..<(count / unitSize) {
            // dm-crypt's sector counter is a u64 that wraps; so does ours.
            iv.0 = (sector &+ UInt64(unit) &* step).littleEndian
            let initialized = withUnsafeBytes(of: &iv) {
                EVP_CipherInit_ex(context, nil, nil, nil, $0.baseAddress!.assumingMemoryBound(to: UInt8.self), direction)
            }
            guard initialized == 1 else { throw .openSSL(call: "EVP_CipherInit_ex", reason: XTSCipher.lastOpenSSLError()) }
            let offset = unit * unitSize
            let updated = EVP_CipherUpdate(context, (output + offset).assumingMemoryBound(to: UInt8.self), &written,
                                           (input + offset).assumingMemoryBound(to: UInt8.self), Int32(unitSize))
            guard updated == 1 else { throw .openSSL(call: "EVP_CipherUpdate", reason: XTSCipher.lastOpenSSLError()) }
            guard written == Int32(unitSize) else {
                throw .openSSL(call: "EVP_CipherUpdate", reason: "wrote \(written) of \(unitSize) bytes")
            }
        }
    }

    /// A context keyed for one direction; freed again if keying fails.
    private static func context(_ cipher: OpaquePointer, key: UnsafePointer<UInt8>,
                                encrypting: Bool) throws(XTSCipherError) -> OpaquePointer {
        guard let context = EVP_CIPHER_CTX_new() else {
            throw .openSSL(call: "EVP_CIPHER_CTX_new", reason: lastOpenSSLError())
        }
        guard EVP_CipherInit_ex(context, cipher, nil, key, nil, encrypting ? 1 : 0) == 1 else {
            let reason = lastOpenSSLError()
            EVP_CIPHER_CTX_free(context)
            throw .openSSL(call: "EVP_CipherInit_ex", reason: reason)
        }
        return context
    }

    /// The oldest error on this thread's OpenSSL error queue, which is then emptied so a
    /// later failure does not report a stale reason.
    private static func lastOpenSSLError() -> String {
        let code = ERR_get_error()
        ERR_clear_error()
        guard code != 0 else { return "no reason given" }
        var text = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &text, text.count)
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
