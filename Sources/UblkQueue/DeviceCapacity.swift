import Synchronization

/// The device's size as the queues enforce it, changed while they run (`ublk resize`).
///
/// One thread writes it (the server's control thread, around UPDATE_SIZE); every queue
/// thread reads it once per request. An atomic, not a lock: the read is a plain load on
/// the hot path. Release/acquire: a queue that sees a request beyond the old end (the
/// kernel only sends one after UPDATE_SIZE returned) also sees the larger limit stored
/// before UPDATE_SIZE was sent.
public final class DeviceCapacity: Sendable {
    private let storage: Atomic<UInt64>

    public init(sectors: UInt64) { storage = Atomic(sectors) }

    /// Size in 512-byte sectors.
    public var sectors: UInt64 {
        get { storage.load(ordering: .acquiring) }
    }

    public func set(sectors: UInt64) { storage.store(sectors, ordering: .releasing) }
}
