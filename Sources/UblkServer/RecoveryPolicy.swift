import UblkControl

/// What a device does while no server runs (after a crash, or during `ublk upgrade`).
public enum RecoveryPolicy: String, Sendable, CaseIterable {
    /// The device goes with its server (the default, as a loop device goes with its file).
    case off
    /// UBLK_F_USER_RECOVERY + REISSUE: I/O waits for a new server (`ublk recover`), which
    /// reissues what the old one held.
    case reissue
    /// UBLK_F_USER_RECOVERY + FAIL_IO (Linux 6.13+): I/O fails at once while no server
    /// runs; `ublk recover` brings the device back.
    case failIO = "fail-io"

    public var isEnabled: Bool { self != .off }

    /// The ADD_DEV flags for this policy on a kernel reporting `features` (nil: no
    /// GET_FEATURES). QUIESCE comes along wherever the kernel has it: it is what lets
    /// `ublk upgrade` hand the device to a new server without an I/O error.
    public func deviceFlags(features: FeatureFlags?) throws(ServerError) -> FeatureFlags {
        let flags: FeatureFlags = switch self {
        case .off: []
        case .reissue: [.userRecovery, .userRecoveryReissue]
        case .failIO: [.userRecovery, .userRecoveryFailIO]
        }
        if self == .failIO, features?.contains(.userRecoveryFailIO) != true {
            throw .noFailIO
        }
        if let features, !features.isSuperset(of: flags) {
            throw .noUserRecovery(features)
        }
        guard isEnabled, features?.contains(.quiesce) == true else { return flags }
        return flags.union(.quiesce)
    }
}
