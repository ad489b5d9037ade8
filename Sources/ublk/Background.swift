import CUblk
import Glibc
import UblkControl
import UblkSystem

/// Starting a server in the background, as `ublk add` does without `--foreground`.
///
/// The CLI re-executes itself (`/proc/self/exe`) with `--foreground --ready-fd 3`
/// in a new session; the server reports on that pipe once /dev/ublkbN is live
/// (`ready /dev/ublkbN`) or why it failed (`error ...`). Forking a process that
/// might already run threads is unsafe, so posix_spawn it is.
///
/// `--key-file -` (the key on standard input) becomes `--key-fd 4`: the server inherits
/// our standard input as descriptor 4 and reads the key from it straight into its locked
/// memory, so the key passes through neither argv nor the environment, nor (for `ublk
/// add`) this process. `ublk upgrade` reads and checks the key first (from a file or standard
/// input), into its own locked memory, and hands the server a pipe holding it as
/// descriptor 4 instead.
enum Background {
    /// The descriptor a background server reads a `--key-file -` key from.
    static let keyDescriptor: Int32 = 4

    /// Where background servers' stderr goes.
    static var logPath: String {
        (getenv("UBLK_RUN_DIR").map { String(cString: $0) } ?? "/run/ublk") + "/server.log"
    }

    /// Spawns `program` (this binary by default) with `arguments` (after the program name)
    /// and waits for the server's report. A `--key-file -` among the arguments reads the key
    /// from `keyInput`: our standard input, or a descriptor above `keyDescriptor` (a pipe
    /// that holds the key, `XTSKey.pipe`).
    /// Returns the device path; throws the server's error line.
    static func launch(_ commandArguments: [String], program: String = executable,
                       keyInput: Int32 = STDIN_FILENO) throws -> String {
        precondition(keyInput == STDIN_FILENO || keyInput > keyDescriptor)
        // Say "not loaded" or "not permitted" here, in one line, rather than from a child.
        _ = try ControlDevice()

        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0, fcntl(pipeFDs[0], F_SETFD, FD_CLOEXEC) == 0, fcntl(pipeFDs[1], F_SETFD, FD_CLOEXEC) == 0 else { throw CLIError("pipe2: \(String(cString: strerror(errno)))") }
        let (readEnd, writeEnd) = (pipeFDs[0], pipeFDs[1])
        defer { close(readEnd) }

        let directory = "/" + logPath.split(separator: "/").dropLast().joined(separator: "/")
        SmallFile.makeDirectories(directory)
        let log = access(directory, W_OK) == 0 ? logPath : "/dev/null"

        let keyArguments = KeyOptions.handingStandardInput(commandArguments, to: keyDescriptor)
        let arguments = keyArguments ?? commandArguments
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // In this order: the pipe's write end is usually our descriptor 4, so it must be at 3
        // before 4 becomes the key input; and that before standard input becomes /dev/null.
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 3)
        if keyArguments != nil { posix_spawn_file_actions_adddup2(&actions, keyInput, keyDescriptor) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, log, O_WRONLY | O_CREAT | O_APPEND, 0o640)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // No signal blocked in the server (`ublk upgrade` blocks interrupts while it spawns one).
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        posix_spawnattr_setflags(&attributes, cublk_posix_spawn_setsid() | Int16(POSIX_SPAWN_SETSIGMASK))

        let spawned = spawn(program, ["ublk"] + arguments + ["--foreground", "--ready-fd", "3"], &actions, &attributes)
        close(writeEnd)
        let pid: pid_t
        do { pid = try spawned.get() } catch { throw CLIError("cannot start the server: \(error)") }

