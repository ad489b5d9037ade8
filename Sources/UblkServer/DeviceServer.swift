import CUblk
import Glibc
import Logging
import UblkControl
import UblkQueue
import UblkSystem

/// How a device is served (the target decides what it is backed by).
public struct ServerOptions: Sendable {
    /// Device id N (/dev/ublkbN); nil lets the kernel pick.
    public var id: UInt32?
    /// Hardware queues, each with its own thread and ring.
    public var queues: Int
    /// Requests in flight per queue (1...4096).
    public var depth: Int
    /// Largest request in bytes; also each tag's buffer size.
    public var maxIOBytes: Int = 512 * 1024
    /// UBLK_F_USER_RECOVERY (reissue or fail-io): the device survives a crashed server.
    public var recovery: RecoveryPolicy = .off
    /// Pin each queue thread to the CPUs the block layer maps to its queue.
    public var pinQueues = true

    public init(id: UInt32? = nil, queues: Int, depth: Int) {
        self.id = id
        self.queues = queues
        self.depth = depth
    }

    /// The default queue count: one per online CPU, at most 4.
    public static var defaultQueues: Int { max(1, min(4, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))) }
}

/// A server-side failure, phrased for the user.
public struct ServerError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Brings one ublk device up, serves it with one thread per queue, and takes it down.
///
/// Order, as the driver requires: ADD_DEV → SET_PARAMS → open /dev/ublkcN → every
/// queue thread issues its FETCH_REQs → START_DEV (the kernel waits for those
/// fetches, then adds /dev/ublkbN). On stop (SIGTERM/SIGINT/SIGHUP, or STOP_DEV from
/// `ublk del`) the kernel aborts the pending fetches, the queue threads end, the target
/// is synced, /dev/ublkcN is closed and the device deleted.
public final class DeviceServer {
    public let target: any Target
    public let options: ServerOptions
    let logger: Logger

    public init(target: any Target, options: ServerOptions, logger: Logger) {
        self.target = target
        self.options = options
        self.logger = logger
    }

    /// How the device comes to be served.
    public enum Mode: Sendable {
        /// ADD_DEV a new device.
        case create
        /// Take over device `id` whose server died (UBLK_F_USER_RECOVERY).
        case recover(UInt32)
    }

    /// Serves the device until it is stopped. Once /dev/ublkbN exists and reads, the
    /// record `describe` makes of it is written under /run/ublk (so `ublk list` knows it),
    /// then `onLive` runs, with the device as the kernel has it.
    public func run(_ mode: Mode = .create,
                    describe: (DeviceInfo, DeviceParameters) -> DeviceRecord? = { _, _ in nil },
                    onLive: (DeviceInfo, DeviceParameters) throws -> Void) throws {
        SignalWatcher.blockSignals()
        let control = try Self.openControl()

        let info: DeviceInfo
        switch mode {
        case .create:
            let flags = try options.recovery.deviceFlags(features: control.features)
            let request = DeviceInfo(id: options.id, queueCount: UInt16(options.queues), queueDepth: UInt16(options.depth),
                                     maxIOBufferBytes: UInt32(options.maxIOBytes), flags: flags)
            do { info = try control.addDevice(request) } catch { throw ServerError("\(error)") }
            if options.recovery.isEnabled && !info.flags.contains(.userRecovery) {
                try? control.deleteDevice(info.id!)
                throw ServerError("this kernel's ublk_drv has no user recovery: leave out --recovery")
            }
        case .recover(let id):
            do {
                let existing = try control.deviceInfo(id)
                guard existing.flags.contains(.userRecovery) else {
                    throw ServerError("device \(id) was not added with --recovery: it cannot be recovered, only deleted (ublk del --id \(id))")
                }
                try Self.startUserRecovery(control, id)
                // Run by `ublk upgrade` under a service manager, this process is the service's
                // main process from here on: say so before the old server exits.
                SystemdNotifier.notify("MAINPID=\(getpid())")
                info = existing
            } catch let error as ControlError {
                if error.errno == EBUSY {
                    throw ServerError("device \(id) is still served by a live server: nothing to recover")
                }
                throw ServerError("\(error)")
            }
        }
        let id = info.id!
        var isLive = false
        defer {
            // A failure before the device went live leaves nothing behind.
            if !isLive, case .create = mode { try? control.deleteDevice(id) }
        }

        let parameters = Self.parameters(for: target.properties, maxIOBytes: info.maxIOBufferBytes)
        if case .create = mode {
            do { try control.setParameters(id, parameters) } catch { throw ServerError("\(error)") }
        }

        let characterDevice = try openCharacterDevice(info.characterDevicePath)
        let limits = DeviceLimits(sectors: parameters.sectors, maxIOBytes: Int(info.maxIOBufferBytes))
        let capacity = DeviceCapacity(sectors: parameters.sectors)

        // Signals are taken by one watcher thread (sigwait); queue threads inherit the mask.
        let watcher = SignalWatcher(deviceID: id, logger: logger)

        var threads: [QueueThread] = []
        do {
            for queue in 0..<Int(info.queueCount) {
                let mask = options.pinQueues ? try? control.queueAffinity(id, queue: UInt16(queue)) : nil
                var configuration = QueueConfiguration(deviceID: id, queueID: UInt16(queue), depth: Int(info.queueDepth),
                                                       bufferSize: Int(info.maxIOBufferBytes), limits: limits,
                                                       encoding: control.encoding, cpuMask: mask)
                configuration.capacity = capacity
                threads.append(try QueueThread.start(configuration, characterDevice: characterDevice.rawValue,
                                                     target: target, logger: logger))
            }
            switch mode {
            case .create: try control.startDevice(id, serverPID: getpid())
            case .recover: try control.endUserRecovery(id, serverPID: getpid())
            }
        } catch {
            // The queues that did start hold fetches: stopping aborts them.
            try? control.stopDevice(id)
            for thread in threads { thread.join() }
            throw ServerError("\(error)")
        }
        isLive = true

        do { try waitUntilReadable(info.blockDevicePath) } catch {
            logger.error("\(error)")
            try? control.stopDevice(id)
        }
        useNoScheduler(id)
        let live: DeviceInfo = (try? control.deviceInfo(id)) ?? info
        let liveParameters = (try? control.parameters(id)) ?? parameters
        let record = describe(live, liveParameters)
        if let record {
            do { try RuntimeDirectory.save(record) } catch { logger.warning("cannot write the device record: \(error)") }
        }
        // Requests from `ublk resize` and `ublk upgrade`.
        let requests = ServerControl(deviceID: id, capacity: capacity, target: target, record: record, logger: logger)
        requests.start()
        defer { requests.stop() }
        do { try onLive(live, liveParameters) } catch {
            logger.error("\(error)")
            watcher.requestStop()
        }
        watcher.start()

        var failure: Error?
        for thread in threads {
            if let error = thread.join() {
                logger.error("queue ended early: \(error)")
                failure = failure ?? error
                try? control.stopDevice(id)
            }
        }
        if requests.keepsDevice && failure == nil {
            // Quiesced for `ublk upgrade`: the device and its record stay for the new server.
            requests.stop()
            return handOver(id, characterDevice: characterDevice, control: control)
        }
        SystemdNotifier.notify("STOPPING=1\nSTATUS=Removing /dev/ublkb\(id)")
        do { try target.sync() } catch { logger.error("sync of the backing failed: \(error)") }
        _ = consume characterDevice
        do { try control.deleteDevice(id) } catch let error {
            if error.errno != ENODEV && error.errno != ENOENT { logger.warning("\(error)") }
        }
        RuntimeDirectory.remove(id)
        if let failure { throw ServerError("device \(id) stopped after a queue failed: \(failure)") }
    }

