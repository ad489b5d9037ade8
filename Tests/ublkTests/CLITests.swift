import FoundationEssentials
import ArgumentParser
import Glibc
import Synchronization
import Testing
import UblkServer
import UblkSystem
import UblkTargets
@testable import ublk

@Suite struct CLITests {
    /// What `ublk add ARGUMENTS` says: "accepted", or the message of its refusal.
    func message(_ arguments: [String]) -> String {
        do {
            let options = try DeviceOptions.parse(arguments)
            try options.check()
            return "accepted"
        } catch { return DeviceOptions.message(for: error) }
    }

    @Test func versionIsOneLineAndExitsZero() {
        do {
            _ = try Ublk.parseAsRoot(["--version"])
            Issue.record("--version parsed as a command")
        } catch {
            #expect(Ublk.fullMessage(for: error) == "ublk from ublk-swift \(Ublk.version)")
            #expect(Ublk.exitCode(for: error) == .success)
        }
    }

    /// As util-linux's strtosize (losetup --offset, --sizelimit): K and KiB are 1024, KB 1000.
    @Test func byteCountsReadAsLosetupReadsThem() throws {
        func bytes(_ text: String) -> UInt64? { try? ByteCount.parse(text).value }
        #expect(bytes("4096") == 4096)
        #expect(bytes("512K") == 512 << 10)
        #expect(bytes("256m") == 256 << 20)
        #expect(bytes("1GiB") == 1 << 30)
        #expect(bytes("2T") == 2 << 40)
        #expect(bytes("1P") == 1 << 50 && bytes("1E") == 1 << 60)
        #expect(bytes("1KB") == 1000 && bytes("64MB") == 64_000_000 && bytes("1GB") == 1_000_000_000)
        #expect(bytes("2TB") == 2_000_000_000_000 && bytes("1PB") == 1_000_000_000_000_000)
        #expect(bytes("0x1000") == 4096 && bytes("0X10K") == 16 << 10 && bytes("0x1b") == 27)
        #expect(bytes("1.5K") == 1536 && bytes("0.5M") == 512 << 10 && bytes("1.5KB") == 1500 && bytes("2.000G") == 2 << 30)
        #expect(bytes("512B") == 512 && bytes("0") == 0)
        for refused in ["lots", "-1", "99999999999T", "16E", "12Q", "1.1K", "1.5", "010", "0x", "1KBB", "1Kb5", " 1", "1.2.3K",
                        "0x1.8K", "18446744073709551616"] {
            #expect(bytes(refused) == nil, "\(refused)")
        }
    }

    @Test func aSizeRefusalSaysWhatIsAccepted() {
        func line(_ size: String) -> String {
            do { _ = try Ublk.parseAsRoot(["add", "--file", "a", "--size", size]); return "accepted" } catch { return Ublk.errorLine(for: error) }
        }
        #expect(line("12Q") == "The value '12Q' is invalid for '--size <size>': \(ByteCount.accepted): see `ublk add --help`")
        #expect(line("1.1K").contains("not a whole number of bytes"))
        // Forty digits after the point: refused, not an overflow of 10^40.
        #expect(line("1.0000000000000000000000000000000000000001G").contains("not a whole number of bytes"))
        #expect(line("010").contains("octal"))
        #expect(line("99999999999T").contains("more than 2^64 bytes"))
        #expect((try? Ublk.parseAsRoot(["resize", "--id", "0", "--size", "1GB"])) != nil)
    }

    @Test func configFileBecomesAddArguments() throws {
        let text = """
        # data disk
        file = /srv/data.img
        queues = 2   # two threads
        direct-io=off
        read-only = yes
        recovery = no
        size = 1G
        """
        let arguments = try ConfigFile.arguments(text: text, path: "data.conf")
        #expect(arguments == ["--file=/srv/data.img", "--queues=2", "--direct-io=off", "--read-only", "--size=1G"])
        let options = try DeviceOptions.parse(arguments)
        #expect(options.readOnly && options.queues == 2 && options.directIO == .off && options.size?.value == 1 << 30)
    }

