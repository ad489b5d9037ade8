import CUblk
import Glibc
import Logging
import UblkControl
import UblkQueue
import UblkSystem
import UblkTargets

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
    /// Config name, when started by `ublk start NAME` (kept in the device record).
    public var name: String?
    /// Zero copy (UBLK_F_AUTO_BUF_REG): requests' pages go straight to the target's ring I/O.
    public var zeroCopy: FeatureMode = .auto
    /// Batched I/O commands (UBLK_F_BATCH_IO): requests arrive and are committed many per
    /// command rather than one command per request.
    public var batchIO: FeatureMode = .auto
    /// Busy polling: each queue thread spins this many microseconds for the next
    /// completion before it sleeps (0: never spins; `ublk add` defaults to
    /// `defaultPollMicroseconds`).
    public var pollMicroseconds = 0
    /// The device will hold swap: the server's memory, its queues' buffers too, is faulted
    /// in and locked at once rather than as it is used (`LockedMemory.protectServer`).
    public var swap = false

    public init(id: UInt32? = nil, queues: Int, depth: Int) {
        self.id = id
        self.queues = queues
        self.depth = depth
    }

    /// The default queue count: one per four online CPUs, at least 1 and at most 4.
    ///
    /// Why not one per CPU: each queue thread needs a CPU of its own besides the threads
    /// that submit I/O. Measured side by side on 2 vCPUs (Benchmarks/run-vm), one queue beat
    /// two in every cell, by up to 1.6x at 4k qd32; the kernel loop driver also has one
    /// hardware queue. More queues pay off only with CPUs to spare: `--queues N`.
    public static var defaultQueues: Int { max(1, min(4, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) / 4)) }

    /// The default busy-polling window, in microseconds: 2000, or 0 where the target runs
    /// worker threads of its own (the encrypting target's cipher threads), which need the
    /// CPU a spinning queue thread would take.
    ///
    /// Why poll: at queue depth 1 each request otherwise costs the queue thread a sleep and
    /// a wake-up, for its backing I/O and again for the next request. Measured side by side
    /// on 2 vCPUs (Benchmarks/run-vm, 6 rounds), 4k qd1 went from 0.72-0.82 of the kernel
    /// loop driver to 0.97-1.20 on both kernels; deeper queues do not spin (`Queue.busyTags`).
    /// Why 2000: 1000 was too short for the emulated disk's writes on 6.12 (its spins missed
    /// and backed off: randwrite qd1 0.90, against 1.18 at 2000). The price: a CPU spins
    /// while requests keep coming closer than the window; sparse requests back the spin off
    /// (`BusyPoll`), an idle device sleeps. `--poll-us 0` turns it off.
    public static func defaultPollMicroseconds(targetHasWorkerThreads: Bool) -> Int {
        targetHasWorkerThreads ? 0 : 2000
    }
}

/// Whether a device uses a kernel feature that is a choice: zero copy (requests' pages
/// handed to the target's ring I/O rather than copied through a buffer per tag), batched
/// I/O commands.
public enum FeatureMode: String, Sendable, CaseIterable, Codable {
    /// Where the kernel has it (and, for zero copy, the target can use it).
    case auto
    /// Use it, or fail in one line naming what is missing.
    case on
    /// Never.
    case off
}

/// Brings one ublk device up, serves it with one thread per queue, and takes it down.
///
/// Order, as the driver requires: ADD_DEV → SET_PARAMS → open /dev/ublkcN → every
/// queue thread issues its FETCH_REQs → START_DEV (the kernel waits for those
/// fetches, then adds /dev/ublkbN). On stop (SIGTERM/SIGINT/SIGHUP, or STOP_DEV from
/// `ublk del`) the kernel aborts the pending fetches, the queue threads end, the target
/// is synced, /dev/ublkcN is closed and the device deleted.
public final class DeviceServer {
    /// What the device is backed by. A `SpecifiedTarget` (the loop and null targets) also
    /// gets a record under /run/ublk, which `ublk list` and `ublk recover` read; a target
    /// of a library user's own that has no `TargetSpec` is served without one.
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

