import COpenSSL
import Testing
@testable import UblkCrypto

@Suite struct XTSCipherTests {
    let files = KeyFiles()

    /// The IEEE vectors' key of `bits`: vector 10's (AES-256) or vector 4's (AES-128).
    func vectorKey(bits: Int) throws -> XTSKey {
        let size = try XTSKeySize(bits: bits)
        return try files.key(size == .bits512 ? XTSVectors.key10 : XTSVectors.key4, size: size)
    }

    /// Encrypts `plaintext` at `sector`, checks the ciphertext, decrypts it in place and
    /// checks the plaintext comes back.
    func expectRoundTrip(key: borrowing XTSKey, unitSize: Int = 512, plaintext: [UInt8], sector: UInt64,
                         ciphertext expected: [UInt8]) throws {
        var cipher = try XTSCipher(key: key, unitSize: unitSize)
        var buffer = [UInt8](repeating: 0, count: plaintext.count)
        try plaintext.withUnsafeBytes { source in
            try buffer.withUnsafeMutableBytes {
                try cipher.encrypt(source.baseAddress!, into: $0.baseAddress!, count: $0.count, sector: sector)
            }
        }
        #expect(Hex.string(buffer) == Hex.string(expected))
        try buffer.withUnsafeMutableBytes { try cipher.decrypt($0.baseAddress!, count: $0.count, sector: sector) }
        #expect(buffer == plaintext)
    }

    @Test func ieeeVector4AES128Sector0() throws {
        let key = try files.key(XTSVectors.key4, size: .bits256)
        try expectRoundTrip(key: key, plaintext: XTSVectors.plaintext, sector: XTSVectors.sector4,
                            ciphertext: XTSVectors.ciphertext4)
    }