    @Test func configFileFlagsCommentsAndAliases() throws {
        let text = """
        file = /srv/disk#2.img   # the second disk
        #size = 1G
        read-only = yes
        force = yes
        sizelimit = 64M
        sector-size = 4096
        """
        let arguments = try ConfigFile.arguments(text: text, path: "b.conf")
        #expect(arguments == ["--file=/srv/disk#2.img", "--read-only", "--force", "--sizelimit=64M", "--sector-size=4096"])
        // The command line overrides the file's flags too.
        let options = try DeviceOptions.parse(arguments + ["--no-read-only"])
        #expect(!options.readOnly && options.force && options.size?.value == 64 << 20 && options.blockSize == 4096)
        #expect(options.file == "/srv/disk#2.img")
        // Lines ended by CR LF (an editor on Windows), and quoted values.
        let windows = "file = \"/srv/my disk.img\"\r\nqueues = '2'\r\nread-only = yes\r\n"
        #expect(try ConfigFile.arguments(text: windows, path: "w.conf") == ["--file=/srv/my disk.img", "--queues=2", "--read-only"])
        // A quote the value does not close is said, not taken as part of the value.
        for text in ["size = \"1G'", "file = \"disk.img", "file = '"] {
            #expect(throws: CLIError.self) { try ConfigFile.arguments(text: text, path: "q.conf") }
        }
        func refusal(_ text: String) -> String {
            do { return "taken: \(try ConfigFile.arguments(text: text, path: "q.conf"))" } catch { return "\(error)" }
        }
        #expect(refusal("file = \"disk.img") == "q.conf:1: the value of file opens a quote (\") that it does not close: end it with \"")
        #expect(refusal("queues='2'#x") == "q.conf:1: the value of queues has text after its closing quote ('): a comment needs a space before its #")
        // A key that is no option's name is never shown (it may be a key file's line).
        #expect(refusal("SecretPassphraseAbc = x") == "q.conf:1: unknown key: use one of \(ConfigFile.knownKeys.sorted().joined(separator: ", "))")
        #expect(refusal("SecretPassphraseAbc =").hasPrefix("q.conf:1: expected `key = value`"))
        // An empty value, and a key written in capitals, are said as such.
        #expect(refusal("queues = 1\nfile =") == "q.conf:2: file has no value: give one, or delete the line")
        #expect(refusal("File = disk.img") == "q.conf:1: keys are lower-case: write file, not File")
        // Quotes keep a `#` that would start a comment; a comment may follow them.
        #expect(try ConfigFile.arguments(text: "file = \"/srv/my #1.img\" # the first\nqueues='2' #x", path: "/etc/ublk/q.conf")
                == ["--file=/srv/my #1.img", "--queues=2"])
        #expect(throws: CLIError.self) { try ConfigFile.arguments(text: "queues='2'#x", path: "/etc/ublk/q.conf") }
        #expect(throws: CLIError.self) { try ConfigFile.arguments(text: "file = \"\"", path: "q.conf") }
    }

    /// `--swap` (or `swap = yes`) reaches the server's options; off by default.
    @Test func swapReachesTheServer() throws {
        #expect(try DeviceOptions.parse(["--file", "/a", "--swap"]).serverOptions.swap)
        #expect(try !DeviceOptions.parse(["--file", "/a"]).serverOptions.swap)
        #expect(try ConfigFile.arguments(text: "file = /a\nswap = yes", path: "s.conf") == ["--file=/a", "--swap"])
        #expect(try ConfigFile.arguments(text: "file = /a\nswap = no", path: "s.conf") == ["--file=/a"])
        #expect(try !DeviceOptions.parse(["--file", "/a", "--swap", "--no-swap"]).serverOptions.swap)
    }

    /// A config file's `allow-discards = yes` gives way to `--no-allow-discards` after it.
    @Test func allowDiscardsIsOverridden() throws {
        let encrypted = ["--file", "/a", "--encryption", "aes-xts-plain64", "--key-file", "/k"]
        func allows(_ arguments: [String]) throws -> Bool? {
            guard case .loop(let configuration) = try DeviceOptions.parse(encrypted + arguments).spec else { return nil }
            return configuration.encryption?.allowDiscards
        }
        #expect(try allows(["--allow-discards"]) == true)
        #expect(try allows(["--allow-discards", "--no-allow-discards"]) == nil)
        #expect(try allows([]) == nil)
    }

    /// `read-only`: yes, no (a writable device or a refusal), or unsaid (as losetup: read-only
    /// where the backing cannot be written).
    @Test func readOnlyHasThreeStates() throws {
        func loop(_ arguments: [String]) throws -> LoopConfiguration {
            guard case .loop(let configuration) = try DeviceOptions.parse(arguments).spec else { throw CLIError("not loop") }
            return configuration
        }
        let config = try ConfigFile.arguments(text: "file = /srv/a.img\nread-only = no\nforce = no\nallow-discards = no", path: "a.conf")
        #expect(config == ["--file=/srv/a.img", "--no-read-only", "--no-force"])
        #expect(try loop(config).writableRequired == true && !loop(config).readOnly)
        #expect(try loop(["--file", "/a"]).writableRequired == nil && !loop(["--file", "/a"]).readOnly)
        #expect(try loop(["--file", "/a", "--read-only"]).readOnly)
        #expect(try loop(config + ["--read-only"]).readOnly && loop(config + ["--read-only"]).writableRequired == nil)
    }

    @Test func losetupsNamesAreAccepted() throws {
        let options = try DeviceOptions.parse(["--file", "a", "--sizelimit", "64M", "--sector-size", "4096", "--offset", "1M"])
        #expect(options.size?.value == 64 << 20 && options.blockSize == 4096 && options.offset?.value == 1 << 20)
        // `--sizelimit 0` is no limit, as losetup has it (and `ublk resize` then has none either).
        guard case .loop(let unlimited) = try DeviceOptions.parse(["--file", "a", "--sizelimit", "0"]).spec else {
            Issue.record("not a loop spec")
            return
        }
        #expect(unlimited.size == nil)
    }

    @Test func aRelativeBackingIsRecordedFromTheWorkingDirectory() throws {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let directory = String(cString: getcwd(&buffer, buffer.count)!)
        let spec = try DeviceOptions.parse(["--file", "./images/disk.img"]).spec
        guard case .loop(let configuration) = spec else { Issue.record("not a loop spec"); return }
        #expect(configuration.path == (directory == "/" ? "" : directory) + "/images/disk.img")
        #expect(DeviceOptions.absolute("/srv/a.img") == "/srv/a.img")
        // An existing file by its own name: no `..`, no symbolic link (as losetup -l shows it).
        let scratch = "/tmp/ublk-absolute-\(getpid())"
        defer { _ = unlink("\(scratch)/link"); _ = unlink("\(scratch)/a.img"); _ = rmdir("\(scratch)/sub"); _ = rmdir(scratch) }
        #expect(mkdir(scratch, 0o700) == 0 && mkdir("\(scratch)/sub", 0o700) == 0)
        close(open("\(scratch)/a.img", O_CREAT | O_WRONLY, 0o600))
        #expect(symlink("\(scratch)/a.img", "\(scratch)/link") == 0)
        // (/tmp may be a symbolic link itself.)
        let resolved = realpath(scratch, nil)
        defer { free(resolved) }
        let real = resolved.map { String(cString: $0) } ?? scratch
        #expect(DeviceOptions.absolute("\(scratch)/sub/../a.img") == "\(real)/a.img")
        #expect(DeviceOptions.absolute("\(scratch)/link") == "\(real)/a.img")
    }

    @Test func recoveryTakesAnOptionalPolicy() throws {
        #expect(DeviceOptions.normalizingRecovery(["--recovery"]) == ["--recovery=reissue"])
        #expect(DeviceOptions.normalizingRecovery(["--recovery", "--file", "a"]) == ["--recovery=reissue", "--file", "a"])
        #expect(DeviceOptions.normalizingRecovery(["--recovery", "fail-io", "--file", "a"]) == ["--recovery=fail-io", "--file", "a"])
        #expect(DeviceOptions.normalizingRecovery(["--recovery=off"]) == ["--recovery=off"])
        let parsed = try DeviceOptions.parse(DeviceOptions.normalizingRecovery(["--file", "a", "--recovery"]))
        #expect(parsed.recovery == .reissue && parsed.serverOptions.recovery == .reissue)
        #expect(try DeviceOptions.parse(["--file", "a"]).recovery == .off)
        // A config file's words work on the command line too.
        #expect(DeviceOptions.normalizingRecovery(["--recovery", "yes", "--file", "a"]) == ["--recovery=reissue", "--file", "a"])
        #expect(DeviceOptions.normalizingRecovery(["--recovery=no"]) == ["--recovery=off"])
        #expect(DeviceOptions.normalizingRecovery(["--recovery=sometimes"]) == ["--recovery=sometimes"])
        #expect(throws: (any Error).self) { try DeviceOptions.parse(["--file", "a", "--recovery=sometimes"]) }
        // `add --recovery maybe`: the option's own check names the policies, not "unexpected argument".
        #expect(DeviceOptions.normalizingRecovery(["add", "--recovery", "maybe"]) == ["add", "--recovery=maybe"])
        do { _ = try Ublk.parseAsRoot(DeviceOptions.normalized(["add", "--file", "a", "--recovery", "maybe"])) } catch {
            #expect(Ublk.errorLine(for: error).contains("fail-io"), "\(Ublk.errorLine(for: error))")
        }
        for (value, expected) in [("yes", ["--recovery=reissue"]), ("reissue", ["--recovery=reissue"]),
                                  ("fail-io", ["--recovery=fail-io"]), ("no", [])] {
            #expect(try ConfigFile.arguments(text: "recovery = \(value)", path: "r.conf") == expected)
        }
        #expect(throws: (any Error).self) { try ConfigFile.arguments(text: "recovery = maybe", path: "r.conf") }
    }

    /// A negative number after an option is its value, so the option's own check speaks.
    @Test func negativeValuesReachTheirOption() throws {
        #expect(DeviceOptions.joiningNegativeValues(["--skip", "-1", "--file", "a"]) == ["--skip=-1", "--file", "a"])
        #expect(DeviceOptions.joiningNegativeValues(["--poll-us", "-5"]) == ["--poll-us=-5"])
        #expect(DeviceOptions.joiningNegativeValues(["--file", "-", "--key-file", "-"]) == ["--file", "-", "--key-file", "-"])
        #expect(DeviceOptions.joiningNegativeValues(["--size=-1", "-v"]) == ["--size=-1", "-v"])
        #expect(DeviceOptions.joiningNegativeValues(["--", "--x", "-1"]) == ["--", "--x", "-1"])
        let config = try ConfigFile.arguments(text: "file = a\nskip = -1", path: "s.conf")
        #expect(config == ["--file=a", "--skip=-1"])
        for arguments in [["add", "--file", "a", "--skip", "-1"], ["add", "--target", "null", "--size", "16M", "--poll-us", "-5"]] {
            do {
                _ = try Ublk.parseAsRoot(DeviceOptions.normalized(arguments))
                Issue.record("\(arguments) parsed")
            } catch {
                let line = Ublk.errorLine(for: error)
                #expect(!line.contains("Missing value"), "\(line)")
                #expect(line.contains("-1") || line.contains("-5"), "\(line)")
            }
        }
    }

    @Test func configFileMistakesNameTheLine() {
        func message(_ text: String) -> String {
            do { _ = try ConfigFile.arguments(text: text, path: "x.conf"); return "accepted" } catch { return "\(error)" }
        }
        #expect(message("file = /a\ndepth = 8\n\nfile = /b") == "x.conf:4: file is given again (first on line 1): give it once")
        #expect(message("file = /a\nqueus = 2") == "x.conf:2: unknown key `queus`: use one of allow-discards, batch-io, block-size, cipher-threads, depth, direct-io, encryption, file, force, id, key-file, key-size, offset, poll-us, queues, read-only, reconnect-timeout, recovery, sector-size, size, sizelimit, skip, swap, target, uri, zero-copy")
        #expect(message("read-only = maybe").hasPrefix("x.conf:1: read-only takes yes or no"))
        #expect(message("file /a").hasPrefix("x.conf:1: expected `key = value`"))
        #expect(message("key-file = -").hasPrefix("x.conf:1: key-file = - reads standard input"))
        #expect(message("key-file = /dev/stdin").hasPrefix("x.conf:1: key-file = /dev/stdin reads standard input"))
        // Another name of a key given before is a key given twice.
        #expect(message("size = 1G\nsizelimit = 2G") == "x.conf:2: sizelimit is given again (first as size on line 1): give it once")
        #expect(message("sector-size = 512\nblock-size = 4096").hasPrefix("x.conf:2: block-size is given again (first as sector-size"))
        // What may be a key file given by mistake is never shown: not a line, nor an odd key.
        let secret = "Sup3rS3cretPassphrase+/"
        #expect(!message(secret).contains(secret))
        #expect(!message("\(secret)=\n").contains(secret))
        #expect(message("\(secret)=x").hasPrefix("x.conf:1: unknown key: use one of"))
    }

    /// `recovery` takes the words flags take; word values are taken in any case.
    @Test func configWordsAreTheFlagsWords() throws {
        #expect(try ConfigFile.arguments(text: "recovery = on", path: "x.conf") == ["--recovery=reissue"])
        #expect(try ConfigFile.arguments(text: "recovery = False", path: "x.conf") == [])
        #expect(try ConfigFile.arguments(text: "direct-io = Auto\nzero-copy = OFF", path: "x.conf")
                == ["--direct-io=auto", "--zero-copy=off"])
    }

    /// A mistake in a config file's value names its line; one on the command line is a
    /// usage error of its own, not the file's.
    @Test func configMistakesAreSaidWhereTheyAre() throws {
        let path = "/tmp/ublk-test-config-\(getpid()).conf"
        defer { unlink(path) }
        func message(_ text: String, _ overrides: [String] = []) -> (String, isUsage: Bool) {
            try? SmallFile.writeAtomically(path, Array(text.utf8))
            do { _ = try DeviceOptions.resolve(config: path, overrides: overrides); return ("accepted", false) } catch {
                return ("\(DeviceOptions.message(for: error))", error is ValidationError)
            }
        }
        let bad = message("file = /a\nqueues = two")
        #expect(bad.0.hasPrefix("\(path):2: ") && bad.0.contains("two") && !bad.isUsage, "\(bad)")
        let depth = message("file = /a\nqueues = 2", ["--depth", "0"])
        #expect(depth.0 == "--depth 0 is out of range: give 1 to 4096" && depth.isUsage, "\(depth)")
        let file = message("file = /a\ndepth = 0", ["--queues", "2"])
        #expect(file.0 == "\(path):2: --depth 0 is out of range: give 1 to 4096" && !file.isUsage, "\(file)")
        // Named under either of its names.
        let alias = message("file = /a\nsector-size = 3000")
        #expect(alias.0.hasPrefix("\(path):2: --block-size 3000 is not a power of two"), "\(alias)")
        // A rule broken by no one value has no line.
        let none = message("depth = 8")
        #expect(none.0 == "\(path): no backing file: give --file PATH (or --target null --size N)" && !none.isUsage, "\(none)")
        #expect(message("depth = 8", ["--file", "/a"]).0 == "accepted")
    }

    @Test func anEncryptedConfigFileBecomesAddArguments() throws {
        let text = "file = /srv/secret.img\nencryption = aes-xts-plain64\nkey-file = /etc/ublk/secret.key\nkey-size = 256\nskip = 8\ncipher-threads = 3\n"
        let options = try DeviceOptions.parse(try ConfigFile.arguments(text: text, path: "secret.conf"))
        try options.check()
        guard case .loop(let configuration) = options.spec else { Issue.record("not a loop spec"); return }
        #expect(configuration.encryption?.keySize == 256 && configuration.encryption?.skip == 8)
        #expect(configuration.encryption?.cipherThreads == 3)
        #expect(options.key.keyFile == "/etc/ublk/secret.key")
    }

    /// `ublk upgrade --name NAME` of an encrypted device takes the key file its config names.
    @Test func theConfigNamesTheKeyFileForAnUpgrade() throws {
        var template = Array("/tmp/ublk-config-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        let path = String(cString: template)
        defer { unlink(path) }
        let text = "file = /srv/secret.img\nencryption = aes-xts-plain64\nkey-file = /etc/ublk/secret.key\n"
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        #expect(try DeviceOptions.resolve(config: path, overrides: []).key.keyFile == "/etc/ublk/secret.key")
        let plain = open(path, O_WRONLY | O_TRUNC)
        _ = "file = /srv/plain.img\n".withCString { write(plain, $0, strlen($0)) }
        close(plain)
        #expect(try DeviceOptions.resolve(config: path, overrides: []).key.keyFile == nil)
    }

    /// `ublk upgrade --name NAME` (systemctl reload) takes the device whose server lives, not
    /// a record left by one killed hard or of a device removed by other means.
    @Test func anUpgradeByNameSkipsStaleRecords() {
        func record(_ id: UInt32, pid: Int32, _ name: String? = "data") -> DeviceRecord {
            DeviceRecord(id: id, pid: pid, name: name, spec: .null(NullConfiguration(size: 1 << 20)), size: 1 << 20,
                         queues: 1, depth: 1, directIO: "-", recovery: true)
        }
        let records = [record(0, pid: 10), record(1, pid: 11), record(2, pid: 12), record(3, pid: 13, "other")]
        let alive: (Int32) -> Bool = { $0 == 12 || $0 == 13 }
        let upgrade = Ublk.Upgrade.self
        #expect(upgrade.record(named: "data", in: records, existing: [1, 2, 3], isAlive: alive)?.id == 2)
        #expect(upgrade.record(named: "data", in: records, existing: [1, 3], isAlive: alive)?.id == 1)
        #expect(upgrade.record(named: "data", in: records, existing: [3], isAlive: alive) == nil)
    }

    @Test func encryptionOptionsGoTogether() {
        func message(_ arguments: [String]) -> String {
            do {
                let options = try DeviceOptions.parse(["--file", "a"] + arguments)
                try options.check()
                return "accepted"
            } catch { return DeviceOptions.message(for: error) }
        }
        let encrypt = ["--encryption", "aes-xts-plain64"]
        #expect(message(encrypt + ["--key-file", "k"]) == "accepted")
        #expect(message(encrypt + ["--key-file", "-", "--block-size", "4096", "--key-size", "256"]) == "accepted")
        #expect(message(encrypt).contains("give --key-file PATH"))
        #expect(message(["--key-file", "k"]).contains("add --encryption aes-xts-plain64"))
        #expect(message(["--skip", "8"]).contains("need --encryption"))
        #expect(message(["--cipher-threads", "2"]).contains("need --encryption"))
        #expect(message(["--encryption", "aes-cbc-essiv:sha256", "--key-file", "k"]).contains("the only one is --encryption aes-xts-plain64"))
        #expect(message(encrypt + ["--key-file", "k", "--key-size", "384"]).contains("--key-size 512 (AES-256-XTS, the default) or --key-size 256"))
        #expect(message(encrypt + ["--key-file", "k", "--block-size", "1024"]).contains("512 or 4096"))
        #expect(message(encrypt + ["--key-file", "k", "--cipher-threads", "0"]) == "accepted")
        #expect(message(encrypt + ["--key-file", "k", "--cipher-threads", "65"]).contains("give 0 to 64"))
        #expect(message(encrypt + ["--key", "00112233"]).contains("Unknown option '--key'"))
        #expect(!message(encrypt + ["--key", "00112233"]).contains("00112233"))
    }

    @Test func aKeyOnStandardInputGoesToTheServerOnADescriptor() {
        #expect(KeyOptions.handingStandardInput(["add", "--key-file", "-", "--file", "a"], to: 4)
                == ["add", "--key-fd", "4", "--file", "a"])
        #expect(KeyOptions.handingStandardInput(["recover", "--id", "1", "--key-file=-"], to: 4)
                == ["recover", "--id", "1", "--key-fd", "4"])
        #expect(KeyOptions.handingStandardInput(["add", "--key-file", "/k", "--file", "-"], to: 4) == nil)
        #expect(KeyOptions.handingStandardInput(["add", "--file", "a", "--key-file"], to: 4) == nil)
    }

    @Test func badOptionsAreRefusedWithWhatToDo() {
        #expect(message(["--file", "a", "--depth", "0"]).contains("give 1 to 4096"))
        #expect(message(["--file", "a", "--depth", "4097"]).contains("give 1 to 4096"))
        #expect(message(["--file", "a", "--queues", "0"]).contains("out of range"))
        #expect(message(["--file", "a", "--block-size", "3000"]).contains("give 512, 1024, 2048 or 4096"))
        #expect(message(["--file", "a", "--direct-io", "bogus"]).contains("bogus"))
        #expect(message([]).contains("give --file PATH"))
        #expect(message(["--target", "null"]).contains("give --size"))
        #expect(message(["--target", "null", "--size", "1000"]).contains("not a positive multiple"))
        #expect(message(["--file", "a", "--queues", "2", "--depth", "64"]) == "accepted")
        #expect(message(["--file", "a", "--poll-us=-1"]).contains("give 0 (no polling) to 1000000"))
        #expect(message(["--file", "a", "--poll-us", "1000001"]).contains("give 0 (no polling) to 1000000"))
        #expect(message(["--file", "a", "--poll-us", "0"]) == "accepted")
    }

    /// Busy polling by default, except where cipher threads need the CPU a spin would take;
    /// `--poll-us` (or `poll-us` in a config file) always wins.
    @Test func busyPollingDefaultsByTarget() throws {
        func window(_ arguments: [String]) throws -> Int { try DeviceOptions.parse(arguments).serverOptions.pollMicroseconds }
        let standard = ServerOptions.defaultPollMicroseconds(targetHasWorkerThreads: false)
        #expect(standard > 0)
        #expect(try window(["--file", "a"]) == standard)
        #expect(try window(["--target", "null", "--size", "1G"]) == standard)
        // Cipher threads by default wherever there is a CPU for one (this host: 2 CPUs, 1 thread).
        let defaultThreads = EncryptionConfiguration().workerThreads
        #expect(try window(["--file", "a", "--encryption", "aes-xts-plain64", "--key-file", "k"]) == (defaultThreads > 0 ? 0 : standard))
        #expect(try window(["--file", "a", "--encryption", "aes-xts-plain64", "--key-file", "k", "--cipher-threads", "0"]) == standard)
        #expect(try window(["--file", "a", "--poll-us", "0"]) == 0)
        #expect(try window(["--file", "a", "--encryption", "aes-xts-plain64", "--key-file", "k", "--poll-us", "500"]) == 500)
        #expect(try ConfigFile.arguments(text: "poll-us = 50", path: "p.conf") == ["--poll-us=50"])
    }

    @Test func nbdOptionsMakeAnNBDSpec() throws {
        #expect(message(["--target", "nbd"]).contains("give --uri"))
        #expect(message(["--uri", "nbds://h/x"]).contains("TLS is not supported"))
        #expect(message(["--uri", "nbd://h:x/e"]).contains("bad NBD URI"))
        #expect(message(["--uri", "nbd://h/e", "--file", "a"]).contains("leave out --file"))
        #expect(message(["--uri", "nbd://h/e", "--block-size", "4096"]).contains("leave out --block-size"))
        #expect(message(["--file", "a", "--uri", "nbd://h/e", "--target", "loop"]).contains("--uri is for the nbd target"))
        #expect(message(["--uri", "nbd://h/e", "--reconnect-timeout=-1"]).contains("0 to 86400"))
        #expect(message(["--uri", "nbd://h/e", "--direct-io", "on"]) == "the nbd target has no backing file to open with O_DIRECT: leave out --direct-io")
        #expect(message(["--target", "null", "--size", "1G", "--direct-io=on"]).contains("null target has no backing file"))
        #expect(message(["--uri", "nbd://h/e", "--direct-io", "off"]) == "accepted")
        let arguments = try ConfigFile.arguments(text: "target = nbd\nuri = nbd://h/e\nreconnect-timeout = 5\nread-only = yes",
                                                 path: "n.conf")
        let options = try DeviceOptions.parse(arguments)
        try options.check()
        var expected = NBDConfiguration(uri: "nbd://h/e")
        expected.reconnectTimeout = 5
        expected.readOnly = true
        #expect(options.spec == .nbd(expected))
    }

    @Test func addArgumentsWithoutServerFlags() {
        let arguments = ["ublk", "add", "--config", "/etc/ublk/a.conf", "--foreground", "--ready-fd", "3", "--depth", "8", "-v"]
        #expect(Ublk.Add.deviceArguments(from: arguments) == ["--depth", "8"])
        #expect(Ublk.Add.deviceArguments(from: ["ublk", "add", "--config=/x", "--queues", "1"]) == ["--queues", "1"])
    }

    /// `losetup -d /dev/loop1 /dev/loop2` is `ublk del --id 1 --id 2`: both, in turn.
    @Test func delTakesSeveralIDs() throws {
        let command = try Ublk.parseAsRoot(["del", "--id", "1", "--id=2", "--id", "1"])
        let delete = try #require(command as? Ublk.Delete)
        #expect(delete.ids == [1, 2])
        func line(_ arguments: [String]) -> String {
            do { _ = try Ublk.parseAsRoot(arguments); return "accepted" } catch { return Ublk.errorLine(for: error) }
        }
        #expect(line(["del"]).hasPrefix("give --id N or /dev/ublkbN (more than one if you like), or --all"))
        #expect(line(["del", "--all", "--id", "1"]).hasPrefix("--all removes every device: leave out --id"))
        #expect(line(["del", "--all", "/dev/ublkb1"]).hasPrefix("--all removes every device"))
        #expect(line(["del", "--all"]) == "accepted")
        // Paths, as losetup -d takes them.
        let paths = try #require(try Ublk.parseAsRoot(["del", "/dev/ublkb3", "--id", "1", "/dev/ublkb1"]) as? Ublk.Delete)
        #expect(paths.ids == [1, 3])
        #expect(line(["del", "/dev/ublkb1p2"]).hasPrefix("/dev/ublkb1p2 is a partition of /dev/ublkb1: give /dev/ublkb1 (or --id 1)"))
        #expect(line(["del", "/dev/ublkb1p"]).hasPrefix("/dev/ublkb1p is not a ublk device: give /dev/ublkbN (or --id N)"))
        #expect(line(["del", "/dev/loop0"]).hasPrefix("/dev/loop0 is not a ublk device"))
        #expect(line(["del", "/dev/ublkc1"]).hasPrefix("/dev/ublkc1 is not a ublk device"))
        #expect(line(["del", "/dev/ublkb+1"]).hasPrefix("/dev/ublkb+1 is not a ublk device"))
        // list takes the same choice, and none means every device.
        let list = try #require(try Ublk.parseAsRoot(["list", "/dev/ublkb3", "--id", "1", "--json"]) as? Ublk.List)
        #expect(list.chosen.ids == [1, 3] && list.json)
        #expect(try #require(try Ublk.parseAsRoot(["list"]) as? Ublk.List).chosen.isEmpty)
        #expect(line(["list", "/dev/sda"]).hasPrefix("/dev/sda is not a ublk device"))
    }

    /// recover, resize and upgrade take one device, by --id or by path (as losetup -c does).
    @Test func oneDeviceByIDOrPath() throws {
        func line(_ arguments: [String]) -> String {
            do { _ = try Ublk.parseAsRoot(arguments); return "accepted" } catch { return Ublk.errorLine(for: error) }
        }
        #expect(try #require(try Ublk.parseAsRoot(["recover", "/dev/ublkb4"]) as? Ublk.Recover).device.id == 4)
        #expect(try #require(try Ublk.parseAsRoot(["resize", "--id", "2", "--size", "1G"]) as? Ublk.Resize).device.id == 2)
        #expect(try #require(try Ublk.parseAsRoot(["upgrade", "/dev/ublkb7"]) as? Ublk.Upgrade).device.id == 7)
        #expect(line(["recover"]).hasPrefix("which device? give /dev/ublkbN or --id N"))
        #expect(line(["resize", "/dev/ublkb12p1"]).hasPrefix("/dev/ublkb12p1 is a partition of /dev/ublkb12"))
        #expect(line(["recover", "--id", "1", "/dev/ublkb1"]).hasPrefix("give the device once"))
        #expect(line(["upgrade", "/dev/ublkb1", "--name", "data"]).hasPrefix("give /dev/ublkbN, --id N or --name NAME"))
        #expect(line(["upgrade", "--name", "data"]) == "accepted")
    }

    /// /proc/swaps and mountinfo write a space, tab, newline or backslash in a path as
    /// `\ooo`; a swap area is found by the device (or file) its path names.
    @Test func swapAreasAreReadFromTheirTable() throws {
        #expect("/srv/a\\040b\\011c\\134d\\012".unescapingOctal == "/srv/a b\tc\\d\n")
        #expect("/srv/\\04x\\".unescapingOctal == "/srv/\\04x\\")
        let spaced = "/tmp/ublk swap \(getpid())"
        let fd = open(spaced, O_CREAT | O_WRONLY, 0o600)
        #expect(fd >= 0)
        close(fd)
        defer { unlink(spaced) }
        let table = """
        Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
        /dev/null                               partition\t65532\t\t0\t\t-2
        \(spaced.split(separator: " ").joined(separator: "\\040"))\tfile\t\t1024\t\t0\t\t-3
        """
        #expect(DeviceSafety.swapAreas(on: ["/dev/null"], table: table) == ["/dev/null"])
        #expect(DeviceSafety.swapAreas(on: [spaced], table: table) == [spaced])
        #expect(DeviceSafety.swapAreas(on: ["/dev/zero"], table: table).isEmpty)
        #expect(DeviceSafety.swapAreas(on: ["/dev/null"], table: nil).isEmpty)
    }

    /// A table row stays one line whatever the backing's name holds.
    @Test func controlCharactersInATableAreEscaped() {
        #expect("/srv/a b.img".escapingControlCharacters == "/srv/a b.img")
        #expect("/srv/a\nb\tc\u{1}d\u{7f}.img".escapingControlCharacters == "/srv/a\\nb\\tc\\x01d\\x7f.img")
        #expect("/srv/é☃.img".escapingControlCharacters == "/srv/é☃.img")
    }

    /// `list --json`: `[]` for no devices; paths as written, with their slashes unescaped.
    @Test func theJSONListReadsAsWritten() throws {
        #expect(DeviceListing.json([]) == "[]")
        let row = DeviceRow(id: 3, state: "live", target: "loop", backing: "/srv/a \"b\".img", size: 4096, queues: 1, depth: 8,
                            directIO: "on", dataPath: "copy", commands: "per-request", pid: 9, serverAlive: true,
                            readOnly: false, blockSize: 512, offset: 0)
        let json = DeviceListing.json([row])
        #expect(json.contains(#""backing" : "/srv/a \"b\".img""#), "\(json)")
        let decoded = try JSONDecoder().decode([DeviceRow].self, from: Data(json.utf8))
        #expect(decoded.first?.backing == row.backing)
    }

    /// `ublk list --file PATH` finds a device by its backing's inode, as losetup -j does:
    /// through another name of the file, and after the file was renamed.
    @Test func listFindsADeviceByItsBacking() throws {
        var template = Array("/tmp/ublk-list-test.XXXXXX".utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        defer { for name in ["moved", "hard-link", "other"] { unlink("\(directory)/\(name).img") }; rmdir(directory) }
        let (path, other) = ("\(directory)/disk.img", "\(directory)/other.img")
        for file in [path, other] {
            let fd = open(file, O_CREAT | O_WRONLY, 0o600)
            #expect(fd >= 0)
            close(fd)
        }
        #expect(link(path, "\(directory)/hard-link.img") == 0)
        let identity = try FileIdentity.of(path: path).get()
        let record = DeviceRecord(id: 1, pid: 1, name: nil, spec: .loop(LoopConfiguration(path: path)), size: 1 << 20,
                                  queues: 1, depth: 1, directIO: "off", recovery: false, backingIdentity: identity)
        #expect(try BackingMatch(path).matches(record))
        #expect(try BackingMatch("\(directory)/hard-link.img").matches(record))
        #expect(try !BackingMatch(other).matches(record))
        // Renamed: the record's path names nothing now, its inode is still the file's.
        #expect(rename(path, "\(directory)/moved.img") == 0)
        #expect(try BackingMatch("\(directory)/moved.img").matches(record))
        // A new file in the backing's place is not the file the device serves, as for losetup -j.
        let fd = open(path, O_CREAT | O_WRONLY, 0o600)
        close(fd)
        defer { unlink(path) }
        #expect(try !BackingMatch(path).matches(record))
        // A null or nbd device has no backing file, and a device without a record is unknown.
        let nbd = DeviceRecord(id: 2, pid: 1, name: nil, spec: .nbd(NBDConfiguration(uri: other)), size: 1 << 20,
                               queues: 1, depth: 1, directIO: "-", recovery: false)
        #expect(try !BackingMatch(other).matches(nbd))
        #expect(try !BackingMatch(other).matches(nil))
        #expect(throws: CLIError.self) { try BackingMatch("\(directory)/missing.img") }
    }

    /// Elsewhere a second --id is refused, not silently taken instead of the first.
    @Test func aRepeatedIDIsRefusedWhereOneDeviceIsMeant() throws {
        for arguments in [["recover", "--id", "1", "--id", "2"], ["resize", "--id=1", "--id=2"],
                          ["upgrade", "--id", "1", "--id", "2"], ["add", "--file", "a", "--id", "1", "--id", "2"]] {
            #expect(throws: ValidationError.self, "\(arguments)") { try Ublk.refuseRepeatedID(arguments) }
        }
        do { try Ublk.refuseRepeatedID(["recover", "--id", "1", "--id", "2"]) } catch {
            #expect(Ublk.errorLine(for: error) == "--id is given 2 times: give one, `ublk recover` acts on one device (only `ublk del` and `ublk list` take several): see `ublk recover --help`")
        }
        try Ublk.refuseRepeatedID(["del", "--id", "1", "--id", "2"])
        try Ublk.refuseRepeatedID(["list", "--id", "1", "--id", "2"])
        #expect(throws: ValidationError.self) { try Ublk.refuseRepeatedID(["list", "--file", "a", "--file", "b"]) }
        // What names the data or its key: once.
        do { try Ublk.refuseRepeatedID(["add", "--file", "a", "--key-file", "-", "--key-file=k"]) } catch {
            #expect(Ublk.errorLine(for: error) == "--key-file is given 2 times: give it once: see `ublk add --help`")
        }
        #expect(throws: ValidationError.self) { try Ublk.refuseRepeatedID(["add", "--file", "a", "--file", "b"]) }
        #expect(throws: ValidationError.self) {
            try Ublk.refuseRepeatedID(["add", "--file", "a", "--encryption", "aes-xts-plain64", "--encryption=aes-xts-plain64"])
        }
        try Ublk.refuseRepeatedID(["recover", "--id", "1"])
        try Ublk.refuseRepeatedID(["add", "--file", "a", "--id", "1", "--", "--id"])
    }

    /// A path in another encoding than UTF-8 would be read with U+FFFD in place of its bad
    /// bytes, and name another file: refused, on the command line and in a config file.
    @Test func anArgumentOrConfigLineNotUTF8IsRefused() throws {
        let arguments: [[UInt8]] = [Array("ublk".utf8), Array("add".utf8), Array("--file".utf8),
                                    Array("/srv/caf".utf8) + [0xE9] + Array(".img".utf8)]
        var pointers: [UnsafeMutablePointer<CChar>?] = arguments.map { bytes in
            let pointer = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count + 1)
            for (index, byte) in bytes.enumerated() { pointer[index] = CChar(bitPattern: byte) }
            pointer[bytes.count] = 0
            return pointer
        } + [nil]
        defer { for pointer in pointers { pointer?.deallocate() } }
        do {
            try Ublk.refuseArgumentsNotUTF8(&pointers, count: 4)
            Issue.record("a path that is not UTF-8 was taken")
        } catch {
            #expect(Ublk.errorLine(for: error).hasPrefix("argument 3 (`/srv/caf\\xe9.img`) is not UTF-8 text"))
        }
        try Ublk.refuseArgumentsNotUTF8(&pointers, count: 3)  // The first three are UTF-8.
        #expect(try ConfigFile.utf8Text(ArraySlice(Array("file = /srv/caf\u{e9}.img\n".utf8)), path: "a.conf")
                == "file = /srv/caf\u{e9}.img\n")
        #expect(throws: CLIError.self) {
            try ConfigFile.utf8Text(ArraySlice(Array("queues = 2\n".utf8) + Array("file = /srv/caf".utf8) + [0xE9]), path: "a.conf")
        }
        do { _ = try ConfigFile.utf8Text(ArraySlice(Array("queues = 2\nfile = /a".utf8) + [0xFF]), path: "a.conf") } catch {
            #expect("\(error)".hasPrefix("a.conf:2: not UTF-8 text"))
        }
        // A comment in another encoding goes, as comments do; a key file is said to be one.
        #expect(try ConfigFile.utf8Text(ArraySlice(Array("queues = 2 # caf".utf8) + [0xE9] + Array("\nfile = /a".utf8)), path: "a.conf")
                == "queues = 2 \nfile = /a")
        // Where the comment starts is decided as for UTF-8 lines: not inside a quoted value,
        // not at a `#` within a word.
        for line in ["file = \"/srv/my #1 caf", "file = /srv/disk#caf"] {
            #expect(throws: CLIError.self) { try ConfigFile.utf8Text(ArraySlice(Array(line.utf8) + [0xE9]), path: "a.conf") }
        }
        #expect(try ConfigFile.utf8Text(ArraySlice(Array("file = \"/srv/my #1.img\" # caf".utf8) + [0xE9]), path: "a.conf")
                == "file = \"/srv/my #1.img\" ")
        do { _ = try ConfigFile.utf8Text([0x9C, 0x41, 0xFF, 0x0A, 0x10], path: "k.key") } catch {
            #expect("\(error)" == "k.key:1: expected `key = value`: is k.key a config file? (a key is given with --key-file)")
        }
    }

    /// `ublk help NAME` of a command that does not exist is a mistake (64), not the main help.
    @Test func helpOfNoCommandIsRefused() throws {
        do {
            try Ublk.refuseHelpOfNoCommand(["help", "dell"])
            Issue.record("help dell was taken")
        } catch {
            #expect(Ublk.errorLine(for: error) == "there is no command dell: give one of add, start, del, list, recover, resize, upgrade, features: see `ublk --help`")
            #expect(Ublk.exitCode(for: error) == .validationFailure)
        }
        for arguments in [["help"], ["help", "del"], ["help", "help"], ["help", "-h"], ["add", "dell"], []] {
            try Ublk.refuseHelpOfNoCommand(arguments)
        }
    }

    /// A config file may be a pipe (`--config <(...)`, /dev/stdin); what cannot be read is
    /// said in one line, with "create it" only for a file that is missing.
    @Test func configFilesAreReadFromPipesAndRefusedInOneLine() throws {
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        _ = "file = /srv/piped.img\n".withCString { write(ends[1], $0, strlen($0)) }
        close(ends[1])
        defer { close(ends[0]) }
        #expect(try DeviceOptions.resolve(config: "/dev/fd/\(ends[0])", overrides: []).file == "/srv/piped.img")
        func message(_ path: String) -> String {
            do { _ = try ConfigFile.arguments(path: path); return "read" } catch { return "\(error)" }
        }
        // In the background the CLI reads the file: the server's standard input is /dev/null.
        var more: [Int32] = [0, 0]
        #expect(pipe(&more) == 0)
        _ = "target = null\nsize = 1G\nid = 3\n".withCString { write(more[1], $0, strlen($0)) }
        close(more[1])
        defer { close(more[0]) }
        let commandLine = ["ublk", "add", "--config", "/dev/fd/\(more[0])", "--size", "2G", "--id=5", "-v"]
        let add = try #require(try Ublk.parseAsRoot(Array(commandLine.dropFirst())) as? Ublk.Add)
        let arguments = try add.backgroundArguments(commandLine: commandLine)
        #expect(arguments == ["add", "--target=null", "--size", "2G", "--id=5", "--verbose"])
        try Ublk.refuseRepeatedID(arguments)
        // The server's standard input is /dev/null: the backing is named here, by its own name.
        let directory = try #require(DeviceOptions.workingDirectory)
        #expect(try Ublk.Add.parse(["--file", "a"]).backgroundArguments(commandLine: ["ublk", "add", "--file", "a", "--depth", "8"])
            == ["add", "--file=\(directory == "/" ? "" : directory)/a", "--depth", "8"])
        let image = "/tmp/ublk-redirected-\(getpid()).img"
        let opened = open(image, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        #expect(opened >= 0)
        defer { close(opened); unlink(image) }
        let redirected = ["ublk", "add", "--file=/dev/fd/\(opened)"]
        #expect(try Ublk.Add.parse(Array(redirected.dropFirst(2))).backgroundArguments(commandLine: redirected)
            == ["add", "--file=\(DeviceOptions.absolute(image))"])
        #expect(Ublk.Add.resolvingFile(["--size", "1G", "--", "--file", "x"]) == ["--size", "1G", "--", "--file", "x"])
        // Standard input has one reader: a backing redirected there cannot also give the key.
        do {
            _ = try Ublk.parseAsRoot(["add", "--file", "/dev/stdin", "--encryption", "aes-xts-plain64", "--key-file", "-"])
            Issue.record("--file /dev/stdin with --key-file - was taken")
        } catch {
            #expect(Ublk.errorLine(for: error).hasPrefix("--key-file - and --file /dev/stdin both read standard input: give one of them a file"))
        }
        // A bad value in the file is said here, in the line --foreground says, not left to the
        // server, which could only say that it exited.
        var bad: [Int32] = [0, 0]
        #expect(pipe(&bad) == 0)
        _ = "file = disk.img\ndepth = 0\n".withCString { write(bad[1], $0, strlen($0)) }
        close(bad[1])
        defer { close(bad[0]) }
        let badLine = ["ublk", "add", "--config", "/dev/fd/\(bad[0])"]
        let badAdd = try #require(try Ublk.parseAsRoot(Array(badLine.dropFirst())) as? Ublk.Add)
        #expect(throws: CLIError.self) { try badAdd.backgroundArguments(commandLine: badLine) }
        #expect(message("/nonexistent/a.conf") == "config file /nonexistent/a.conf does not exist: create it (see README.md, Running as a service)")
        #expect(message("/tmp") == "config file /tmp is a directory: give a file of `key = value` lines")
        #expect(message("/dev/zero") == "config file /dev/zero holds more than 1 MiB: give a file of `key = value` lines")
    }

    /// `file = disk.img` in /etc/ublk/a.conf is /etc/ublk/disk.img, wherever ublk runs.
    @Test func relativePathsInAConfigFileAreItsNeighbours() throws {
        let text = "file = images/disk.img\nkey-file = a.key\n"
        #expect(try ConfigFile.arguments(text: text, path: "/etc/ublk/a.conf") == ["--file=/etc/ublk/images/disk.img", "--key-file=/etc/ublk/a.key"])
        #expect(try ConfigFile.arguments(text: "file = /srv/a.img", path: "/etc/ublk/a.conf") == ["--file=/srv/a.img"])
        #expect(try ConfigFile.arguments(text: "file = a.img", path: "/a.conf") == ["--file=/a.img"])
        #expect(try ConfigFile.arguments(text: "file = a.img", path: "conf/a.conf") == ["--file=conf/a.img"])
        #expect(try ConfigFile.arguments(text: "file = a.img", path: "a.conf") == ["--file=a.img"])
        #expect(try ConfigFile.entries(text: "file = a.img", path: "/dev/fd/63", base: nil).map(\.text) == ["--file=a.img"])
        // Read from a real file: its directory; from a pipe: the working directory.
        var template = Array("/tmp/ublk-config-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        let path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        _ = "file = disk.img\n".withCString { write(fd, $0, strlen($0)) }
        close(fd)
        #expect(try ConfigFile.arguments(path: path).map(\.text) == ["--file=/tmp/disk.img"])
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        _ = "file = disk.img\n".withCString { write(ends[1], $0, strlen($0)) }
        close(ends[1])
        defer { close(ends[0]) }
        #expect(try ConfigFile.arguments(path: "/dev/fd/\(ends[0])").map(\.text) == ["--file=disk.img"])
        // Standard input by name, whether /dev/stdin exists or not.
        var input: [Int32] = [0, 0]
        #expect(pipe(&input) == 0)
        _ = "file = stdin.img\n".withCString { write(input[1], $0, strlen($0)) }
        close(input[1])
        let saved = dup(STDIN_FILENO)
        dup2(input[0], STDIN_FILENO)
        close(input[0])
        #expect(try ConfigFile.arguments(path: "-").map(\.text) == ["--file=stdin.img"])
        dup2(saved, STDIN_FILENO)
        close(saved)
        let again = open(path, O_RDONLY)
        defer { close(again) }
        #expect(try ConfigFile.arguments(path: "/dev/fd/\(again)").map(\.text) == ["--file=disk.img"])
    }

    /// losetup's `--direct-io[=on|off]`: bare, it means on.
    @Test func aBareDirectIOMeansOn() throws {
        #expect(DeviceOptions.normalizingDirectIO(["--file", "a", "--direct-io"]) == ["--file", "a", "--direct-io=on"])
        #expect(DeviceOptions.normalizingDirectIO(["--direct-io", "--file", "a"]) == ["--direct-io=on", "--file", "a"])
        #expect(DeviceOptions.normalizingDirectIO(["--direct-io", "off", "--file", "a"]) == ["--direct-io", "off", "--file", "a"])
        #expect(DeviceOptions.normalizingDirectIO(["--direct-io", "-1"]) == ["--direct-io", "-1"])
        #expect(DeviceOptions.normalizingDirectIO(["--", "--direct-io"]) == ["--", "--direct-io"])
        for (arguments, expected) in [(["add", "--file", "a", "--direct-io"], DirectIOMode.on),
                                      (["add", "--direct-io", "-v", "--file", "a"], .on),
                                      (["add", "--file", "a", "--direct-io=off"], .off),
                                      (["add", "--file", "a", "--direct-io", "auto"], .auto)] {
            let add = try #require(try Ublk.parseAsRoot(DeviceOptions.normalized(arguments)) as? Ublk.Add)
            #expect(add.device.directIO == expected, "\(arguments)")
        }
        do {
            _ = try Ublk.parseAsRoot(DeviceOptions.normalized(["add", "--file", "a", "--direct-io", "bogus"]))
            Issue.record("--direct-io bogus parsed")
        } catch { #expect(Ublk.errorLine(for: error).contains("'bogus' is invalid for '--direct-io")) }
    }

    /// The server learns that its report did not get through (the CLI is gone), and is
    /// not killed by SIGPIPE for it.
    @Test func aReportToAGoneCLIFailsWithoutKillingTheServer() {
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        #expect(Background.note("one", to: ends[1]))
        #expect(Background.report("ready /dev/ublkb0", to: ends[1]))
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = read(ends[0], &buffer, buffer.count)
        #expect(String(decoding: buffer[0..<max(count, 0)], as: UTF8.self) == "note one\nready /dev/ublkb0\n")
        close(ends[0])
        #expect(pipe(&ends) == 0)
        close(ends[0])
        #expect(!Background.report("ready /dev/ublkb0", to: ends[1]))
    }
}

/// `ublk upgrade --binary`: a program that is no ublk is found out before the old server
/// leaves the device.
@Suite struct UpgradeBinaryTests {
    /// Two upgrades of one device at once: the second is refused before anything changes.
    @Test func oneUpgradeOfADeviceAtATime() throws {
        var template = Array("/tmp/ublk-upgrade-lock.XXXXXX".utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        defer { unlink("\(directory)/upgrade-ublkb7"); unlink("\(directory)/upgrade-ublkb8"); rmdir(directory) }
        let first = try Ublk.Upgrade.holdUpgradeLock(7, directory: directory)
        #expect(first >= 0)
        do {
            _ = try Ublk.Upgrade.holdUpgradeLock(7, directory: directory)
            Issue.record("a second upgrade of device 7 was let in")
        } catch {
            #expect("\(error)" == "another ublk upgrade of device 7 is under way: wait for it to end (ublk list shows the new server); nothing changed")
        }
        close(try Ublk.Upgrade.holdUpgradeLock(8, directory: directory))  // another device: its own lock
        close(first)
        close(try Ublk.Upgrade.holdUpgradeLock(7, directory: directory))  // the first ended
    }

    @Test func onlyAUblkTakesADeviceOver() throws {
        #expect(Background.ublkProblem("/bin/true")?.hasSuffix("is no ublk binary (its `recover --help` does not say `ublk recover`)") == true)
        #expect(Background.ublkProblem("/usr/bin") == "/usr/bin is not an executable file")
        #expect(Background.ublkProblem("/bin/echo") != nil)  // It says `recover --help`, not `ublk recover`.
        #expect(Background.ublkProblem("/nonexistent/ublk") == "/nonexistent/ublk cannot be run (No such file or directory)")
        let script = "/tmp/ublk-fake-\(getpid())"
        defer { unlink(script) }
        let text = "#!/bin/sh\necho 'USAGE: ublk recover --id <id>'\n"
        // CLOEXEC: a child another test spawns meanwhile would keep the script open for
        // writing, and running it would fail with ETXTBSY.
        let fd = open(script, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o755)
        #expect(fd >= 0 && write(fd, text, text.utf8.count) == text.utf8.count)
        close(fd)
        #expect(Background.ublkProblem(script) == nil)
        let slow = "#!/bin/sh\nsleep 3\necho 'USAGE: ublk recover --id <id>'\n"
        let slowFD = open(script, O_WRONLY | O_TRUNC | O_CLOEXEC)
        #expect(slowFD >= 0 && write(slowFD, slow, slow.utf8.count) == slow.utf8.count)
        close(slowFD)
        #expect(Background.ublkProblem(script, seconds: 1) == "\(script) did not answer `recover --help` within 1 s (on a loaded machine, try again)")
        #expect(Background.ublkProblem(script, seconds: 10) == nil)
        // Not startable, or endless output: said at once, as such.
        func rewrite(_ text: String) {
            let fd = open(script, O_WRONLY | O_TRUNC | O_CLOEXEC)
            #expect(fd >= 0 && Glibc.write(fd, text, text.utf8.count) == text.utf8.count)
            close(fd)
        }
        rewrite("\u{7f}ELF not really\n")
        #expect(Background.ublkProblem(script, seconds: 10) == "\(script) cannot be run (Exec format error)")
        rewrite("#!/bin/sh\nyes 'ublk recover'\n")
        #expect(Background.ublkProblem(script, seconds: 10)?.hasSuffix("is no ublk binary (its `recover --help` does not say `ublk recover`)") == true)
    }
}

/// A background server killed before its device was live (a signal, a crash) could not
/// remove the device it had added: the launching CLI says so, naming the device.
@Suite struct KilledServerTests {
    @Test func aKilledServerIsSaidToBe() throws {
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, ends[1], 3)
        let argv: [String] = ["sh", "-c", "echo 'added 7' >&3; kill -9 $$"]
        var cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for argument in cArguments { free(argument) } }
        var pid: pid_t = 0
        #expect(posix_spawn(&pid, "/bin/sh", &actions, nil, &cArguments, environ) == 0)
        close(ends[1])
        defer { close(ends[0]) }
        do {
            _ = try Background.awaitReport(from: ends[0], server: pid)
            Issue.record("a killed server was taken for a live device")
        } catch {
            // No ublk driver on a test host: the device cannot be looked up, so it is named.
            #expect("\(error)".hasPrefix("the server was killed (signal 9) before the device was live; "))
            #expect("\(error)".contains("ublk del --id 7"))
        }
    }
}

