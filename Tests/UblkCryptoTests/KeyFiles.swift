import Glibc
import UblkCrypto
import UblkSystem

/// Key files for the tests, in a private temporary directory that goes away with it.
final class KeyFiles {
    let directory: String

    init() {
        let base = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        var template = Array("\(base)/ublk-crypto-XXXXXX".utf8CString)
        directory = String(cString: mkdtemp(&template))
    }

    deinit {
        for name in SmallFile.entries(of: directory) { SmallFile.remove("\(directory)/\(name)") }
        rmdir(directory)
    }

    /// Writes `bytes` to file `name` and returns its path.
    func write(_ name: String, _ bytes: [UInt8]) throws -> String {
        let path = "\(directory)/\(name)"
        try SmallFile.writeAtomically(path, bytes, mode: 0o600)
        return path
    }

    /// A key read from a file holding `bytes`.
    func key(_ bytes: [UInt8], size: XTSKeySize) throws -> XTSKey {
        try XTSKey(file: write("key-\(bytes.count)", bytes), size: size)
    }
}
