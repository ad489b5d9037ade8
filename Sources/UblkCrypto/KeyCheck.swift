import COpenSSL
import Glibc

/// A check value of a key, kept so that a key given again (`ublk recover`, `ublk upgrade`,
/// `ublk start` taking over) can be told from another one without keeping the key itself.
///
/// Plain mode has no header on disk to check a key against: a wrong key of the right size
/// reads noise, and the writes a file system still sends, and those a new server sends
/// again, would be encrypted with it, mixing two keys in one image. cryptsetup refuses a
/// key that differs from the live mapping's (`open --refresh`); LUKS keeps a PBKDF2 digest
/// of its volume key for the same purpose. This is that digest: PBKDF2-HMAC-SHA256 of the
/// key with a random salt. It gives nothing away that the image does not: the image itself
/// lets anyone test a guessed key.
public struct KeyCheck: Codable, Sendable, Equatable {
    /// The salt, in hex.
    public var salt: String
    public var iterations: Int
    /// PBKDF2-HMAC-SHA256 of the key, in hex.
    public var digest: String

    /// Iterations for new checks: enough to make the digest no cheaper to test a guess
    /// against than the image, and a few milliseconds once per server.
    static let defaultIterations = 10_000
    static let saltBytes = 16
    static let digestBytes = 32

    init?(of key: UnsafeRawBufferPointer, salt: [UInt8], iterations: Int) {
        guard let digest = KeyCheck.derive(key, salt: salt, iterations: iterations) else { return nil }
        self.salt = KeyCheck.hex(salt)
        self.iterations = iterations
        self.digest = KeyCheck.hex(digest)
    }

    /// Whether `key` is the key this check was made of (false for a malformed check).
    func matches(_ key: UnsafeRawBufferPointer) -> Bool {
        guard let salt = KeyCheck.bytes(hex: salt), (1...10_000_000).contains(iterations),
              let expected = KeyCheck.bytes(hex: digest), expected.count == KeyCheck.digestBytes,
              let actual = KeyCheck.derive(key, salt: salt, iterations: iterations) else { return false }
        return zip(expected, actual).reduce(0) { $0 | ($1.0 ^ $1.1) } == 0
    }

    private static func derive(_ key: UnsafeRawBufferPointer, salt: [UInt8], iterations: Int) -> [UInt8]? {
        var digest = [UInt8](repeating: 0, count: digestBytes)
        let done = key.withMemoryRebound(to: CChar.self) { password in
            PKCS5_PBKDF2_HMAC(password.baseAddress, Int32(password.count), salt, Int32(salt.count),
                              Int32(iterations), EVP_sha256(), Int32(digestBytes), &digest)
        }
        return done == 1 ? digest : nil
    }

    /// A new random salt (OpenSSL's generator, seeded by the kernel's).
    static func randomSalt() -> [UInt8]? {
        var salt = [UInt8](repeating: 0, count: saltBytes)
        return RAND_bytes(&salt, Int32(saltBytes)) == 1 ? salt : nil
    }

    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        return String(decoding: bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] }, as: UTF8.self)
    }

    static func bytes(hex: String) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard !digits.isEmpty, digits.count % 2 == 0 else { return nil }
        func value(_ digit: UInt8) -> UInt8? {
            switch digit {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
            default: nil
            }
        }
        var bytes: [UInt8] = []
        for index in stride(from: 0, to: digits.count, by: 2) {
            guard let high = value(digits[index]), let low = value(digits[index + 1]) else { return nil }
            bytes.append(high << 4 | low)
        }
        return bytes
    }
}

extension XTSKey {
    /// A new check value of this key (random salt); nil if the system could give no salt.
    public func check() -> KeyCheck? {
        KeyCheck.randomSalt().flatMap { KeyCheck(of: bytes, salt: $0, iterations: KeyCheck.defaultIterations) }
    }

    /// Whether this is the key `check` was made of.
    public func matches(_ check: KeyCheck) -> Bool { check.matches(bytes) }
}
