import FoundationEssentials
import Glibc
import Testing
import UblkSystem
import UblkTargets
@testable import UblkServer

/// The device record: the target spec goes through JSON and back unchanged, and errors
/// keep the errno of the call that failed.
@Suite struct RecordTests {
    func roundTrip(_ record: DeviceRecord) throws -> DeviceRecord {
        try JSONDecoder().decode(DeviceRecord.self, from: JSONEncoder().encode(record))
    }

    @Test func loopAndNullRecordsRoundTrip() throws {
        var loop = LoopConfiguration(path: "/srv/disk.img")
        loop.directIO = .on
        loop.readOnly = true
        loop.offset = 1 << 20
        loop.size = 64 << 20
        loop.logicalBlockSize = 4096
        let records = [
            DeviceRecord(id: 3, pid: 42, name: "data", spec: .loop(loop), size: 1 << 30, queues: 2, depth: 64, directIO: "on", recovery: true,
                         pollMicroseconds: 1000),
            DeviceRecord(id: 4, pid: 43, name: nil, spec: .null(NullConfiguration(size: 1 << 30, logicalBlockSize: 512)), size: 1 << 30,
                         queues: 1, depth: 128, directIO: "-", recovery: false),
        ]
        for record in records { #expect(try roundTrip(record) == record) }
        let json = String(decoding: try JSONEncoder().encode(records[0]), as: UTF8.self)
        #expect(json.contains(#""kind":"loop""#))
    }

    /// `--swap` is kept (for `ublk recover`), and absent from other records; a size limit of
    /// 0 in a record (as servers once wrote for `--size 0`) reads as no limit.
    @Test func swapAndAZeroLimitAreReadBack() throws {
        var record = DeviceRecord(id: 6, pid: 45, name: nil, spec: .loop(LoopConfiguration(path: "/srv/s.img")), size: 1 << 20,
                                  queues: 1, depth: 8, directIO: "on", recovery: true)
        #expect(try roundTrip(record).swap == nil)
        record.swap = true
        record.writesLost = true
        #expect(try roundTrip(record).swap == true && roundTrip(record).writesLost == true)
        let json = #"{"path":"/srv/s.img","directIO":"auto","readOnly":false,"offset":0,"size":0}"#
        let decoded = try JSONDecoder().decode(LoopConfiguration.self, from: Data(json.utf8))
        #expect(decoded.size == nil && TargetSpec.loop(decoded).window.sizeLimit == nil)
    }

    @Test func nbdRecordsRoundTrip() throws {
        var nbd = NBDConfiguration(uri: "nbd+unix:///disk?socket=/run/nbd.sock")
        nbd.readOnly = true
        nbd.reconnectTimeout = 7
        let record = DeviceRecord(id: 5, pid: 44, name: nil, spec: .nbd(nbd), size: 1 << 30, queues: 1, depth: 32, directIO: "-",
                                  recovery: true)
        #expect(try roundTrip(record) == record)
        #expect(record.spec.name == "nbd" && record.spec.backing == nbd.uri)
        let json = String(decoding: try JSONEncoder().encode(record), as: UTF8.self)
        #expect(json.contains(#""kind":"nbd""#))
    }

    @Test func anUnknownTargetKindIsRefused() {
        let json = #"{"id":1,"pid":1,"spec":{"kind":"iscsi"},"queues":1,"depth":1,"directIO":"-","recovery":false}"#
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(DeviceRecord.self, from: Data(json.utf8)) }
    }

    /// The spec a loop target reports pins the block size it settled on, so recovery makes the same device.
    @Test func aLoopTargetsSpecPinsItsBlockSize() throws {
        var template = Array("/tmp/ublk-record-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        #expect(ftruncate(fd, 1 << 20) == 0)
        close(fd)
        let target = try TargetSpec.loop(LoopConfiguration(path: path)).makeTarget()
        guard case .loop(let resolved) = target.spec else { Issue.record("not a loop spec"); return }
        #expect(resolved.logicalBlockSize == target.properties.logicalBlockSize)
        #expect(resolved.path == path && target.spec.backing == path && target.spec.name == "loop")
    }

    /// A new server opens the backing by path: the record tells whether the path still names
    /// the file the device was added with (not a file put in its place, nor none).
    @Test func theRecordKnowsItsBackingFile() throws {
        var template = Array("/tmp/ublk-record-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path); unlink(path + ".new") }
        #expect(ftruncate(fd, 1 << 20) == 0)
        close(fd)
        let target = try TargetSpec.loop(LoopConfiguration(path: path)).makeTarget()
        let record = DeviceRecord(id: 7, pid: 1, name: nil, spec: target.spec, size: 1 << 20, queues: 1, depth: 1,
                                  directIO: "off", recovery: true, backingIdentity: target.backingIdentity)
        let again = try roundTrip(record)
        #expect(record.backingIdentity != nil && again == record)
        #expect(record.backingReplaced() == nil)
        // Another file renamed over it: same path, same size, other data.
        let other = open(path + ".new", O_CREAT | O_WRONLY, 0o600)
        #expect(ftruncate(other, 1 << 20) == 0)
        close(other)
        #expect(rename(path + ".new", path) == 0)
        #expect(record.backingReplaced()?.contains("no longer the file device 7 was added with") == true)
        unlink(path)
        #expect(record.backingReplaced()?.contains("is gone") == true)
        // Records without it (older servers, targets without a backing) say nothing.
        var older = record
        older.backingIdentity = nil
        #expect(older.backingReplaced() == nil)
    }

    @Test func errorsKeepTheirErrno() {
        let missing = TargetError.cannotOpen("/nonexistent", SystemError("open /nonexistent", errno: ENOENT))
        #expect(missing.systemError?.errno == ENOENT)
        #expect(missing.description.contains("does not exist"))
        #expect(ServerError.target(missing).errno == ENOENT)
        #expect(ServerError.target(missing).description == missing.description)
        #expect(ServerError.stillServed(3).errno == nil)
        do {
            _ = try TargetSpec.loop(LoopConfiguration(path: "/nonexistent/disk.img")).makeTarget()
            Issue.record("a missing backing was accepted")
        } catch {
            #expect(error.systemError?.errno == ENOENT)
        }
    }
}
