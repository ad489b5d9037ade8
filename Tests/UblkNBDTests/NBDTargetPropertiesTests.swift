import Testing
import UblkNBD
import UblkTargets

/// What the nbd target announces for an export's flags.
@Suite struct NBDTargetPropertiesTests {
    /// --read-only on a writable export with a cache: no cache announced (the kernel would
    /// send FLUSHes the device refuses), no FUA, no discard, no write-zeroes.
    @Test func aReadOnlyDeviceAnnouncesNoCache() throws {
        let server = try LoopbackServer(flags: 1 | 4 | 8 | 32 | 64) { _, _ in .reply(error: 0) }
        defer { server.stop() }
        var configuration = NBDConfiguration(uri: server.uri)
        configuration.readOnly = true
        let properties = try NBDTarget(configuration).properties
        #expect(properties.readOnly)
        #expect(!properties.volatileCache && !properties.supportsFUA)
        #expect(!properties.supportsDiscard && !properties.supportsWriteZeroes)
        let writable = try NBDTarget(NBDConfiguration(uri: server.uri)).properties
        #expect(writable.volatileCache && writable.supportsFUA && writable.supportsDiscard && writable.supportsWriteZeroes)
    }

    /// SEND_WRITE_ZEROES without SEND_TRIM: write-zeroes still announced.
    @Test func writeZeroesWithoutTrim() throws {
        let server = try LoopbackServer(flags: 1 | 4 | 64) { _, _ in .reply(error: 0) }
        defer { server.stop() }
        let properties = try NBDTarget(NBDConfiguration(uri: server.uri)).properties
        #expect(properties.supportsWriteZeroes && !properties.supportsDiscard)
    }
}
