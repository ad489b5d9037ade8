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

    /// A misspelt option is named, not hidden behind what a command's check makes of the
    /// rest (ArgumentParser runs the checks first), and its suggestion reads as a sentence.
    @Test func aTypoIsReportedBeforeTheChecks() {
        func line(_ arguments: [String]) -> String? {
            do { _ = try Ublk.parseReportingOptionsFirst(arguments); return nil } catch { return Ublk.errorLine(for: error) }
        }
        #expect(line(["add", "--target", "null", "--szie", "1G"])?.hasPrefix("Unknown option '--szie'") == true)
        #expect(line(["del", "--ids", "3"]) == "Unknown option '--ids'. Did you mean '--id'? See `ublk del --help`")
        #expect(line(["add", "--file", "d", "--encyption", "aes-xts-plain64", "--key-file", "k"])?
            .hasPrefix("Unknown option '--encyption'. Did you mean '--encryption'?") == true)
        #expect(line(["upgrade", "--nmae", "data"])?.hasPrefix("Unknown option '--nmae'") == true)
        // Without a typo the check speaks, as before; and the checks are on again afterwards.
        #expect(line(["add", "--target", "null"]) == "the null target needs a size: give --size, e.g. --size 1G: see `ublk add --help`")
        #expect(line(["del", "3"])?.hasPrefix("3 is not a ublk device") == true)
        #expect(Ublk.validating)
    }

    /// `--key HEX` names no option: the line says where a key goes, and never shows it.
    @Test func aKeyOnTheCommandLineIsSentToAFile() {
        for arguments in [["add", "--file", "a", "--key", "00ff"], ["add", "--file", "a", "--key=00ff"], ["recover", "--passphrase", "00ff"]] {
            do {
                try Ublk.refuseRepeatedID(arguments)
                Issue.record("\(arguments) passed")
            } catch {
                let line = Ublk.errorLine(for: error)
                #expect(line.contains("a key never goes on the command line") && line.contains("--key-file"), "\(line)")
                #expect(!line.contains("00ff"))
            }
        }
    }

    @Test func controlCharactersAreShownEscaped() {
        #expect("/dev/\u{1B}[31mRED\n".escapingControlCharacters == "/dev/\\x1b[31mRED\\n")
    }
}
