import Glibc
import Testing
@testable import UblkNBD
import UblkSystem

@Suite struct NBDAddressTests {
    @Test(arguments: [
        ("nbd://localhost/disk", SocketEndpoint.tcp(host: "localhost", port: 10809), "disk"),
        ("nbd://127.0.0.1:10810/disk", .tcp(host: "127.0.0.1", port: 10810), "disk"),
        ("nbd://127.0.0.1:10810", .tcp(host: "127.0.0.1", port: 10810), ""),
        ("nbd://127.0.0.1/", .tcp(host: "127.0.0.1", port: 10809), ""),
        ("nbd://[::1]:10811/a%20b%2Fc", .tcp(host: "::1", port: 10811), "a b/c"),
        ("nbd://[::1]/x", .tcp(host: "::1", port: 10809), "x"),
        ("NBD://host//abs/path", .tcp(host: "host", port: 10809), "/abs/path"),
        ("nbd+unix:///disk?socket=/run/nbd.sock", .unix(path: "/run/nbd.sock"), "disk"),
        ("nbd+unix:///?socket=/tmp/a%20b.sock", .unix(path: "/tmp/a b.sock"), ""),
        ("nbd://h/%C3%A9t%C3%A9", .tcp(host: "h", port: 10809), "été"),
    ])
    func goodURIs(uri: String, endpoint: SocketEndpoint, name: String) throws {
        let address = try NBDAddress(uri: uri)
        #expect(address.endpoint == endpoint)
        #expect(address.exportName == name)
        #expect(try NBDAddress(uri: address.description) == address, "description parses back")
    }

    @Test(arguments: [
        ("disk.img", "no scheme"),
        ("http://host/disk", "unknown scheme http://"),
        ("nbd:///disk", "no host"),
        ("nbd://::1/disk", "an IPv6 address goes in brackets: nbd://[::1]/EXPORT"),
        ("nbd://2001:db8::1/disk", "an IPv6 address goes in brackets: nbd://[2001:db8::1]/EXPORT"),
        ("nbd://:10809/disk", "no host"),
        ("nbd://host:/disk", "port '' is not a number"),
        ("nbd://host:0/disk", "port '0' is not a number"),
        ("nbd://host:65536/disk", "port '65536'"),
        ("nbd://host:12ab/disk", "port '12ab'"),
        ("nbd://[::1/disk", "unclosed ["),
        ("nbd://[::1]x/disk", "unexpected text after ]"),
        ("nbd://user@host/disk", "user names"),
        ("nbd://host/disk?socket=/x", "nbd:// takes no ?query"),
        ("nbd://host/disk#frag", "fragment"),
        ("nbd://host/bad%zz", "% is not followed by two hex digits"),
        ("nbd://host/bad%4", "% is not followed by two hex digits"),
        ("nbd://host/bad%FF", "not UTF-8"),
        ("nbd+unix:///disk", "needs ?socket=PATH"),
        ("nbd+unix:///disk?socket=", "needs ?socket=PATH"),
        ("nbd+unix:///disk?tls=on", "unknown query parameter 'tls'"),
        ("nbd+unix://host/disk?socket=/s", "takes no host"),
        ("nbd+unix:///disk?socket=/" + String(repeating: "s", count: 107), "socket path is longer than 107 bytes"),
    ])
    func badURIsGetOneLineWithTheGoodForm(uri: String, problem: String) {
        do {
            _ = try NBDAddress(uri: uri)
            Issue.record("\(uri) parsed")
        } catch {
            #expect(error.kind == .badURI)
            #expect(error.message.contains(problem), "\(error.message)")
            #expect(error.message.hasPrefix("bad NBD URI '\(uri)': "))
            #expect(error.message.hasSuffix("expected nbd://HOST[:PORT]/EXPORT, nbd://[IPV6]:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH"))
            #expect(!error.message.contains("\n"))
        }
    }

    @Test func overlongExportNameIsRefused() {
        #expect(throws: Never.self) { try NBDAddress(uri: "nbd+unix:///?socket=/" + String(repeating: "s", count: 106)) }
        let uri = "nbd://h/" + String(repeating: "a", count: NBDAddress.maximumNameLength + 1)
        #expect(throws: NBDError.self) { try NBDAddress(uri: uri) }
        #expect(throws: Never.self) { try NBDAddress(uri: String(uri.dropLast())) }
    }

    @Test(arguments: ["nbds://host/disk", "nbds+unix:///disk?socket=/s", "NBDS://h:1/x"])
    func tlsSchemesAreRefused(uri: String) {
        #expect(throws: NBDError(.tlsNotSupported, "TLS is not supported yet: use nbd://HOST[:PORT]/EXPORT or "
            + "nbd+unix:///EXPORT?socket=PATH instead of \(uri.prefix { $0 != ":" }.lowercased())://")) {
            try NBDAddress(uri: uri)
        }
    }

    @Test func listCommandNamesTheServer() throws {
        #expect(try NBDAddress(uri: "nbd://127.0.0.1:10810/x").listCommand == "nbdinfo --list nbd://127.0.0.1:10810")
        #expect(try NBDAddress(uri: "nbd://[::1]/x").listCommand == "nbdinfo --list nbd://[::1]:10809")
        #expect(try NBDAddress(uri: "nbd+unix:///x?socket=/s").listCommand == "nbdinfo --list 'nbd+unix:///?socket=/s'")
    }
}

@Suite struct NBDConnectFailureTests {
    static let endpoint = SocketEndpoint.tcp(host: "::1", port: 10809)

    func line(_ error: any Error) -> NBDError {
        NBDClient.connectFailure(error, endpoint: Self.endpoint, timeout: .seconds(10))
    }

    @Test func eachFailureIsOneLineWithWhatToCheck() {
        #expect(line(HostLookupError(host: "nas", reason: "Name or service not known"))
            == NBDError(.lookup, "cannot resolve nas: name or service not known: check the host in the URI"))
        #expect(line(SystemError("connect [::1]:10809", errno: ECONNREFUSED))
            == NBDError(.connect, "cannot connect to [::1]:10809: connection refused: is the NBD server running?"))
        #expect(line(SystemError("connect [::1]:10809", errno: ETIMEDOUT))
            == NBDError(.connect, "cannot connect to [::1]:10809: no answer within 10.0 seconds: check the host, the port and any firewall"))
        #expect(line(SystemError("connect [::1]:10809", errno: EHOSTUNREACH))
            == NBDError(.connect, "cannot connect to [::1]:10809: no route to host"))
        #expect(line(SystemError("connect /s", errno: EACCES)).message.hasSuffix(": check the socket's permissions"))
    }

    @Test func transientFailuresAreTheOnesWorthRetrying() {
        #expect(line(SystemError("connect", errno: ECONNREFUSED)).isTransient)
        #expect(!NBDError(.exportNotFound, "x").isTransient && !NBDError(.protocolViolation, "x").isTransient)
    }
}