    @Test func ieeeVector10AES256Sector255() throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        try expectRoundTrip(key: key, plaintext: XTSVectors.plaintext, sector: XTSVectors.sector10,
                            ciphertext: XTSVectors.ciphertext10)
    }

    /// Two 512-byte units from sector 254: the second one is vector 10 (sector 255), so the
    /// IV advances by one per unit and each unit is its own XTS message.
    @Test func ivAdvancesOneSectorPer512ByteUnit() throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        var cipher = try XTSCipher(key: key)
        var buffer = XTSVectors.plaintext + XTSVectors.plaintext
        try buffer.withUnsafeMutableBytes {
            try cipher.encrypt($0.baseAddress!, into: $0.baseAddress!, count: $0.count, sector: 254)
        }
        #expect(Array(buffer[512...]) == XTSVectors.ciphertext10)
        #expect(Array(buffer[..<512]) != XTSVectors.ciphertext10)
    }

    /// 4096-byte units (`--sector-size 4096`): the IV is still counted in 512-byte sectors,
    /// so it advances by 8 per unit. The expected values were computed once, independently
    /// of this code, with Python's `cryptography` (AES-XTS, one encryptor per 4096-byte
    /// unit, tweak = little-endian sector number), for the plaintext of `pattern`:
    ///   key10, units at sectors 16 and 24; key4, units at sectors 0 and 8.
    /// The kernel's dm-crypt wrote the same bytes (same SHA-256) in the test VM (Linux 6.12,
    /// cryptsetup 2.6.1 open --type plain --cipher aes-xts-plain64 --sector-size 4096).
    @Test(arguments: [
        (512, 16, "7da5d5471af6f6e07a5b5150f38ab008ca14e1918eaa0d6db96f81d033372cd7",
         "77f83aa8c37e1308636a3619cc4a5eb9", "12c65e919accd3912b5dfaf8859f1c0f"),
        (256, 0, "cde463656a86b75d519678683295e0298141af3b0123b5dc520f48cf0e974837",
         "08be147a11291a37afb319d9b0a2a7b4", "9e5f72319059220d4183d2816d2c3891"),
    ])
    func fourKiBUnitsMatchPython(bits: Int, sector: UInt64, sha256: String, unit0: String, unit1: String) throws {
        let key = try vectorKey(bits: bits)
        var cipher = try XTSCipher(key: key, unitSize: 4096)
        let plaintext = XTSCipherTests.pattern(count: 8192)
        var buffer = [UInt8](repeating: 0, count: 8192)
        try plaintext.withUnsafeBytes { source in
            try buffer.withUnsafeMutableBytes {
                try cipher.encrypt(source.baseAddress!, into: $0.baseAddress!, count: 8192, sector: sector)
            }
        }
        #expect(Hex.string(buffer[0..<16]) == unit0)
        #expect(Hex.string(buffer[4096..<4112]) == unit1)
        #expect(XTSCipherTests.sha256(buffer) == sha256)
        try buffer.withUnsafeMutableBytes { try cipher.decrypt($0.baseAddress!, count: 8192, sector: sector) }
        #expect(buffer == plaintext)
    }

    /// A request of many units equals the same units done one by one at their own sectors,
    /// and equal plaintext units at different sectors encrypt differently.
    @Test(arguments: [512, 4096])
    func manyUnitsEqualOneByOne(unitSize: Int) throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        var cipher = try XTSCipher(key: key, unitSize: unitSize)
        let plaintext = Array([[UInt8]](repeating: XTSCipherTests.pattern(count: unitSize), count: 4).joined())
        let start: UInt64 = 1000
        var whole = plaintext, pieces = plaintext
        try whole.withUnsafeMutableBytes {
            try cipher.encrypt($0.baseAddress!, into: $0.baseAddress!, count: $0.count, sector: start)
        }
        try pieces.withUnsafeMutableBytes { raw in
            for unit in 0..<4 {
                let at = raw.baseAddress! + unit * unitSize
                try cipher.encrypt(at, into: at, count: unitSize, sector: start + UInt64(unit * unitSize / 512))
            }
        }
        #expect(whole == pieces)
        let units = (0..<4).map { Array(whole[$0 * unitSize..<($0 + 1) * unitSize]) }
        #expect(Set(units).count == 4)
    }

    /// Random data of several sizes, both key sizes, interleaved encrypt and decrypt on
    /// one cipher (which needs the separate decryption context).
    @Test(arguments: [(256, 512), (512, 512), (256, 4096), (512, 4096)])
    func roundTrips(bits: Int, unitSize: Int) throws {
        let key = try vectorKey(bits: bits)
        var cipher = try XTSCipher(key: key, unitSize: unitSize)
        var generator = SystemRandomNumberGenerator()
        for units in [1, 2, 7, 32] {
            let plaintext = (0..<units * unitSize).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let sector = UInt64.random(in: 0...(1 << 40), using: &generator)
            var buffer = [UInt8](repeating: 0, count: plaintext.count)
            try plaintext.withUnsafeBytes { source in
                try buffer.withUnsafeMutableBytes {
                    try cipher.encrypt(source.baseAddress!, into: $0.baseAddress!, count: $0.count, sector: sector)
                }
            }
            #expect(buffer != plaintext)
            try buffer.withUnsafeMutableBytes { try cipher.decrypt($0.baseAddress!, count: $0.count, sector: sector) }
            #expect(buffer == plaintext)
        }
    }

    /// The cipher calls OpenSSL's AES-XTS provider functions directly; the result must be
    /// what the EVP layer (`EVP_CipherInit_ex` + `EVP_CipherUpdate` per unit, dm-crypt's
    /// plain64 IV) makes of the same random data, both ways, for both key and unit sizes.
    @Test(arguments: [(256, 512), (512, 512), (256, 4096), (512, 4096)])
    func matchesOpenSSLsEVPLayer(bits: Int, unitSize: Int) throws {
        let key = try vectorKey(bits: bits)
        var cipher = try XTSCipher(key: key, unitSize: unitSize)
        var generator = SystemRandomNumberGenerator()
        let plaintext = (0..<8 * unitSize).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let sector = UInt64.random(in: 0...(1 << 40), using: &generator)
        var ours = [UInt8](repeating: 0, count: plaintext.count)
        try plaintext.withUnsafeBytes { source in
            try ours.withUnsafeMutableBytes {
                try cipher.encrypt(source.baseAddress!, into: $0.baseAddress!, count: $0.count, sector: sector)
            }
        }
        let keyBytes = Array(key.bytes)
        let evp = try Self.evp(encrypting: true, plaintext, key: keyBytes, unitSize: unitSize, sector: sector)
        #expect(ours == evp)
        #expect(try Self.evp(encrypting: false, evp, key: keyBytes, unitSize: unitSize, sector: sector) == plaintext)
        try ours.withUnsafeMutableBytes { try cipher.decrypt($0.baseAddress!, count: $0.count, sector: sector) }
        #expect(ours == plaintext)
    }

    /// dm-crypt plain64 AES-XTS through OpenSSL's EVP layer, one init and update per unit.
    static func evp(encrypting: Bool, _ input: [UInt8], key: [UInt8], unitSize: Int, sector: UInt64) throws -> [UInt8] {
        let context = try #require(EVP_CIPHER_CTX_new())
        defer { EVP_CIPHER_CTX_free(context) }
        let cipher = key.count == 64 ? EVP_aes_256_xts() : EVP_aes_128_xts()
        try #require(EVP_CipherInit_ex(context, cipher, nil, key, nil, encrypting ? 1 : 0) == 1)
        var output = [UInt8](repeating: 0, count: input.count)
        for unit in 0..<input.count / unitSize {
            var iv = [UInt8](repeating: 0, count: 16)
            withUnsafeBytes(of: (sector + UInt64(unit * unitSize / 512)).littleEndian) { iv.replaceSubrange(0..<8, with: $0) }
            try #require(EVP_CipherInit_ex(context, nil, nil, nil, iv, encrypting ? 1 : 0) == 1)
            var written: Int32 = 0
            let range = unit * unitSize..<(unit + 1) * unitSize
            let updated = output.withUnsafeMutableBufferPointer { out in
                input.withUnsafeBufferPointer { EVP_CipherUpdate(context, out.baseAddress! + range.lowerBound, &written,
                                                                 $0.baseAddress! + range.lowerBound, Int32(unitSize)) }
            }
            try #require(updated == 1 && written == Int32(unitSize))
        }
        return output
    }

    /// The wrong sector does not decrypt: the tweak really is the sector.
    @Test func wrongSectorDoesNotDecrypt() throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        var cipher = try XTSCipher(key: key)
        var buffer = XTSVectors.ciphertext10
        try buffer.withUnsafeMutableBytes { try cipher.decrypt($0.baseAddress!, count: 512, sector: 254) }
        #expect(buffer != XTSVectors.plaintext)
    }

    @Test func sectorCounterWrapsLikeDmCrypt() throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        var cipher = try XTSCipher(key: key)
        var wrapped = XTSVectors.plaintext + XTSVectors.plaintext
        try wrapped.withUnsafeMutableBytes {
            try cipher.encrypt($0.baseAddress!, into: $0.baseAddress!, count: $0.count, sector: UInt64.max)
        }
        var atZero = XTSVectors.plaintext
        try atZero.withUnsafeMutableBytes { try cipher.encrypt($0.baseAddress!, into: $0.baseAddress!, count: 512, sector: 0) }
        #expect(Array(wrapped[512...]) == atZero)
    }

    @Test func countMustBeWholeUnits() throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        var cipher = try XTSCipher(key: key, unitSize: 4096)
        var buffer = [UInt8](repeating: 0, count: 4096)
        #expect(throws: XTSCipherError.misaligned(count: 512, unitSize: 4096)) {
            try buffer.withUnsafeMutableBytes { try cipher.decrypt($0.baseAddress!, count: 512, sector: 0) }
        }
        #expect(buffer.allSatisfy { $0 == 0 })
        #expect(XTSCipherError.misaligned(count: 512, unitSize: 4096).description
            == "a request of 512 bytes is not a whole number of 4096-byte sectors: "
            + "the device must advertise 4096-byte logical blocks")
    }

    @Test(arguments: [0, 256, 1024, 2048, 8192])
    func onlyDmCryptUnitSizes(unitSize: Int) throws {
        let key = try files.key(XTSVectors.key10, size: .bits512)
        #expect(throws: XTSCipherError.unsupportedUnitSize(unitSize)) { _ = try XTSCipher(key: key, unitSize: unitSize) }
    }

    /// The plaintext of the 4096-byte checks (the same formula as the Python that computed them).
    static func pattern(count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ ($0 >> 8)) }
    }

    static func sha256(_ bytes: [UInt8]) -> String {
        var digest = [UInt8](repeating: 0, count: 32)
        var length: UInt32 = 0
        let done = bytes.withUnsafeBufferPointer { EVP_Digest($0.baseAddress, $0.count, &digest, &length, EVP_sha256(), nil) }
        precondition(done == 1 && length == 32, "EVP_Digest sha256 failed")
        return Hex.string(digest)
    }
}
