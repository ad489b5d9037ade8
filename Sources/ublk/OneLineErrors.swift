import ArgumentParser
import Glibc
import UblkServer

extension Ublk {
    /// ArgumentParser's `main`, except that a mistake is reported in ONE line on stderr
    /// (`Error: what went wrong: what to do`), without the usage text it appends to
    /// option errors: scripts and logs get one line per failure. `--help` (an exit with
    /// status 0) still prints the help.
    static func main() {
        do {
            try refuseArgumentsNotUTF8()
            let arguments = Array(CommandLine.arguments.dropFirst())
            try refuseRepeatedID(arguments)
            try refuseHelpOfNoCommand(arguments)
            var command = try parseReportingOptionsFirst(DeviceOptions.normalized(arguments))
            try command.run()
        } catch {
            let code = Self.exitStatus(for: error)
            if code == .success { exit(withError: error) }
            // A bare exit status (`del`, whose failures are each said in a line of their own).
            // (A control character from a path or a file, as `\x1b`: it must not drive the terminal.)
            if !(error is ExitCode) { FileHandleStderr.print("Error: \(errorLine(for: error).escapingControlCharacters)") }
            // Without atexit handlers (OpenSSL's cleanup): a failed recovery leaves its queue
            // (and cipher) threads running until the process ends, which returns the device
            // to the kernel to wait for the next server (`DeviceServer.run`).
            fflush(nil)
            Glibc._exit(code.rawValue)
        }
    }

    /// A server whose device's writes may not be durable at its stop ends with status 3, one
    /// of its own: the service unit does not restart on it (`RestartPreventExitStatus=3`), so
    /// a device `ublk del` removed stays removed.
    static let notDurableStatus = ExitCode(3)

    static func exitStatus(for error: Error) -> ExitCode {
        if case .notDurable? = error as? ServerError { return notDurableStatus }
        return exitCode(for: error)
    }

    /// False while `parseReportingOptionsFirst` parses again without the commands' checks
    /// (task-local: another thread's parse keeps its checks).
    @TaskLocal static var validating = true

    /// ArgumentParser runs the commands' `validate()` before it looks for options it does
    /// not know: `ublk add --target null --szie 1G` would be told that the null target
    /// needs a size, and `ublk del --ids 3` that 3 is no device, not of the typo. So when a
    /// check fails, the arguments are parsed again without the checks, and a mistake in
    /// the options themselves (unknown, missing a value, a bad number) is reported first.
    static func parseReportingOptionsFirst(_ arguments: [String]) throws -> ParsableCommand {
        let checkFailed: any Error
        do { return try parseAsRoot(arguments) } catch { checkFailed = error }
        guard exitCode(for: checkFailed) == .validationFailure else { throw checkFailed }
        _ = try $validating.withValue(false) { try parseAsRoot(arguments) }
        throw checkFailed
    }

    /// ArgumentParser gives an option given twice its last value, silently: `ublk recover
    /// --id 1 --id 2`, written after a command that takes several devices, would act on
    /// device 2 alone. `--id` may be repeated only for `del`, which removes each, and
    /// `list`, which shows each.
    /// Nor may what names the data, its key or the device: of `--file a --file b`, of two key files,
    /// or of `upgrade --name a --name b`,
    /// one would be taken silently (and a `--key-file -` among them read in the background
    /// while the foreground took the last).
    static func refuseRepeatedID(_ arguments: [String]) throws {
        guard let command = arguments.first else { return }
        let options = arguments.prefix { $0 != "--" }
        func given(_ option: String) -> Int { options.filter { $0 == option || $0.hasPrefix(option + "=") }.count }
        if command != "del" && command != "list", case let count = given("--id"), count > 1 {
            throw ValidationError("--id is given \(count) times: give one, `ublk \(command)` acts on one device (only `ublk del` and `ublk list` take several): see `ublk \(command) --help`")
        }
        // No such option, and ArgumentParser would suggest `--uri`: say where a key goes.
        for option in ["--key", "--passphrase", "--password"] where given(option) > 0 {
            throw ValidationError("\(option): a key never goes on the command line (other users see it in ps): put it in a file and give --key-file PATH, or --key-file - to read it from standard input: see `ublk \(command) --help`")
        }
        for option in ["--file", "--uri", "--key-file", "--config", "--name", "--encryption"] where given(option) > 1 {
            throw ValidationError("\(option) is given \(given(option)) times: give it once: see `ublk \(command) --help`")
        }
    }

    /// Swift reads each argument as UTF-8 text, and puts U+FFFD in place of bytes that are
    /// not: a backing named in another encoding (`caf\xe9.img`) would be looked for under
    /// another name, and a file of that name served instead. Paths stay text here (records,
    /// `--json`), so such an argument is refused, naming what to do.
    static func refuseArgumentsNotUTF8(_ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> = CommandLine.unsafeArgv,
                                       count: Int = Int(CommandLine.argc)) throws {
        for index in 1..<max(count, 1) {
            guard let argument = argv[index], String(validatingCString: argument) == nil else { continue }
            let shown = UnsafeRawBufferPointer(start: argument, count: strlen(argument))
                .map { $0 < 0x80 ? String(UnicodeScalar($0)) : "\\x" + String($0, radix: 16) }.joined()
            throw ValidationError("argument \(index) (`\(shown)`) is not UTF-8 text (a name in another encoding?): ublk keeps paths as text: give the file a UTF-8 name, or a symbolic link with one")
        }
    }

    /// ArgumentParser's `help` prints the main help, with status 0, for a command that does
    /// not exist (`ublk help dell`): a script would take that for an answer.
    static func refuseHelpOfNoCommand(_ arguments: [String]) throws {
        guard arguments.first == "help", let name = arguments.dropFirst().first, !name.hasPrefix("-") else { return }
        let names = configuration.subcommands.map { $0._commandName }
        guard !names.contains(name) && name != "help" else { return }
        throw ValidationError("there is no command \(name): give one of \(names.joined(separator: ", ")): see `ublk --help`")
    }

    /// The one line printed (after "Error: ") for `error`.
    static func errorLine(for error: Error) -> String {
        var line = oneLine(message(for: error))
        // A command-line mistake (unknown option, bad value): point at the help, as the usage text did.
        if exitCode(for: error) == .validationFailure, !line.hasSuffix("--help`"),
           let help = helpCommand(fullMessage(for: error, columns: 1000)) {
            if line.hasSuffix(".") { line.removeLast() }
            line += line.hasSuffix("?") ? " See `\(help)`" : ": see `\(help)`"
        }
        return line
    }

    /// `ublk add --help` from the usage text's "See 'ublk add --help' for more information."
    static func helpCommand(_ usage: String) -> Substring? {
        guard let line = usage.split(whereSeparator: \.isNewline).first(where: { $0.contains("--help'") }),
              let start = line.firstIndex(of: "'"), let end = line.lastIndex(of: "'"), start < end else { return nil }
        return line[line.index(after: start)..<end]
    }

    /// The message's lines, joined with single spaces.
    static func oneLine(_ message: String) -> String {
        message.split(whereSeparator: \.isNewline)
            .map { $0.drop { $0 == " " || $0 == "\t" } }
            .filter { !$0.isEmpty }
            .joined(separator: " ")
    }
}