    /// Serves the device until it is stopped. Once /dev/ublkbN exists and reads, its
    /// record is written under /run/ublk (so `ublk list` knows it), then `onLive` runs,
    /// with the device as the kernel has it.
    ///
    /// A recovery that fails after its queues started leaves them running until the
    /// process ends (stopping them would stop the device): the kernel takes that end as
    /// the server gone again, and the device waits for the next one.
    /// `onAdded` gets the new device's id as soon as ADD_DEV made it (a launching CLI removes
    /// it should this process die before it could do so itself).
    public func run(_ mode: Mode = .create, onAdded: (UInt32) -> Void = { _ in },
                    onLive: (DeviceInfo, DeviceParameters) throws -> Void) throws(ServerError) {
        SignalWatcher.blockSignals()
        protectMemory()
        let control = try Self.openControl()
        let info: DeviceInfo
        // A recovered device keeps what it was given (and resized to): the queues enforce that.
        var kept: DeviceParameters?
        switch mode {
        case .create:
            info = try createDevice(control)
            onAdded(info.id!)
        case .recover(let id): (info, kept) = try recoverDevice(id, control)
        }
        let id = info.id!
        var isLive = false
        defer {
            // A failure before the device went live leaves nothing behind.
            if !isLive, case .create = mode { try? control.deleteDevice(id) }
        }
        var parameters = kept ?? Self.parameters(for: target.properties, maxIOBytes: info.maxIOBufferBytes)
        if kept == nil {
            // Zero copy hands the reader's own pages to the backing (O_DIRECT there): aligned
            // as for loop, not ublk_drv's default 4 bytes, which an O_DIRECT backing refuses.
            if case .autoRegister = Self.bufferMode(info) { parameters.dmaAlignment = Self.zeroCopyAlignment }
            do { try control.setParameters(id, parameters) } catch { throw .control(error) }
        }
        let characterDevice = try openCharacterDevice(info.characterDevicePath)
        // The size the queues enforce, which `ublk resize` changes while they run.
        let capacity = DeviceCapacity(sectors: parameters.sectors)
        // Signals are taken by one watcher thread (sigwait); queue threads inherit the mask.
        let watcher = SignalWatcher(deviceID: id, target: target, logger: logger)
        let threads = try startQueues(info, parameters: parameters, mode: mode, control: control,
                                      characterDevice: characterDevice.rawValue, capacity: capacity)
        do {
            try waitUntilReadable(info.blockDevicePath, keeping: kept == nil ? nil : id)
            if kept == nil, info.flags.contains(.noAutoPartitionScan) { readPartitionTable(info.blockDevicePath) }
        } catch {
            abandonStart(threads, id: id, mode: mode, control: control)
            throw error
        }
        isLive = true
        let requests = goLive(info, parameters: parameters, control: control, watcher: watcher, capacity: capacity,
                              onLive: onLive)
        let failure = waitForQueues(threads, id: id, control: control)
        requests.stop()
        // Quiesced for `ublk upgrade`: the device and its record stay for the new server;
        // unless it was stopped meanwhile (a signal, `ublk del`, while QUIESCE_DEV ran): a
        // dead device waits for no one.
        if requests.keepsDevice && failure == nil && (try? control.deviceInfo(id))?.state != .dead {
            return handOver(id, characterDevice: characterDevice, control: control)
        }
        try stop(id, characterDevice: characterDevice, control: control, failure: failure)
    }

    /// The device's end: the last sync, then the device and its record go. A failed queue,
    /// or writes that may not be durable, end the server with an error, which a service
    /// manager sees too.
    private func stop(_ id: UInt32, characterDevice: consuming FileDescriptor, control: borrowing ControlDevice,
                      failure: (any Error)?) throws(ServerError) {
        SystemdNotifier.notify("STOPPING=1\nSTATUS=Removing /dev/ublkb\(id)")
        let undurable = finalSync()
        _ = consume characterDevice
        removeDevice(id, control: control)
        RuntimeDirectory.remove(id)
        if let failure { throw .queueFailed(id, failure) }
        if let undurable { throw .notDurable(id, undurable) }
    }

