import ArgumentParser
import Testing
@testable import ublk

/// Every error the CLI prints is one line (see OneLineErrors.swift): what went wrong and
/// what to do, never ArgumentParser's multi-line usage block.
@Suite struct OneLineErrorTests {
    /// The line `ublk ARGUMENTS...` prints after "Error: " (nil if they parse).
    func errorLine(_ arguments: [String]) -> String? {
        do { _ = try Ublk.parseAsRoot(arguments); return nil } catch { return Ublk.errorLine(for: error) }
    }

    @Test func optionMistakesAreOneLineWithAPointerToHelp() {
        for arguments in [["add", "--file", "a", "--depth", "0"], ["add", "--file", "a", "--direct-io", "bogus"],
                          ["add", "--size", "12Q", "--file", "a"], ["add", "--block-size", "3000", "--file", "a"],
                          ["bogus"], ["del", "--id", "x"], ["recover"], ["add", "--file"]] {
            let line = errorLine(arguments)
            #expect(line != nil, "\(arguments) parsed")
            #expect(line?.contains("\n") == false, "\(arguments): \(line ?? "")")
            #expect(line?.contains("--help`") == true, "\(arguments): \(line ?? "")")
        }
        #expect(errorLine(["add", "--file", "a", "--depth", "0"]) == "--depth 0 is out of range: give 1 to 4096: see `ublk add --help`")
        #expect(errorLine(["add", "--file", "a", "--direct-io", "bogus"])?.hasSuffix("'on', 'off' or 'auto': see `ublk add --help`") == true)
    }

    @Test func linesAreJoined() {
        #expect(Ublk.oneLine("first\n  second\n\n\tthird\n") == "first second third")
        #expect(Ublk.helpCommand("Usage: x\n  See 'ublk del --help' for more information.") == "ublk del --help")
        #expect(Ublk.helpCommand("no pointer here") == nil)
    }
}
