import Testing
import UblkNBD

@Suite struct NBDReconnectTests {
    @Test func backoffDoublesUpToItsLongestAndStopsAtTheDeadline() {
        let start = ContinuousClock.now
        var backoff = NBDReconnectBackoff(from: start, budget: .seconds(10), first: .milliseconds(100), longest: .seconds(2))
        var now = start
        var waits: [Duration] = []
        while let wait = backoff.delay(at: now) {
            waits.append(wait)
            now += wait
        }
        #expect(waits == [.milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800), .milliseconds(1600),
                          .seconds(2), .seconds(2), .seconds(2), .milliseconds(900)])
        #expect(now == start + .seconds(10))
        #expect(backoff.delay(at: start + .seconds(11)) == nil)
    }

    @Test func defaultsMatchTheReconnectTimeout() {
        let start = ContinuousClock.now
        var backoff = NBDReconnectBackoff(from: start)
        #expect(backoff.deadline == start + .seconds(30) && backoff.longest == .seconds(5))
        #expect(backoff.delay(at: start) == .milliseconds(100))
    }

    static let original = NBDExport(name: "disk", size: 1 << 30,
                                    flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .canMultiConn])

    @Test func theSameExportOrMoreFeaturesMayReplaceIt() {
        #expect(Self.original.replacementProblem(Self.original) == nil)
        var richer = Self.original
        richer.flags.formUnion([.sendWriteZeroes, .rotational, .sendCache])
        #expect(Self.original.replacementProblem(richer) == nil)
        var qemu = Self.original
        qemu.blockSizes = NBDBlockSizes(minimum: 1, preferred: 4096, maximumPayload: 32 << 20)
        #expect(Self.original.replacementProblem(qemu) == nil)
    }

    @Test func aChangedExportIsRefusedInOneLine() {
        var resized = Self.original
        resized.size += 4096
        #expect(Self.original.replacementProblem(resized) == NBDError(.unusable, "export disk now has 1073745920 bytes "
            + "instead of 1073741824: the device cannot change size, remove it and add it again"))
        var poorer = Self.original
        poorer.flags.subtract([.sendTrim, .canMultiConn])
        #expect(Self.original.replacementProblem(poorer) == NBDError(.unusable, "export disk no longer offers "
            + "SEND_TRIM|CAN_MULTI_CONN after reconnecting: remove the device and add it again"))
        var readOnly = Self.original
        readOnly.flags.insert(.readOnly)
        #expect(Self.original.replacementProblem(readOnly)?.message.contains("became read-only") == true)
        var coarser = Self.original
        coarser.blockSizes = NBDBlockSizes(minimum: 4096, preferred: 4096, maximumPayload: 32 << 20)
        #expect(Self.original.replacementProblem(coarser)?.message.contains("changed its block sizes") == true)
        var smallerPayload = Self.original
        smallerPayload.blockSizes = NBDBlockSizes(minimum: 512, preferred: 4096, maximumPayload: 1 << 20)
        #expect(Self.original.replacementProblem(smallerPayload) != nil)
    }

    @Test func theDefaultExportIsNamedSoInMessages() {
        var unnamed = Self.original
        unnamed.name = ""
        var resized = unnamed
        resized.size += 4096
        #expect(unnamed.replacementProblem(resized)?.message.hasPrefix("export \"\" (the default export) now has ") == true)
    }
}