    /// This server's last sync, before the device goes or passes to a new server (`handOver`):
    /// why writes it completed may not be durable (the sync failed, or a connection was lost
    /// with writes no FLUSH had covered), said in the log; nil if they are.
    func finalSync() -> String? {
        var why: String?
        do { try target.sync() } catch { why = "its sync failed (\(error))" }
        if why == nil, target.writesLost { why = "a connection to the backing was lost with writes no FLUSH had covered" }
        if let why { logger.error("writes completed may not be on stable storage: \(why)") }
        return why
    }

    /// DEL_DEV waits for the disk's last opener: a server stopped by a signal under a mounted
    /// file system did not end until the unmount. So DEL_DEV_ASYNC where the kernel has it,
    /// then up to 5 s for the id to be freed (at once when nothing holds the disk, so that a
    /// service restarted with the same `id` finds it free); a disk still mounted then keeps
    /// its id until the unmount, as after `ublk del --force`. Any kernel that refuses
    /// DEL_DEV_ASYNC (before 6.9; 6.9 to 6.10.2 answer ENOTSUPP even where they have it)
    /// gets DEL_DEV.
    private func removeDevice(_ id: UInt32, control: borrowing ControlDevice) {
        do {
            try control.deleteDeviceAsync(id)
        } catch where error.isNoSuchDevice {
            return
        } catch {
            do { try control.deleteDevice(id) } catch where !error.isNoSuchDevice { logger.warning("\(error)") } catch {}
            return
        }
        for _ in 0..<500 {
            guard (try? control.deviceInfo(id)) != nil else { return }
            usleep(10_000)
        }
        logger.notice("/dev/ublkb\(id) is still open (a file system mounted on it?): its id is freed once it is closed")
    }

    /// Before the queue threads start (they inherit it): the server's memory is never
    /// swapped out, nor does it wait for I/O to get more (`LockedMemory.protectServer`); a
    /// server that holds a key keeps the copies its cipher library makes of it out of core
    /// dumps and swap.
    private func protectMemory() {
        let holdsKey = (target as? any SpecifiedTarget)?.spec.encryption != nil
        for error in LockedMemory.protectServer(holdingKey: holdsKey, populating: options.swap) {
            let risk = holdsKey ? "copies of the key that OpenSSL makes may reach a core dump or swap"
                                : "swap on this device, or heavy write-back to it under memory pressure, may stall it"
            logger.warning("\(error): \(risk)")
        }
    }

    /// ADD_DEV, with user recovery and zero copy when asked (and refused if the kernel lacks them).
    /// What the device got is read back from the flags ADD_DEV returns.
    private func createDevice(_ control: borrowing ControlDevice) throws(ServerError) -> DeviceInfo {
        var flags = try options.recovery.deviceFlags(features: control.features)
        flags.formUnion(try zeroCopyFlags(features: control.features))
        flags.formUnion(try Self.batchFlags(options, target: target, features: control.features))
        // Kernels with this flag scan a new disk's partition table in a work item after
        // START_DEV returns, so the device could be reported live before /dev/ublkbNpK
        // exist; with it, the server reads the table itself first (`readPartitionTable`),
        // as `losetup -P` does. Kernels without it scan inside START_DEV.
        if control.features?.contains(.noAutoPartitionScan) == true { flags.insert(.noAutoPartitionScan) }
        let request = DeviceInfo(id: options.id, queueCount: UInt16(options.queues), queueDepth: UInt16(options.depth),
                                 maxIOBufferBytes: UInt32(min(options.maxIOBytes, target.properties.maximumTransferBytes)),
                                 flags: flags)
        let info: DeviceInfo
        do { info = try control.addDevice(request) } catch { throw .control(error) }
        logger.debug("ADD_DEV: device \(info.id!) has flags \(info.flags)")
        var missing: ServerError?
        if options.recovery.isEnabled && !info.flags.contains(.userRecovery) { missing = .noUserRecovery(nil) }
        if options.zeroCopy == .on && !info.flags.contains(.autoBufferRegistration) { missing = .noZeroCopy(nil) }
        if options.batchIO == .on && !info.flags.contains(.batchIO) { missing = .noBatchIO(nil) }
        if let missing {
            try? control.deleteDevice(info.id!)
            throw missing
        }
        return info
    }

