import Testing
import UblkControl
@testable import UblkServer

/// The ADD_DEV flags each recovery policy asks for, decided by GET_FEATURES alone.
@Suite struct RecoveryPolicyTests {
    static let linux612 = FeatureFlags(rawValue: 0x1ff) // bits 0-8, as 6.12: no FAIL_IO, UPDATE_SIZE, QUIESCE
    static let linux73 = FeatureFlags(rawValue: 0x1fffff)

    @Test func reissueTakesQuiesceWhereTheKernelHasIt() throws {
        #expect(try RecoveryPolicy.reissue.deviceFlags(features: Self.linux612) == [.userRecovery, .userRecoveryReissue])
        #expect(try RecoveryPolicy.reissue.deviceFlags(features: Self.linux73) == [.userRecovery, .userRecoveryReissue, .quiesce])
        #expect(try RecoveryPolicy.reissue.deviceFlags(features: nil) == [.userRecovery, .userRecoveryReissue])
        #expect(try RecoveryPolicy.off.deviceFlags(features: Self.linux73) == [])
    }

    @Test func failIONeedsTheFeature() throws {
        #expect(try RecoveryPolicy.failIO.deviceFlags(features: Self.linux73) == [.userRecovery, .userRecoveryFailIO, .quiesce])
        for features in [Self.linux612, nil] {
            do {
                _ = try RecoveryPolicy.failIO.deviceFlags(features: features)
                Issue.record("fail-io accepted without UBLK_F_USER_RECOVERY_FAIL_IO")
            } catch {
                #expect("\(error)".contains("FAIL_IO"))
            }
        }
    }
}
