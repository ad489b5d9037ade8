import FoundationEssentials
import Testing
import UblkCrypto

/// The key check value that a new server's key is compared with: the same key matches,
/// another of the same size does not, and the record holds no key bytes.
@Suite struct KeyCheckTests {
    let files = KeyFiles()

    static func bytes(_ seed: UInt8) -> [UInt8] { (0..<64).map { UInt8(truncatingIfNeeded: Int($0) * 7 + Int(seed)) } }

    /// Whether the key read from a file of `bytes` matches `check` (`XTSKey` is not
    /// copyable, which the test macros need).
    func matches(_ bytes: [UInt8], _ check: KeyCheck, size: XTSKeySize = .bits512) throws -> Bool {
        try files.key(bytes, size: size).matches(check)
    }

    func check(_ bytes: [UInt8]) throws -> KeyCheck {
        let made = try files.key(bytes, size: .bits512).check()
        return try #require(made)
    }

    @Test func theSameKeyMatchesAnotherDoesNot() throws {
        let check = try check(Self.bytes(1))
        #expect(try matches(Self.bytes(1), check))
        var other = Self.bytes(1)
        other[63] ^= 1
        #expect(try !matches(other, check))
        #expect(try !matches(Array(Self.bytes(1).prefix(32)), check, size: .bits256))
    }

    @Test func eachCheckHasItsOwnSaltAndNoKeyBytes() throws {
        let (a, b) = (try check(Self.bytes(2)), try check(Self.bytes(2)))
        #expect(a.salt != b.salt && a.digest != b.digest)
        #expect(try matches(Self.bytes(2), a) && matches(Self.bytes(2), b))
        let json = String(decoding: try JSONEncoder().encode(a), as: UTF8.self)
        let hex = Self.bytes(2).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        #expect(!json.contains(hex.prefix(16)))
        #expect(a.digest.count == 64 && a.salt.count == 32)
    }

    @Test func aMalformedCheckMatchesNothing() throws {
        var check = try check(Self.bytes(3))
        #expect(try matches(Self.bytes(3), check))
        check.digest = "zz" + check.digest.dropFirst(2)
        #expect(try !matches(Self.bytes(3), check))
        check = try self.check(Self.bytes(3))
        check.iterations = 0
        #expect(try !matches(Self.bytes(3), check))
        check = try self.check(Self.bytes(3))
        check.salt = ""
        #expect(try !matches(Self.bytes(3), check))
    }
}