    /// The ADD_DEV flags zero copy needs: AUTO_BUF_REG, plus SUPPORT_ZERO_COPY where the
    /// kernel has it (so a request the driver could not register is registered by hand).
    private func zeroCopyFlags(features: FeatureFlags?) throws(ServerError) -> FeatureFlags {
        let kernelHasIt = features?.contains(.autoBufferRegistration) ?? false
        switch options.zeroCopy {
        case .off: return []
        case .on where !target.supportsZeroCopy: throw .targetNeedsCopy(target.name)
        case .on where !kernelHasIt: throw .noZeroCopy(features)
        case .on, .auto:
            guard kernelHasIt && target.supportsZeroCopy else { return [] }
            return features!.contains(.zeroCopy) ? [.autoBufferRegistration, .zeroCopy] : [.autoBufferRegistration]
        }
    }

    /// The ADD_DEV flag of batched I/O commands, where the kernel has it and it is not off.
    ///
    /// `auto` leaves it off for devices added with `--recovery`: those are the ones `ublk
    /// upgrade` replaces the server of, and on a batched queue QUIESCE_DEV does not wait for
    /// the requests in flight (ublk_drv cancels the fetch at once); under load, writes then
    /// failed with EIO in the VM tests (Debian's 7.3.4), where per-request queues lose none.
    /// Nor does it batch a queue of depth 1, which ADD_DEV refuses with EINVAL (the driver's
    /// per-queue event FIFO needs room for two tags) and where there is nothing to batch.
    /// Nor where the target would have several threads share each queue and the kernel lets
    /// them (PER_IO_DAEMON, which ADD_DEV grants only without BATCH_IO): `threadsPerQueue`.
    static func batchFlags(_ options: ServerOptions, target: any Target,
                           features: FeatureFlags?) throws(ServerError) -> FeatureFlags {
        let kernelHasIt = features?.contains(.batchIO) ?? false
        switch options.batchIO {
        case .off: return []
        case .on where !kernelHasIt: throw .noBatchIO(features)
        case .on where options.depth < 2: throw .batchIONeedsDepth
        case .on: return [.batchIO]
        case .auto:
            let sharedQueues = target.threadsPerQueue > 1 && features?.contains(.perIODaemon) == true
            return kernelHasIt && !options.recovery.isEnabled && options.depth >= 2 && !sharedQueues ? [.batchIO] : []
        }
    }

    /// How many threads serve each queue: the target's `threadsPerQueue` where the device
    /// lets a tag be served by a thread of its own (PER_IO_DAEMON), at most one per tag;
    /// else one.
    static func threadsPerQueue(_ info: DeviceInfo, target: any Target) -> Int {
        guard info.flags.contains(.perIODaemon) && !info.flags.contains(.batchIO) else { return 1 }
        return max(1, min(target.threadsPerQueue, Int(info.queueDepth)))
    }

    /// A server locks its memory as it is used (`LockedMemory.protectServer`), the queues'
    /// buffers too: a request's buffer (unless zero copy) and, encrypting, its bounce buffer,
    /// for each tag of each queue, which a large `--depth` makes much. Said where that could
    /// reach 1 GiB or a quarter of the machine's memory; with `swap` (`ServerOptions.swap`)
    /// all of it is locked at start.
    public static func lockedMemoryRemark(_ target: any Target, _ info: DeviceInfo, swap: Bool) -> String? {
        guard LockedMemory.locksEverything else { return nil }
        var perRequest = UInt64(0)
        if case .copy(let bytes) = bufferMode(info) { perRequest += UInt64(bytes) }
        if (target as? any SpecifiedTarget)?.spec.encryption != nil {
            perRequest += UInt64(EncryptionConfiguration.bounceBytesPerRequest)
        }
        let buffers = UInt64(info.queueCount) * UInt64(info.queueDepth) * perRequest
        guard buffers > min(1 << 30, LockedMemory.physicalBytes / 4) else { return nil }
        if swap {
            return "the device locks \(buffers >> 20) MiB of memory now (the buffers of \(info.queueCount) × \(info.queueDepth) requests, with --swap): a smaller --depth locks less"
        }
        return "the device may lock up to \(buffers >> 20) MiB of memory (the buffers of \(info.queueCount) × \(info.queueDepth) requests, locked as they are used, so that the server never waits for swap): a smaller --depth locks less"
    }

