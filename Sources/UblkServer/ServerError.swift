import Glibc
import UblkControl
import UblkSystem
import UblkTargets

/// Why a device could not be brought up, served or recovered. The underlying typed
/// error (with its errno and failing call) is kept; `description` is the one sentence
/// for the user, saying what to do.
public enum ServerError: Error, CustomStringConvertible {
    case controlDevice(ControlDeviceError)
    case control(ControlError)
    case system(SystemError)
    case target(TargetError)
    /// A queue thread could not set its queue up (ring, mapping, the target's handler).
    case queueSetup(any Error)
    /// The kernel's ublk_drv cannot keep a device for a new server (features, if known).
    case noUserRecovery(FeatureFlags?)
    case notRecoverable(UInt32)
    case stillServed(UInt32)
    /// Recovering device `id`: the target no longer fits the device the kernel keeps (why).
    case targetChanged(UInt32, String)
    /// /dev/ublkbN did not read once served; `kept`: the id of a device being recovered,
    /// which stays for another server (nil: a new device, removed).
    case notReadable(String, SystemError, kept: UInt32?)
    case characterDeviceMissing(String)
    case queueFailed(UInt32, any Error)
    /// Device `id` was stopped, but writes it had completed may not be durable (why).
    case notDurable(UInt32, String)
    /// `--recovery fail-io` on a kernel without UBLK_F_USER_RECOVERY_FAIL_IO.
    case noFailIO
    /// `ublk resize`: the target's size is fixed, or the kernel has no UPDATE_SIZE.
    case notResizable(String)
    case noUpdateSize
    /// `ublk upgrade`: the device was added without QUIESCE.
    case notUpgradable(UInt32)
    /// The request channel of device `id`'s server (`ublk resize`, `ublk upgrade`) failed.
    case noRequestChannel(UInt32, path: String, SystemError)
    case noAnswer(UInt32, seconds: Int)
    /// What the server answered to a request it refused (its own one-line sentence).
    case refusedByServer(String)
    /// `--zero-copy on`, and the kernel has no UBLK_F_AUTO_BUF_REG (features, if known).
    case noZeroCopy(FeatureFlags?)
    /// `--batch-io on`, and the kernel has no UBLK_F_BATCH_IO (features, if known).
    case noBatchIO(FeatureFlags?)
    /// `--batch-io on` with `--depth 1`.
    case batchIONeedsDepth
    /// `--zero-copy on` for a target that must see the data.
    case targetNeedsCopy(String)

    /// The errno behind the failure, if a system call or ublk command failed.
    public var errno: Int32? {
        switch self {
        case .controlDevice(.system(let error)), .system(let error), .notReadable(_, let error, _): error.errno
        case .control(let error): error.errno
        case .target(let error): error.systemError?.errno
        case .queueSetup(let error), .queueFailed(_, let error): (error as? SystemError)?.errno
        default: nil
        }
    }

    public var description: String {
        switch self {
        case .controlDevice(let error): "\(error)"
        case .control(let error): "\(error)"
        case .system(let error): "\(error)"
        case .target(let error): "\(error)"
        case .queueSetup(let error): "\(error)"
        case .noUserRecovery(let features?): "this kernel's ublk_drv has no user recovery (features: \(features)): leave out --recovery"
        case .noUserRecovery(nil): "this kernel's ublk_drv has no user recovery: leave out --recovery"
        case let .targetChanged(id, why):
            "device \(id) cannot be taken over with this backing: \(why); it waits for a server: fix the backing, then ublk recover --id \(id)"
        case .notRecoverable(let id):
            "device \(id) was not added with --recovery: it cannot be recovered, only deleted (ublk del --id \(id))"
        case .stillServed(let id): "device \(id) is still served by a live server: nothing to recover"
        case let .notReadable(path, error, nil):
            "\(path) is not readable after START_DEV (\(error)), so it was removed: check that the backing's first block reads"
        case let .notReadable(path, error, id?):
            "\(path) is not readable after recovery (\(error)): it waits for a server; once the backing's first block reads, ublk recover --id \(id)"
        case .characterDeviceMissing(let path): "\(path) did not appear: is devtmpfs or udev running?"
        case let .queueFailed(id, error): "device \(id) stopped after a queue failed: \(error)"
        case let .notDurable(id, why):
            "device \(id) was stopped, but writes it completed may not be on stable storage: \(why): check the backing"
        case .noFailIO:
            "this kernel's ublk_drv has no UBLK_F_USER_RECOVERY_FAIL_IO (Linux 6.13+): use --recovery (I/O waits for the new server) or leave it out"
        case .notResizable(let name): "the \(name) target cannot be resized"
        case .noUpdateSize:
            "this kernel's ublk_drv has no UPDATE_SIZE (UBLK_F_UPDATE_SIZE, Linux 6.16+): the device keeps its size"
        case .notUpgradable(let id):
            "device \(id) was added without QUIESCE (it needs --recovery and Linux 6.16+): it cannot be upgraded in place"
        case let .noRequestChannel(id, path, error):
            "the server of device \(id) does not answer at \(path) (\(error.reason)): is it a server from before this version? Restart it"
        case let .noAnswer(id, seconds): "the server of device \(id) gave no answer within \(seconds) s"
        case .refusedByServer(let line): line
        case .noZeroCopy(let features):
            "zero copy needs UBLK_F_AUTO_BUF_REG, which this kernel's ublk_drv lacks (features: \(features.map { "\($0)" } ?? "unknown")): use --zero-copy auto or off"
        case .noBatchIO(let features):
            "batched I/O commands need UBLK_F_BATCH_IO, which this kernel's ublk_drv lacks (features: \(features.map { "\($0)" } ?? "unknown")): use --batch-io auto or off"
        case .batchIONeedsDepth:
            "batched I/O commands need a queue depth of at least 2 (ublk_drv refuses a batched queue of depth 1): use --depth 2 or more, or --batch-io auto or off"
        case .targetNeedsCopy(let name):
            "the \(name) target must see the data, so it cannot use zero copy: use --zero-copy auto or off"
        }
    }
}
