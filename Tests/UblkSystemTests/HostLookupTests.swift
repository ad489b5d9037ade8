import Glibc
import Testing
@testable import UblkSystem

/// Name lookups are bounded (a queue thread reconnecting must not wait on a silent name
/// server): the semaphore they wait on times out, and numeric and local names resolve.
@Suite struct HostLookupTests {
    @Test func aSemaphoreWaitEndsAtItsTimeout() throws {
        let semaphore = Semaphore()
        let start = ContinuousClock.now
        #expect(!semaphore.wait(timeout: .milliseconds(200)))
        let waited = start.duration(to: .now)
        #expect(waited >= .milliseconds(190) && waited < .seconds(2), "waited \(waited)")
        let thread = try OSThread {
            usleep(50_000)
            semaphore.signal()
        }
        #expect(semaphore.wait(timeout: .seconds(5)))
        thread.join()
        semaphore.signal()
        #expect(semaphore.wait(timeout: .zero), "a signal given before the wait counts")
    }

    @Test func numericAndLocalNamesResolve() throws {
        let numeric = try Syscalls.resolve(host: "127.0.0.1", port: 10809, timeout: .seconds(2))
        #expect(numeric.first?.family == AF_INET)
        #expect(try Syscalls.resolve(host: "::1", port: 10809, timeout: .seconds(2)).first?.family == AF_INET6)
        #expect(try !Syscalls.resolve(host: "localhost", port: 10809, timeout: .seconds(5)).isEmpty)
        #expect(throws: HostLookupError.self) { try Syscalls.resolve(host: "no-such-host.invalid", port: 1, timeout: .seconds(5)) }
    }
}