    /// How the queues hold request data, from the device's own flags (a recovered device
    /// keeps the flags it was added with).
    static func bufferMode(_ info: DeviceInfo) -> TagBufferMode {
        info.flags.contains(.autoBufferRegistration)
            ? .autoRegister(fallback: info.flags.contains(.zeroCopy)) : .copy(bytesPerTag: Int(info.maxIOBufferBytes))
    }

    /// Takes device `id` over from a dead server: START_USER_RECOVERY. Returns the device
    /// and the parameters it keeps.
    private func recoverDevice(_ id: UInt32, _ control: borrowing ControlDevice)
        throws(ServerError) -> (DeviceInfo, DeviceParameters) {
        do {
            let existing = try control.deviceInfo(id)
            guard existing.flags.contains(.userRecovery) else { throw ServerError.notRecoverable(id) }
            let parameters = try control.parameters(id)
            let queueLimit = (target as? any SpecifiedTarget)?.queueLimit?.queues
            if let why = Self.mismatch(target.properties, queueLimit: queueLimit, device: parameters,
                                       queues: Int(existing.queueCount)) {
                throw ServerError.targetChanged(id, why)
            }
            try Self.startUserRecovery(control, id)
            // Run by `ublk upgrade` under a service manager, this process is the service's
            // main process from here on: say so before the old server exits.
            SystemdNotifier.notify("MAINPID=\(getpid())")
            return (existing, parameters)
        } catch let error as ControlError {
            throw error.errno == EBUSY ? .stillServed(id) : .control(error)
        } catch {
            throw error as! ServerError
        }
    }

    /// One thread per queue, each fetching every tag (or several threads, each fetching its
    /// share of the tags: `threadsPerQueue`); then START_DEV (or END_USER_RECOVERY).
    private func startQueues(_ info: DeviceInfo, parameters: DeviceParameters, mode: Mode,
                             control: borrowing ControlDevice, characterDevice: Int32,
                             capacity: DeviceCapacity) throws(ServerError) -> QueueThreads {
        let id = info.id!
        let limits = DeviceLimits(sectors: parameters.sectors, maxIOBytes: Int(info.maxIOBufferBytes))
        let sharing = Self.threadsPerQueue(info, target: target)
        let threads = QueueThreads()
        do {
            for queue in 0..<Int(info.queueCount) {
                let mask = options.pinQueues ? try? control.queueAffinity(id, queue: UInt16(queue)) : nil
                var configuration = QueueConfiguration(queueID: UInt16(queue), depth: Int(info.queueDepth),
                                                       buffers: Self.bufferMode(info),
                                                       limits: limits, encoding: control.encoding, cpuMask: mask)
                configuration.capacity = capacity
                configuration.batchedCommands = info.flags.contains(.batchIO)
                configuration.pollMicroseconds = options.pollMicroseconds
                for index in 0..<sharing {
                    configuration.share = TagShare(index: index, count: sharing)
                    try threads.start(configuration, characterDevice: characterDevice, target: target, logger: logger)
                }
            }
            switch mode {
            case .create: try control.startDevice(id, serverPID: getpid())
            case .recover: try control.endUserRecovery(id, serverPID: getpid())
            }
            return threads
        } catch {
            abandonStart(threads, id: id, mode: mode, control: control)
            throw (error as? ControlError).map { ServerError.control($0) } ?? .queueSetup(error)
        }
    }

