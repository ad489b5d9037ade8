import Glibc
import UblkControl
import UblkServer
import UblkSystem

/// A device `ublk del` removed, whose server has ended, but whose id stays taken: a user of
/// the removed disk (a file system still mounted) holds it until it lets go.
struct IDStillTaken: Error, CustomStringConvertible {
    var id: UInt32
    var description: String {
        "ublk device \(id) is removed, but id \(id) stays taken until the last user of /dev/ublkb\(id) lets go (a file system still mounted?)"
    }
}

/// A device `ublk del` leaves because something holds it (see `DeviceRemoval.remove`).
struct DeviceBusy: Error, CustomStringConvertible {
    var description: String
}

/// `ublk del`: a device that is mounted or open is refused, naming what holds it, as
/// one removes a disk only once nothing uses it; `--force` pulls it out anyway.
enum DeviceRemoval {
    /// Removes the devices `ids` in turn, and then again those that were busy, as long as
    /// that removes any: a device stacked on another (its server holds the lower one open,
    /// as its backing) is removed first wherever it comes in the order, and the lower one
    /// then. Returns the failures of the devices that stay, each with its id.
    static func remove(_ ids: [UInt32], control: borrowing ControlDevice, force: Bool) -> [(UInt32, Error)] {
        var pending = ids
        var failed: [(UInt32, Error)] = []
        while true {
            var busy: [(UInt32, Error)] = []
            let failedBefore = failed.count
            for id in pending {
                do { try remove(id, control: control, force: force) } catch {
                    if error is DeviceBusy { busy.append((id, error)) } else { failed.append((id, error)) }
                }
            }
            let removed = pending.count - busy.count - (failed.count - failedBefore)
            // Nothing was removed this pass (so nothing was let go), or nothing is left busy.
            if busy.isEmpty || removed == 0 {
                let left = failed + busy
                return ids.compactMap { id in left.first { $0.0 == id } }
            }
            pending = busy.map(\.0)
        }
    }

    /// Removes device `id`. Without `force` a busy device is refused (DeviceBusy naming the
    /// holder); with it, the device is stopped at once and deleted without waiting for its
    /// openers: the file system on it sees I/O errors, and the command returns.
    static func remove(_ id: UInt32, control: borrowing ControlDevice, force: Bool) throws {
        let info: DeviceInfo
        do { info = try control.deviceInfo(id) } catch { throw CLIError("\(error)") }
        guard let holders = try busyHolders(id, control: control) else {
            // Not busy (and, where the kernel has TRY_STOP_DEV, already stopped).
            if try DeviceLifecycle.delete(id, control: control) { return }
            throw IDStillTaken(id: id)
        }
        guard force else {
            let what = holders.isEmpty ? "open" : holders.joined(separator: ", ")
            throw DeviceBusy(description: "ublk device \(id) is in use (\(what)): unmount or close it first, or remove it as a pulled disk with --force")
        }
        try refuseStoppedServer(id, pid: RuntimeDirectory.load(id)?.pid ?? info.serverPID)
        try pull(id, control: control)
    }

    /// A device still open, whose server is stopped by a signal (SIGSTOP, a debugger):
    /// STOP_DEV would wait, without end and beyond Ctrl-C, for the requests it holds and for
    /// those the removal itself sends (a mounted file system writes back as its disk goes).
    /// (An idle device of a stopped server is removed: `DeviceLifecycle.awaitRelease`.)
    static func refuseStoppedServer(_ id: UInt32, pid: Int32) throws {
        guard RuntimeDirectory.isStopped(pid) else { return }
        throw CLIError("ublk device \(id) is in use and its server (pid \(pid)) is stopped, which removing it would wait for: continue it (kill -CONT \(pid)) or end it (kill -9 \(pid)), then ublk del again")
    }

    /// nil when nothing holds the device, else what holds it (empty: the kernel says it is
    /// open, but not by whom). With SAFE_STOP_DEV the kernel decides, and stops the device
    /// in the same step (no open can slip in between); otherwise the block device's
    /// holders, mounts and openers are looked up.
    static func busyHolders(_ id: UInt32, control: borrowing ControlDevice) throws -> [String]? {
        guard control.features?.contains(.safeStop) == true else {
            let live = (try? control.deviceInfo(id))?.state == .live
            let holders = DeviceSafety.holders(of: id, probing: live)
            return holders.isEmpty ? nil : holders
        }
        do {
            try control.tryStopDevice(id)
            return nil
        } catch where error.errno == EBUSY {
            return DeviceSafety.holders(of: id)
        } catch where error.errno == ENODEV {
            // No disk (its server died without recovery, or it never started): nobody can hold it.
            return nil
        } catch { throw CLIError("\(error)") }
    }

    /// STOP_DEV (in-flight requests finish, the disk goes, its users see I/O errors), then
    /// DEL_DEV_ASYNC, which does not wait for the last opener as DEL_DEV does. A kernel
    /// without DEL_DEV_ASYNC leaves the deletion to the server on its way out.
    /// The server is told first (its request channel, `stopping`, best effort): STOP_DEV
    /// waits for the requests in flight, which must not wait long for anything, such as an
    /// NBD server that is down.
    static func pull(_ id: UInt32, control: borrowing ControlDevice) throws {
        let pid = RuntimeDirectory.load(id)?.pid ?? -1
        if RuntimeDirectory.isAlive(pid) { _ = try? ServerControl.request(id, "stopping", seconds: 2) }
        do { try control.stopDevice(id) } catch where error.errno == ENODEV || error.errno == ENOENT {
            throw CLIError("\(error)")
        } catch {
            // Already stopped: deletion still applies.
        }
        // (524: the kernel's own ENOTSUPP, which 6.9 to 6.10.2 answer DEL_DEV_ASYNC with.)
        do { try control.deleteDeviceAsync(id) } catch where [EOPNOTSUPP, EINVAL, ENOTTY, 524].contains(error.errno) {
            // No DEL_DEV_ASYNC here: the server deletes the device once its queues ended.
        } catch where error.errno == ENODEV || error.errno == ENOENT {
            // The server deleted it already.
        } catch { throw CLIError("\(error)") }
        // An idle server exits within moments; one whose disk is still mounted stays until
        // the unmount: give it a second, not more.
        for _ in 0..<100 where RuntimeDirectory.isAlive(pid) && pid != getpid() { usleep(10_000) }
        RuntimeDirectory.removeServerFiles(id, pid: pid)
    }
}
