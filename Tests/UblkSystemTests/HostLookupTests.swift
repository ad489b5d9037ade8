import Glibc
import Synchronization
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

    /// Callers asking for a name whose lookup is still running wait for it instead of
    /// starting another (a DNS outage leaves one thread per name, not one per retry); once
    /// it has ended, the next caller looks the name up anew.
    @Test func aSlowLookupIsSharedUntilItEnds() throws {
        final class Resolver: @unchecked Sendable {
            let calls = Atomic<Int>(0)
            let release = Semaphore()
            func lookUp(_ host: String, _ port: UInt16) throws -> [Syscalls.SocketAddress] {
                calls.add(1, ordering: .relaxed)
                release.wait()
                return [Syscalls.SocketAddress(family: AF_INET, bytes: [1, 2, 3])]
            }
        }
        let resolver = Resolver()
        let lookUp: @Sendable (String, UInt16) throws -> [Syscalls.SocketAddress] = { try resolver.lookUp($0, $1) }
        for _ in 0..<3 {
            #expect(throws: HostLookupError.self) {
                try Syscalls.resolve(host: "shared.lookup.test", port: 7, timeout: .milliseconds(50), lookUp: lookUp)
            }
        }
        #expect(resolver.calls.load(ordering: .relaxed) == 1)
        // A caller waiting when it ends gets its answer.
        let releaser = try OSThread {
            usleep(200_000)
            resolver.release.signal()
        }
        #expect(try Syscalls.resolve(host: "shared.lookup.test", port: 7, timeout: .seconds(5), lookUp: lookUp).first?.bytes == [1, 2, 3])
        releaser.join()
        #expect(resolver.calls.load(ordering: .relaxed) == 1)
        resolver.release.signal()
        _ = try Syscalls.resolve(host: "shared.lookup.test", port: 7, timeout: .seconds(5), lookUp: lookUp)
        #expect(resolver.calls.load(ordering: .relaxed) == 2)
    }
}