    /// The device failed to come up after its queues started. A new one is stopped (the
    /// queues' fetches are aborted, they end) and deleted on the way out. A recovered one
    /// stays for the next server (`ublk recover`), as it was before this one came: its
    /// queue threads end with this process, which the driver takes as its server gone
    /// again, so the disk under a mounted file system survives a failed recover or upgrade.
    private func abandonStart(_ threads: QueueThreads, id: UInt32, mode: Mode, control: borrowing ControlDevice) {
        guard case .create = mode else { return }
        target.stopRequested()
        try? control.stopDevice(id)
        _ = threads.joinAll()
    }

    /// The device reads: writes the record, opens the request channel (resize, upgrade),
    /// runs `onLive`, then lets signals stop the device.
    private func goLive(_ info: DeviceInfo, parameters: DeviceParameters, control: borrowing ControlDevice,
                        watcher: SignalWatcher, capacity: DeviceCapacity,
                        onLive: (DeviceInfo, DeviceParameters) throws -> Void) -> ServerControl {
        let id = info.id!
        useNoScheduler(id)
        let live: DeviceInfo = (try? control.deviceInfo(id)) ?? info
        let liveParameters = (try? control.parameters(id)) ?? parameters
        var record: DeviceRecord?
        if let target = target as? any SpecifiedTarget {
            record = DeviceRecord(id: id, pid: getpid(), name: options.name, spec: target.spec,
                                  size: liveParameters.sectors << 9, queues: Int(live.queueCount), depth: Int(live.queueDepth),
                                  directIO: target.directIOState, recovery: options.recovery.isEnabled,
                                  pollMicroseconds: options.pollMicroseconds, keyCheck: target.keyCheck,
                                  backingIdentity: target.backingIdentity)
            record?.swap = options.swap ? true : nil
            record?.writesLost = target.writesLost ? true : nil
        }
        if let record {
            do { try RuntimeDirectory.save(record) } catch { logger.warning("cannot write the device record: \(error)") }
        }
        // Requests from `ublk resize` and `ublk upgrade`.
        let requests = ServerControl(deviceID: id, capacity: capacity, target: target, record: record, logger: logger)
        requests.start()
        do { try onLive(live, liveParameters) } catch {
            logger.error("\(error)")
            watcher.requestStop()
        }
        watcher.start()
        return requests
    }

    /// The request buffers' memory alignment with zero copy: 512 bytes, the block layer's
    /// default, which the kernel loop driver gets and an O_DIRECT backing accepts.
    static let zeroCopyAlignment: UInt32 = 511

    /// Joins every queue thread; a queue that ended early stops the device. Returns the first failure.
    private func waitForQueues(_ threads: QueueThreads, id: UInt32, control: borrowing ControlDevice) -> (any Error)? {
        threads.joinAll { error in
            logger.error("queue ended early: \(error)")
            target.stopRequested()
            try? control.stopDevice(id)
        }
    }

    /// The device parameters (SET_PARAMS) for a target: its size and block sizes, requests
    /// up to one tag buffer, a volatile cache with FUA where the target has a cache, and
    /// discard and write-zeroes each only when the target can do it (the kernel takes both
    /// limits from the one discard parameter block).
    public static func parameters(for properties: TargetProperties, maxIOBytes: UInt32) -> DeviceParameters {
        var parameters = DeviceParameters(sectors: properties.size >> 9, maxSectors: maxIOBytes >> 9)
        parameters.logicalBlockShift = UInt8(properties.logicalBlockSize.trailingZeroBitCount)
        parameters.physicalBlockShift = UInt8(properties.physicalBlockSize.trailingZeroBitCount)
        parameters.ioMinimalShift = parameters.logicalBlockShift
        parameters.ioOptimalShift = parameters.physicalBlockShift
        parameters.readOnly = properties.readOnly
        parameters.rotational = properties.rotational
        parameters.volatileCache = properties.volatileCache
        parameters.fua = properties.volatileCache && properties.supportsFUA
        if properties.supportsDiscard || properties.supportsWriteZeroes {
            parameters.discard = .init(granularity: UInt32(properties.discardGranularity),
                                       maxDiscardSectors: properties.supportsDiscard ? UInt32.max >> 9 : 0,
                                       maxWriteZeroesSectors: properties.supportsWriteZeroes ? UInt32.max >> 9 : 0)
        }
        return parameters
    }