    /// The device parameters (SET_PARAMS) for a target: its size and block sizes, requests
    /// up to one tag buffer, a volatile cache with FUA where the target has a cache, and
    /// discard/write-zeroes only when the target can do them.
    public static func parameters(for properties: TargetProperties, maxIOBytes: UInt32) -> DeviceParameters {
        var parameters = DeviceParameters(sectors: properties.size >> 9, maxSectors: maxIOBytes >> 9)
        parameters.logicalBlockShift = UInt8(properties.logicalBlockSize.trailingZeroBitCount)
        parameters.physicalBlockShift = UInt8(properties.physicalBlockSize.trailingZeroBitCount)
        parameters.ioMinimalShift = parameters.logicalBlockShift
        parameters.ioOptimalShift = parameters.physicalBlockShift
        parameters.readOnly = properties.readOnly
        parameters.rotational = properties.rotational
        parameters.volatileCache = properties.volatileCache
        parameters.fua = properties.volatileCache
        if properties.supportsDiscard {
            parameters.discard = .init(granularity: UInt32(properties.discardGranularity),
                                       maxDiscardSectors: UInt32.max >> 9,
                                       maxWriteZeroesSectors: properties.supportsWriteZeroes ? UInt32.max >> 9 : 0)
        }
        return parameters
    }

    /// START_USER_RECOVERY, waiting up to 5 s while the driver answers EBUSY: it does
    /// until the dead server's /dev/ublkcN is released and the device is quiesced.
    static func startUserRecovery(_ control: borrowing ControlDevice, _ id: UInt32) throws(ControlError) {
        var attempt = 0
        while true {
            do {
                try control.startUserRecovery(id)
                return
            } catch {
                attempt += 1
                if error.errno != EBUSY || attempt > 50 { throw error }
                usleep(100_000)
            }
        }
    }

    static func openControl() throws -> ControlDevice {
        do { return try ControlDevice() } catch { throw ServerError("\(error)") }
    }

    /// START_DEV has added the disk; its node comes from devtmpfs/udev. The device counts
    /// as live once the node exists and its first block can be read through the queues.
    private func waitUntilReadable(_ path: String) throws {
        var lastError = SystemError("open \(path)", errno: ENOENT)
        for _ in 0..<250 {
            do {
                let device = try FileDescriptor(path: path, flags: O_RDONLY)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
                defer { buffer.deallocate() }
                _ = try device.read(into: buffer, at: 0)
                return
            } catch let error as SystemError {
                lastError = error
                usleep(20_000)
            }
        }
        throw ServerError("\(path) is not readable after START_DEV: \(lastError)")
    }

    /// No I/O scheduler on the device, as the kernel loop driver has (its tag set asks for
    /// none by default): requests go straight to the backing, whose own queue schedules
    /// them. The block layer would otherwise give a single-queue ublk disk mq-deadline.
    private func useNoScheduler(_ id: UInt32) {
        let path = "/sys/block/ublkb\(id)/queue/scheduler"
        guard let current = SmallFile.text(path), !current.contains("[none]") else { return }
        do { try SmallFile.overwrite(path, Array("none".utf8)) } catch {
            logger.debug("cannot set the I/O scheduler of /dev/ublkb\(id) to none: \(error)")
        }
    }

    /// /dev/ublkcN appears once devtmpfs/udev has made the node: wait a little for it.
    private func openCharacterDevice(_ path: String) throws -> FileDescriptor {
        for _ in 0..<100 {
            do { return try FileDescriptor(path: path, flags: O_RDWR) }
            catch where error.errno == ENOENT { usleep(20_000) }
            catch { throw ServerError("\(error)") }
        }
        throw ServerError("\(path) did not appear: is devtmpfs or udev running?")
    }
}
