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
/// Not thread-safe: a cipher context keeps the current IV and the provider's working state
/// between setting the IV and running the cipher, so two threads in one context would
/// encrypt with each other's tweak. Make one cipher per queue thread (each holds its own
/// copy of the expanded key); the functions are `mutating` so Swift's exclusivity checks
/// catch overlapping use, and the type is `~Copyable` so sending it to a thread moves it there.
///
/// OpenSSL's AES-XTS is called through its provider's functions (`COpenSSL`'s
/// `copenssl_cipher_functions`), not `EVP_CipherInit_ex`/`EVP_CipherUpdate`: OpenSSL 3.0's
/// EVP layer costs about 700 instructions per IV it sets, half again the AES-XTS of a
/// 512-byte sector, and a new IV is set every sector (the shim says why). Same code, fewer
/// wrappers.
///
/// Two contexts, not one: the provider expands the data key for one direction when the key
/// is set, and a later init that only sets the IV keeps that schedule, so decrypting through
/// an encryption context yields garbage. Keying both once costs nothing per call.
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
    /// The fetched cipher: it keeps the provider, and so `functions`, loaded.
    private let cipher: OpaquePointer
    private var functions: copenssl_cipher_functions
    private let encryptor: UnsafeMutableRawPointer
    private let decryptor: UnsafeMutableRawPointer

    public init(key: borrowing XTSKey, unitSize: Int = 512) throws(XTSCipherError) {
        guard unitSize == 512 || unitSize == 4096 else { throw .unsupportedUnitSize(unitSize) }
        let name = key.size == .bits512 ? "AES-256-XTS" : "AES-128-XTS"
        guard let cipher = EVP_CIPHER_fetch(nil, name, nil) else {
            throw .openSSL(call: "EVP_CIPHER_fetch(\(name))", reason: XTSCipher.lastOpenSSLError())
        }
        var functions = copenssl_cipher_functions()
        let contexts: (encryptor: UnsafeMutableRawPointer, decryptor: UnsafeMutableRawPointer)
        do throws(XTSCipherError) {
            guard copenssl_cipher_functions_of(cipher, &functions) == 1 else {
                throw XTSCipherError.openSSL(call: "OSSL_PROVIDER_query_operation",
                                             reason: "the provider of \(name) lacks a cipher function")
            }
            // The provider reads as many key bytes as the cipher wants: check here.
            let expected = Int(EVP_CIPHER_get_key_length(cipher))
            guard expected == key.bytes.count else {
                throw XTSCipherError.keyLengthMismatch(expected: expected, actual: key.bytes.count)
            }
            contexts = try XTSCipher.contexts(functions, key: key.bytes.baseAddress!.assumingMemoryBound(to: UInt8.self),
                                              length: expected)
        } catch {
            EVP_CIPHER_free(cipher)
            throw error
        }
        self.cipher = cipher
        self.functions = functions
        (encryptor, decryptor) = contexts
        self.unitSize = unitSize
    }

    deinit {
        functions.freectx(encryptor)
        functions.freectx(decryptor)
        EVP_CIPHER_free(cipher)
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

    /// One XTS message per unit: set the plain64 IV, then run the cipher over the whole unit
    /// (OpenSSL's XTS takes the whole input of one update as one message under the current IV).
    private mutating func run(_ context: UnsafeMutableRawPointer, encrypting: Bool, from input: UnsafeRawPointer,
                              to output: UnsafeMutableRawPointer, count: Int, sector: UInt64) throws(XTSCipherError) {
        guard count >= 0, count % unitSize == 0 else { throw .misaligned(count: count, unitSize: unitSize) }
        let step = UInt64(unitSize / 512)
        var iv: (UInt64, UInt64) = (0, 0)
        for unit in 0..<(count / unitSize) {
            // dm-crypt's sector counter is a u64 that wraps; so does ours.
            iv.0 = (sector &+ UInt64(unit) &* step).littleEndian
            let offset = unit * unitSize
            let done = withUnsafeBytes(of: &iv) { ivBytes in
                copenssl_cipher_message(&functions, context, encrypting ? 1 : 0,
                                        ivBytes.baseAddress!.assumingMemoryBound(to: UInt8.self), 16,
                                        (output + offset).assumingMemoryBound(to: UInt8.self),
                                        (input + offset).assumingMemoryBound(to: UInt8.self), unitSize)
            }
            guard done == 1 else {
                throw .openSSL(call: encrypting ? "AES-XTS encrypt" : "AES-XTS decrypt", reason: XTSCipher.lastOpenSSLError())
            }
        }
    }

    /// A context keyed for each direction; none is left if one fails.
    private static func contexts(_ functions: copenssl_cipher_functions, key: UnsafePointer<UInt8>,
                                 length: Int) throws(XTSCipherError)
        -> (encryptor: UnsafeMutableRawPointer, decryptor: UnsafeMutableRawPointer) {
        var functions = functions
        guard let encryptor = copenssl_cipher_context(&functions, key, length, 1) else {
            throw .openSSL(call: "OSSL_FUNC_cipher_encrypt_init", reason: lastOpenSSLError())
        }
        guard let decryptor = copenssl_cipher_context(&functions, key, length, 0) else {
            functions.freectx(encryptor)
            throw .openSSL(call: "OSSL_FUNC_cipher_decrypt_init", reason: lastOpenSSLError())
        }
        return (encryptor, decryptor)
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