    /// Why a target cannot serve a device the kernel already has (recovery keeps the
    /// device's size, block size, queues, request size and what it announced): a backing
    /// that shrank below it, a block size that changed, a read-only backing under a
    /// writable device, fewer queues allowed than it has (`queueLimit`), no FLUSH under an
    /// announced write cache, no FUA under announced FUA (a FUA write would be answered
    /// before it is durable), smaller requests than it sends. Nil if it fits.
    public static func mismatch(_ properties: TargetProperties, queueLimit: Int? = nil, device: DeviceParameters,
                         queues: Int = 1) -> String? {
        let deviceBytes = device.sectors << 9
        if properties.size < deviceBytes { return "it holds \(properties.size) bytes, the device \(deviceBytes)" }
        if properties.logicalBlockSize != device.logicalBlockSize {
            return "its block size is \(properties.logicalBlockSize), the device's \(device.logicalBlockSize)"
        }
        if properties.readOnly && !device.readOnly { return "it is read-only, the device is writable" }
        if let queueLimit, queues > queueLimit {
            return "it serves \(queueLimit) queue at most (an NBD export without CAN_MULTI_CONN), the device has \(queues)"
        }
        // (A read-only device writes nothing to flush or force.)
        if device.volatileCache && !device.readOnly && !properties.volatileCache {
            return "it cannot flush (an NBD export without SEND_FLUSH), the device announces a write cache"
        }
        if device.fua && !device.readOnly && !(properties.volatileCache && properties.supportsFUA) {
            return "it cannot force unit access (an NBD export without SEND_FUA), the device announces FUA"
        }
        let requestBytes = Int(device.maxSectors) << 9
        if properties.maximumTransferBytes < requestBytes {
            return "it takes requests of \(properties.maximumTransferBytes) bytes at most, the device sends \(requestBytes)"
        }
        return nil
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

    static func openControl() throws(ServerError) -> ControlDevice {
        do { return try ControlDevice() } catch { throw .controlDevice(error) }
    }

    /// START_DEV has added the disk; its node comes from devtmpfs/udev. The device counts
    /// as live once the node exists and its first block can be read through the queues.
    /// `keeping`: the id of a device being recovered, which stays if it does not read.
    private func waitUntilReadable(_ path: String, keeping id: UInt32?) throws(ServerError) {
        var lastError = SystemError("open \(path)", errno: ENOENT)
        for _ in 0..<250 {
            do {
                // O_DIRECT: the read must reach the queues, not a page the cache still holds.
                let device = try FileDescriptor(path: path, flags: O_RDONLY | FileDescriptor.directIOFlag)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
                defer { buffer.deallocate() }
                _ = try device.read(into: buffer, at: 0)
                return
            } catch {
                lastError = error
                usleep(20_000)
            }
        }
        throw .notReadable(path, lastError, kept: id)
    }

    /// Has the kernel read the new disk's partition table (BLKRRPART; the queues serve its
    /// reads), so /dev/ublkbNpK exist once the device is reported live. A disk the kernel
    /// cannot scan stays usable whole: said in one line, not a failure.
    private func readPartitionTable(_ path: String) {
        do { try FileDescriptor(path: path, flags: O_RDONLY).rereadPartitions() } catch {
            logger.warning("the partition table of \(path) was not read: \(error)")
        }
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
    private func openCharacterDevice(_ path: String) throws(ServerError) -> FileDescriptor {
        for _ in 0..<100 {
            do { return try FileDescriptor(path: path, flags: O_RDWR) }
            catch where error.errno == ENOENT { usleep(20_000) }
            catch { throw .system(error) }
        }
        throw .characterDeviceMissing(path)
    }
}
