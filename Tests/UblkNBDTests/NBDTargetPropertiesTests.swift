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
    /// A read-only export makes a read-only device, said in a note (not when --read-only
    /// asked for one); with --no-read-only it is refused in one line, as a loop backing that
    /// cannot be written is.
    @Test func aReadOnlyExportIsSaidOrRefused() throws {
        let server = try LoopbackServer(flags: 1 | 2 | 4) { _, _ in .reply(error: 0) }
        defer { server.stop() }
        var configuration = NBDConfiguration(uri: server.uri)
        // (One target at a time: the server serves one connection at a time.)
        #expect(try NBDTarget(configuration).properties.readOnly)
        #expect(try NBDTarget(configuration).note == "the export at \(server.uri) is read-only (the server says so): the device is read-only (give --read-only to ask for that without this line)")
        configuration.readOnly = true
        #expect(try NBDTarget(configuration).note == nil)
        configuration.readOnly = false
        configuration.writableRequired = true
        do {
            _ = try NBDTarget(configuration)
            Issue.record("a read-only export was taken with --no-read-only")
        } catch {
            #expect(error.description.hasPrefix("the export at \(server.uri) is read-only (the server says so), and --no-read-only"))
        }
        let writable = try LoopbackServer(flags: 1 | 4) { _, _ in .reply(error: 0) }
        defer { writable.stop() }
        #expect(try NBDTarget(NBDConfiguration(uri: writable.uri)).note == nil)
    }

    /// As the loop target says of a file that is not whole blocks: an export's tail that is
    /// not a whole block is said to stay unused (the device is a block shorter).
    @Test func anExportsTailThatIsNoWholeBlockIsSaid() throws {
        let server = try LoopbackServer(size: 10000) { _, _ in .reply(error: 0) }
        defer { server.stop() }
        let target = try NBDTarget(NBDConfiguration(uri: server.uri))
        #expect(target.properties.size == 9728)
        #expect(target.note?.hasPrefix("the last 272 bytes of export ") == true)
        #expect(target.note?.hasSuffix(" are not a whole 512-byte block and stay unused") == true)
    }

    @Test func writeZeroesWithoutTrim() throws {
        let server = try LoopbackServer(flags: 1 | 4 | 64) { _, _ in .reply(error: 0) }
        defer { server.stop() }
        let properties = try NBDTarget(NBDConfiguration(uri: server.uri)).properties
        #expect(properties.supportsWriteZeroes && !properties.supportsDiscard)
    }
}
