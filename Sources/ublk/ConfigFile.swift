import Glibc
import UblkSystem

/// A device config file: one `ublk add` option per line, `key = value`, with `#`
/// comments; a value may be quoted (`file = "/srv/my disk.img"`). Keys are the long option names (`file`, `queues`, `depth`, `direct-io`,
/// `read-only`, `block-size`, `offset`, `size`, `id`, `target`, `recovery`, `zero-copy`, `batch-io`,
/// `poll-us`, `swap`,
/// for an NBD export `uri`, `reconnect-timeout`, and for an encrypted device `encryption`,
/// `key-file` (a path), `key-size`, `skip`, `cipher-threads`, `allow-discards`); flags take yes/no, `recovery` yes, reissue,
/// fail-io or no. A relative `file` or `key-file` is found from the config file's directory.
/// The file is turned into `ublk add` arguments and parsed by the same code as the command
/// line, so both accept and refuse exactly the same things.
///
///     # /etc/ublk/data.conf
///     file = /srv/data.img
///     queues = 2
///     direct-io = auto
enum ConfigFile {
    /// Directory of `NAME.conf` files for `ublk start NAME` (`$UBLK_CONFIG_DIR` overrides).
    static var directory: String {
        getenv("UBLK_CONFIG_DIR").map { String(cString: $0) } ?? "/etc/ublk"
    }

    static let flags: Set<String> = ["read-only", "force", "allow-discards", "swap"]
    /// Flags whose `no` is said (`--no-read-only`: a writable device or none).
    static let invertibleFlags: Set<String> = ["read-only", "force"]
    /// `recovery = yes|reissue|fail-io|no` (yes is reissue, as before fail-io existed), and
    /// the other words flags take for yes and no.
    static let recoveryValues = ["yes": "reissue", "true": "reissue", "on": "reissue", "1": "reissue",
                                 "reissue": "reissue", "fail-io": "fail-io",
                                 "no": nil, "false": nil, "off": nil, "0": nil] as [String: String?]
    /// Keys whose values are words (`auto`, `on`...), taken in any case as flags' are.
    static let wordKeys: Set<String> = ["target", "direct-io", "zero-copy", "batch-io", "encryption"]
    static let options: Set<String> = ["file", "target", "id", "queues", "depth", "direct-io", "block-size", "sector-size",
                                       "offset", "size", "sizelimit",
                                       "zero-copy", "batch-io", "poll-us", "encryption", "key-file", "key-size", "skip", "cipher-threads", "uri", "reconnect-timeout"]

    /// The most a config file may hold: a few dozen lines are plenty.
    static let sizeLimit = 1 << 20

    /// One `ublk add` argument of a config file, and the line it comes from.
    struct Argument: Equatable {
        var text: String
        var line: Int
        /// `--key` of `--key=value`.
        var option: Substring { text.split(separator: "=", maxSplits: 1)[0] }
        /// `option` under its main name (`--size` for `--sizelimit`), as checks name it.
        var canonicalOption: String { ConfigFile.aliases[String(option.dropFirst(2))].map { "--" + $0 } ?? String(option) }
        /// Does command-line argument `argument` give the same option?
        func sameOption(_ argument: String) -> Bool { argument == option || argument.hasPrefix(option + "=") }
    }

    /// The `ublk add` arguments the file at `path` stands for.
    static func arguments(path: String) throws -> [Argument] {
        let bytes: [UInt8]
        // Standard input by name, as for --key-file: /dev/stdin need not exist (no udev).
        let isStandardInput = KeyOptions.standardInputNames.contains(path)
        do {
            bytes = isStandardInput ? try SmallFile.read(from: STDIN_FILENO, named: path, limit: sizeLimit)
                                    : try SmallFile.read(path, limit: sizeLimit)
        } catch { throw readError(error, path: path) }
        // A pipe (`<(...)`, standard input) has no neighbours, nor has a file named by a
        // descriptor (/dev/fd/N, /proc/self/fd/N): their relative paths are the working directory's.
        var status = stat()
        let hasNeighbours = !isStandardInput && !path.hasPrefix("/dev/") && !path.hasPrefix("/proc/")
            && stat(path, &status) == 0 && status.st_mode & S_IFMT == S_IFREG
        // A byte order mark (an editor's, on Windows) is no part of the first key.
        let text = bytes.starts(with: [0xEF, 0xBB, 0xBF]) ? bytes.dropFirst(3) : bytes[...]
        return try entries(text: try utf8Text(text, path: path), path: path, base: hasNeighbours ? directory(of: path) : nil)
    }

