import Glibc
import UblkSystem

/// Why a key could not be made. Each description is one line that says what to do, and
/// none contains key bytes.
public enum XTSKeyError: Error, Equatable, Sendable, CustomStringConvertible {
    case unsupportedKeySize(bits: Int)
    case cannotOpen(path: String, size: XTSKeySize, SystemError)
    case cannotRead(source: KeySource, SystemError)
    case tooShort(source: KeySource, bytes: Int, size: XTSKeySize)
    case equalHalves(source: KeySource, size: XTSKeySize)
    case cannotLockMemory(SystemError)
    /// `--key-file -` with a terminal on standard input: the key is raw bytes, not a passphrase.
    case terminal(source: KeySource)

    public var description: String {
        switch self {
        case .unsupportedKeySize(let bits):
            return "--key-size \(bits) is not supported: use --key-size 512 (AES-256-XTS, the default) "
                + "or --key-size 256 (AES-128-XTS)"
        case .cannotOpen(let path, let size, let error) where error.errno == ENOENT:
            // A mistyped path, most likely: an image opens only with its own key.
            return "key file \(path) does not exist: check the path (only for a new image, make a key with head -c \(size.byteCount) /dev/urandom > \(path))"
        case .cannotOpen(let path, _, let error):
            return "cannot open key file \(path) (\(error.reason)): check the path and its permissions"
        case .cannotRead(let source, let error):
            return "cannot read \(source) (\(error.reason)): give --key-file a readable file or pipe"
        case .tooShort(let source, let bytes, let size):
            return "\(source) has \(bytes) bytes, --key-size \(size.rawValue) needs \(size.byteCount): "
                + (bytes * 8 == XTSKeySize.bits256.rawValue ? "if it is a 256-bit key, give --key-size 256"
                                                            : XTSKeyError.newKeyAdvice(source, size))
        case .equalHalves(let source, let size):
            return "\(source) has two equal halves, which XTS does not allow (bytes 1-\(size.byteCount / 2) "
                + "must differ from the rest): \(XTSKeyError.newKeyAdvice(source, size))"
        case .terminal(let source):
            return "\(source) is a terminal, but the key is raw bytes, not a passphrase: give --key-file a file "
                + "or a pipe (for a passphrase, run cryptsetup luksFormat on a plain ublk device)"
        case .cannotLockMemory(let error):
            return "cannot lock the key in memory (\(error.call): \(error.reason)): raise the locked-memory "
                + "limit (ulimit -l, or LimitMEMLOCK= in the service unit)"
        }
    }

    /// What to do about a key that cannot be one: an image opens only with its own key, so
    /// a new key is for a new image only (never the advice to overwrite a key file).
    private static func newKeyAdvice(_ source: KeySource, _ size: XTSKeySize) -> String {
        switch source {
        case .file: return "give the file with the whole key; for a new image, make a new key file with head -c \(size.byteCount) /dev/urandom"
        case .stream: return "send the whole key; for a new image, make a key with head -c \(size.byteCount) /dev/urandom"
        }
    }
}

/// Why the cipher could not be set up or could not run.
public enum XTSCipherError: Error, Equatable, Sendable, CustomStringConvertible {
    case unsupportedUnitSize(Int)
    case keyLengthMismatch(expected: Int, actual: Int)
    case misaligned(count: Int, unitSize: Int)
    case openSSL(call: String, reason: String)

    public var description: String {
        switch self {
        case .unsupportedUnitSize(let size):
            return "encryption works in 512- or 4096-byte sectors, not \(size): use --block-size 512 or 4096"
        case .keyLengthMismatch(let expected, let actual):
            return "OpenSSL's cipher takes a \(expected)-byte key but the key has \(actual) bytes: "
                + "this is a bug in ublk, please report it"
        case .misaligned(let count, let unitSize):
            return "a request of \(count) bytes is not a whole number of \(unitSize)-byte sectors: "
                + "the device must advertise \(unitSize)-byte logical blocks"
        case .openSSL(let call, let reason):
            return "OpenSSL \(call) failed (\(reason)): check that libssl3 offers AES-XTS "
                + "(openssl enc -list | grep xts)"
        }
    }
}