        return try awaitReport(from: readEnd, server: pid)
    }

    /// Reads everything the server says on the report pipe until it closes it: the device
    /// path once it is live, or its error line (then waits for it to exit). A server killed
    /// before either (a signal, a crash) could not remove the device it had added (`added
    /// N`): that is done here. (One that exited removed it itself, and its id may be
    /// another add's by now.)
    static func awaitReport(from readEnd: Int32, server pid: pid_t) throws -> String {
        var report = ""
        var chunk = [UInt8](repeating: 0, count: 512)
        while true {
            let count = read(readEnd, &chunk, chunk.count)
            if count > 0 { report += String(decoding: chunk[0..<count], as: UTF8.self); continue }
            if count < 0 && errno == EINTR { continue }
            break
        }
        var added: UInt32?
        for line in report.split(separator: "\n") {
            if line.hasPrefix("added ") { added = UInt32(line.dropFirst(6)) }
            if line.hasPrefix("note ") { FileHandleStderr.print("ublk: \(line.dropFirst(5))") }
            if line.hasPrefix("ready ") { return String(line.dropFirst(6)) }
            if line.hasPrefix("error ") {
                var status: Int32 = 0
                waitpid(pid, &status, 0)
                throw CLIError(String(line.dropFirst(6)))
            }
        }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        let killed = status & 0x7f != 0 && status & 0x7f != 0x7f  // WIFSIGNALED
        if killed, let added {
            let removed = removeLeftover(added)
            throw CLIError("the server was killed (signal \(status & 0x7f)) before the device was live; "
                + (removed ? "its device \(added) is removed" : "ublk del --id \(added) removes what it left") + ": see \(logPath)")
        }
        throw CLIError("the server exited before the device was live: see \(logPath)")
    }

    /// Why `program` is no ublk that can take a device over (`ublk upgrade --binary`), or
    /// nil if it is one. It must be an executable file whose `recover --help` says `ublk
    /// recover`: a directory, `/bin/true` or another program would be found out only after
    /// the old server had left the device, which then waits for `ublk recover`.
    static func ublkProblem(_ program: String, seconds: Int = helpSeconds) -> String? {
        var status = stat()
        guard stat(program, &status) == 0 else {
            return "\(program) cannot be run (\(SystemError("stat", errno: errno).reason))"
        }
        guard status.st_mode & S_IFMT == S_IFREG, access(program, X_OK) == 0 else {
            return "\(program) is not an executable file"
        }
        switch recoverHelp(program, seconds: seconds) {
        case .printed(let help) where help.contains("ublk recover"): return nil
        case .printed, .failed: return "\(program) is no ublk binary (its `recover --help` does not say `ublk recover`)"
        case .cannotRun(let error): return "\(program) cannot be run (\(error.reason))"
        case .silent: return "\(program) did not answer `recover --help` within \(seconds) s (on a loaded machine, try again)"
        }
    }

    /// How long `recover --help` may take. Generous: an emulated machine under load has
    /// taken over 5 s to start a Swift binary, and a refusal here only delays the upgrade.
    static let helpSeconds = 30

    /// How a program answered `recover --help`.
    enum HelpAnswer {
        /// It exited with status 0, having printed this.
        case printed(String)
        /// It exited otherwise, printed more than 64 KiB, or its output could not be read.
        case failed
        /// It could not be started (posix_spawn's error: ENOEXEC, EACCES...).
        case cannotRun(SystemError)
        /// It did not end its output within the time.
        case silent
    }

    /// Runs `program recover --help` for up to `seconds`.
    static func recoverHelp(_ program: String, seconds: Int) -> HelpAnswer {
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { return .cannotRun(SystemError("pipe", errno: errno)) }
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        defer { close(ends[0]) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, ends[1], 1)  // (dup2 clears O_CLOEXEC.)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        let spawned = spawn(program, ["ublk", "recover", "--help"], &actions, nil)
        close(ends[1])
        let pid: pid_t
        switch spawned {
        case .success(let child): pid = child
        case .failure(let error): return .cannotRun(error)
        }
        let output = readAll(ends[0], limit: 1 << 16, seconds: seconds)
        kill(pid, SIGKILL)  // (One that is still running is no ublk.)
        var exit: Int32 = 0
        while waitpid(pid, &exit, 0) < 0 && errno == EINTR {}
        switch output {
        case .text(let text): return exit == 0 ? .printed(text) : .failed
        case .timedOut: return .silent
        case .failed: return .failed
        }
    }

    /// posix_spawn of `program` with `argv` (its C strings made and freed here) and this
    /// process's environment: the child's pid.
    static func spawn(_ program: String, _ argv: [String], _ actions: inout posix_spawn_file_actions_t,
                      _ attributes: UnsafePointer<posix_spawnattr_t>?) -> Result<pid_t, SystemError> {
        var cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for argument in cArguments { free(argument) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, program, &actions, attributes, &cArguments, environ)
        return result == 0 ? .success(pid) : .failure(SystemError("posix_spawn", errno: result))
    }

    /// What reading a descriptor to its end gave (`readAll`).
    enum ReadOutcome {
        case text(String)
        case timedOut
        /// More than the limit, or a read failed.
        case failed
    }

    /// What `fd` gives until its end, if that comes within `limit` bytes and `seconds`
    /// (of the monotonic clock: a clock step does not cut the wait short).
    static func readAll(_ fd: Int32, limit: Int, seconds: Int) -> ReadOutcome {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let deadline = ContinuousClock.now + .seconds(seconds)
        while bytes.count <= limit {
            let left = ContinuousClock.now.duration(to: deadline)
            guard left > .zero else { return .timedOut }
            let milliseconds = left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000
            let ready = poll(&poller, 1, Int32(milliseconds + 1))
            if ready == 0 || (ready < 0 && errno == EINTR) { continue }  // (The loop checks the time.)
            guard ready > 0 else { return .failed }
            let count = read(fd, &chunk, chunk.count)
            if count == 0 { return .text(String(decoding: bytes, as: UTF8.self)) }
            if count < 0 { if errno == EINTR { continue } else { return .failed } }
            bytes += chunk[0..<count]
        }
        return .failed
    }

    /// Removes device `id`, which a killed server added; false if it could not.
    static func removeLeftover(_ id: UInt32) -> Bool {
        guard let control = try? ControlDevice() else { return false }
        if (try? control.deviceInfo(id)) == nil { return true }
        return (try? DeviceLifecycle.delete(id, control: control)) != nil
    }

    /// This program's file, for posix_spawn. Not "/proc/self/exe" itself: the kernel names a
    /// process after the file it executes, and ps, top and pgrep would show the server as "exe".
    static var executable: String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard count > 0 else { return "/proc/self/exe" }
        let path = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return path.hasSuffix(" (deleted)") ? "/proc/self/exe" : path
    }

    /// The server's side: the final report (`ready PATH` or `error MESSAGE`) on the
    /// inherited descriptor, which is then closed. False if it did not get through: the
    /// launching CLI is gone (interrupted), and nobody heard of the device.
    @discardableResult
    static func report(_ line: String, to fd: Int32) -> Bool {
        defer { close(fd) }
        return note(line, to: fd, prefix: "")
    }

    /// The server's side: a line the launching CLI shows the user on stderr. False if it
    /// did not get through.
    @discardableResult
    static func note(_ line: String, to fd: Int32, prefix: String = "note ") -> Bool {
        // A CLI that is gone must be an EPIPE we see, not a SIGPIPE that kills the server.
        signal(SIGPIPE, SIG_IGN)
        let text = prefix + line + "\n"
        // At most PIPE_BUF bytes go into a pipe whole or not at all.
        return text.withCString { write(fd, $0, strlen($0)) } == text.utf8.count
    }
}

/// A user-facing error: one line, exit status 1.
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