    /// The file's text. A line that is not UTF-8 is refused, naming it (decoded with U+FFFD
    /// in place of its bad bytes, a path in another encoding would name another file),
    /// unless only its comment is (dropped, as comments are). A key file given for a config
    /// file by mistake is said to be one, as `entries` says of other lines without `=`.
    static func utf8Text(_ bytes: ArraySlice<UInt8>, path: String) throws -> String {
        if let text = String(validating: bytes, as: UTF8.self) { return text }
        var lines: [String] = []
        for (index, line) in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).enumerated() {
            if let text = String(validating: line, as: UTF8.self) { lines.append(text); continue }
            if let start = commentStart(line), let text = String(validating: line[..<start], as: UTF8.self) {
                lines.append(text)
            } else if !line.contains(UInt8(ascii: "=")) {
                throw notKeyValue(path, line: index + 1)
            } else {
                throw CLIError("\(path):\(index + 1): not UTF-8 text (a name in another encoding?): save the file as UTF-8; a path must be a UTF-8 name (or a symbolic link with one)")
            }
        }
        return lines.joined(separator: "\n")
    }

    /// A line that is no `key = value` (the line itself is never shown: a key file given
    /// for a config file by mistake would be printed, and logged under a service manager).
    static func notKeyValue(_ path: String, line: Int) -> CLIError {
        CLIError("\(path):\(line): expected `key = value`: is \(path) a config file? (a key is given with --key-file)")
    }

    /// The directory `path` is in, as written ("." for a bare name).
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// The keys that name files: a relative one is the config file's neighbour, found from
    /// its directory (`base`) as a user reading the file expects, not from the working
    /// directory of whoever runs it (`/` under systemd).
    static let pathKeys: Set<String> = ["file", "key-file"]

    /// Why the file at `path` could not be read, and what to do; "create it" only where it is missing.
    static func readError(_ error: any Error, path: String) -> CLIError {
        guard let error = error as? SystemError else { return CLIError("cannot read config file \(path): \(error)") }
        switch error.errno {
        case ENOENT: return CLIError("config file \(path) does not exist: create it (see README.md, Running as a service)")
        case EFBIG: return CLIError("config file \(path) holds more than \(sizeLimit >> 20) MiB: give a file of `key = value` lines")
        case EISDIR: return CLIError("config file \(path) is a directory: give a file of `key = value` lines")
        default: return CLIError("cannot read config file \(path): \(error.reason)")
        }
    }

    /// `line` up to its comment (`commentStart`).
    static func withoutComment(_ line: String) -> String {
        guard let start = commentStart(line.utf8) else { return line }
        return String(line[..<start])
    }

    /// Where the comment of a line starts: a `#` that starts the line or follows a space or
    /// tab (so a value such as `file = /srv/disk#2.img` keeps its `#`), outside the quotes of
    /// a value (`file = "/srv/my #1.img"`). It reads bytes: every mark it looks for is ASCII,
    /// which no byte of another UTF-8 character is, so a line that is not UTF-8 reads alike.
    static func commentStart<Line: Collection<UInt8>>(_ line: Line) -> Line.Index? {
        let (space, tab, equals) = (UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "="))
        var previous = space
        var quote: UInt8?
        var afterEquals = false
        for index in line.indices {
            let byte = line[index]
            if let open = quote {
                if byte == open { quote = nil }
            } else if byte == UInt8(ascii: "#") && (previous == space || previous == tab) {
                return index
            } else if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "'"),
                      afterEquals && [space, tab, equals].contains(previous) {
                quote = byte  // A quote that opens the value.
            }
            if byte == equals { afterEquals = true }
            previous = byte
        }
        return nil
    }

    static func arguments(text: String, path: String) throws -> [String] {
        try entries(text: text, path: path, base: directory(of: path)).map(\.text)
    }

    /// The keys that are other names of a key (as losetup's `--sizelimit` and `--sector-size`):
    /// one line may not say what another says under the other name.
    static let aliases = ["sizelimit": "size", "sector-size": "block-size"]

    /// `text` as `ublk add` arguments; relative paths are taken from `base` (nil: the working directory).
    static func entries(text: String, path: String, base: String?) throws -> [Argument] {
        var arguments: [Argument] = []
        var seen: [String: (line: Int, key: String)] = [:]
        // By "\r\n" too (a file from Windows): Swift takes it for one Character, not "\n".
        let lines = text.split(omittingEmptySubsequences: false) { $0 == "\n" || $0 == "\r\n" }
        for (index, rawLine) in lines.enumerated() {
            let line = withoutComment(String(rawLine)).trimmingSpaces
            if line.isEmpty { continue }
            let (key, value) = try keyValue(line, path: path, line: index + 1)
            // One would be taken silently (the last, or, for `file`, refused by the server).
            if let first = seen.updateValue((index + 1, key), forKey: aliases[key] ?? key) {
                let earlier = first.key == key ? "" : " as \(first.key)"
                throw CLIError("\(path):\(index + 1): \(key) is given again (first\(earlier) on line \(first.line)): give it once")
            }
            let add = { (text: String) in arguments.append(Argument(text: text, line: index + 1)) }
            if key == "recovery" {
                guard let policy = recoveryValues[value.lowercased()] else {
                    throw CLIError("\(path):\(index + 1): recovery takes yes, reissue, fail-io or no (off), not `\(value)`")
                }
                if let policy { add("--recovery=\(policy)") }
            } else if flags.contains(key) {
                switch value.lowercased() {
                case "yes", "true", "on", "1": add("--\(key)")
                case "no", "false", "off", "0": if invertibleFlags.contains(key) { add("--no-\(key)") }
                default: throw CLIError("\(path):\(index + 1): \(key) takes yes or no, not `\(value)`")
                }
            } else if key == "key-file" && KeyOptions.standardInputNames.contains(value) {
                throw CLIError("\(path):\(index + 1): key-file = \(value) reads standard input, which a service does not have: give the key file's path")
            } else if pathKeys.contains(key), let base, !value.hasPrefix("/"), base != "." {
                add("--\(key)=\(base == "/" ? "" : base)/\(value)")
            } else if options.contains(key) {
                // One word: a value that starts with a dash (`skip = -1`, a file named
                // `-x`) is the option's value, not an option of its own.
                add("--\(key)=\(value)")
            } else if knownKeys.contains(key.lowercased()) {
                throw CLIError("\(path):\(index + 1): keys are lower-case: write \(key.lowercased()), not \(key)")
            } else {
                throw CLIError("\(path):\(index + 1): unknown key\(shown(key)): use one of \(knownKeys.sorted().joined(separator: ", "))")
            }
        }
        return arguments
    }

    static var knownKeys: Set<String> { options.union(flags).union(["recovery"]) }

    /// A line's key and value (without the quotes around it; a word's lower-cased).
    static func keyValue(_ text: String, path: String, line: Int) throws -> (key: String, value: String) {
        let parts = text.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map { String($0).trimmingSpaces }
        guard parts.count == 2, !parts[0].isEmpty else { throw notKeyValue(path, line: line) }
        let key = parts[0]
        // (A key that is no option's name is not shown: it may be a key file's bytes.)
        guard !parts[1].unquoted.isEmpty else {
            if shown(key).isEmpty { throw notKeyValue(path, line: line) }
            throw CLIError("\(path):\(line): \(key) has no value: give one, or delete the line")
        }
        if let quote = parts[1].first, quote == "\"" || quote == "'", parts[1].count < 2 || parts[1].last != quote {
            let name = shown(key).isEmpty ? "the line" : key
            if parts[1].dropFirst().contains(quote) {
                throw CLIError("\(path):\(line): the value of \(name) has text after its closing quote (\(quote)): a comment needs a space before its #")
            }
            throw CLIError("\(path):\(line): the value of \(name) opens a quote (\(quote)) that it does not close: end it with \(quote)")
        }
        return (key, wordKeys.contains(key) ? parts[1].unquoted.lowercased() : parts[1].unquoted)
    }
}

extension ConfigFile {
    /// An unknown key as the error shows it: only if it looks like an option's name
    /// (lowercase words and dashes), never what may be part of a key file given by mistake.
    static func shown(_ key: String) -> String {
        let plain = key.count <= 32 && key.unicodeScalars.allSatisfy { ("a"..."z").contains($0) || $0 == "-" }
        return plain ? " `\(key)`" : ""
    }
}

extension String {
    /// Without the double or single quotes around it, as a shell or systemd takes
    /// `file = "/srv/my disk.img"` (nothing inside is unescaped).
    var unquoted: String {
        guard count >= 2, let first, first == "\"" || first == "'", last == first else { return self }
        return String(dropFirst().dropLast())
    }

    var trimmingSpaces: String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\t" || c == "\r" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\t" || c == "\r" { s.removeLast() }
        return String(s)
    }
}