/// The lock that keeps two adds of one backing apart goes with its release: /run/ublk/locks
/// keeps no file per backing ever added, and the next add of that backing takes a new one.
@Suite struct SetupLockTests {
    @Test func aReleasedLockLeavesNoFile() throws {
        var template = Array("/tmp/ublk-lock-test.XXXXXX".utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        let (backing, locks) = ("\(directory)/disk.img", "\(directory)/locks")
        defer { unlink(backing); rmdir(locks); rmdir(directory) }
        let fd = open(backing, O_CREAT | O_WRONLY, 0o600)
        #expect(fd >= 0 && ftruncate(fd, 1 << 20) == 0)
        close(fd)
        let target = try LoopTarget(LoopConfiguration(path: backing))
        for _ in 0..<2 {
            let lock = try DeviceSafety.SetupLock(for: target, directory: locks)
            #expect(SmallFile.entries(of: locks).count == 1)
            lock.release()
            #expect(SmallFile.entries(of: locks).isEmpty)
        }
        // A locks directory whose parents are missing is made, parents too.
        let deeper = "\(directory)/run/ublk/locks"
        defer { rmdir(deeper); rmdir("\(directory)/run/ublk"); rmdir("\(directory)/run") }
        try DeviceSafety.SetupLock(for: target, directory: deeper).release()
        #expect(SmallFile.entries(of: "\(directory)/run/ublk") == ["locks"])
        // A read-only device takes no lock: it cannot be a second writer.
        var readOnly = LoopConfiguration(path: backing)
        readOnly.readOnly = true
        let none = try DeviceSafety.SetupLock(for: try LoopTarget(readOnly), directory: locks)
        #expect(SmallFile.entries(of: locks).isEmpty)
        withExtendedLifetime(none) {}
    }

    /// Two `ublk start NAME` at once: the second waits for the first's lock (held until its
    /// device is live and recorded), then finds the device (`Start.refuseRunning`).
    @Test func aConfigNameIsStartedOnceAtATime() throws {
        var template = Array("/tmp/ublk-lock-test.XXXXXX".utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        defer { rmdir(directory) }
        final class First: @unchecked Sendable {
            let lock: DeviceSafety.SetupLock
            let released = Atomic<Bool>(false)
            init(_ lock: DeviceSafety.SetupLock) { self.lock = lock }
        }
        let first = First(try DeviceSafety.SetupLock(config: "data", directory: directory))
        #expect(SmallFile.entries(of: directory) == ["config-data"])
        let releaser = try OSThread {
            usleep(300_000)
            first.released.store(true, ordering: .sequentiallyConsistent)
            first.lock.release()
        }
        let second = try DeviceSafety.SetupLock(config: "data", directory: directory)
        let waited = first.released.load(ordering: .sequentiallyConsistent)
        #expect(waited, "the second start did not wait for the first")
        releaser.join()
        // Another name is not held back.
        try DeviceSafety.SetupLock(config: "other", directory: directory).release()
        second.release()
        #expect(SmallFile.entries(of: directory).isEmpty)
    }
}

