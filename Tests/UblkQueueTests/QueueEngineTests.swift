import Glibc
import Logging
import Synchronization
import Testing
import UblkQueue
import UblkSystem
import UblkTargets
import UblkTesting

/// The queue engine itself, driven through the offline command source: what it logs,
/// how it fails a request whose SQE cannot be had, and the user_data layout.
@Suite struct QueueEngineTests {
    /// Collects every line logged.
    final class Lines: Sendable {
        let lines = Mutex<[String]>([])
        var all: [String] { lines.withLock { $0 } }
        func logger() -> Logger {
            Logger(label: "test") { _ in Handler(sink: self) }
        }
        struct Handler: LogHandler {
            let sink: Lines
            var metadata: Logger.Metadata = [:]
            var logLevel: Logger.Level = .trace
            subscript(metadataKey key: String) -> Logger.Metadata.Value? {
                get { metadata[key] }
                set { metadata[key] = newValue }
            }
            func log(event: LogEvent) {
                sink.lines.withLock { $0.append("\(event.message)") }
            }
        }
    }

    /// A refused descriptor is one line about that request, not a second one about the
    /// tag's previous request (the engine once logged the stale descriptor too).
    @Test func aRefusedRequestLogsOneLine() throws {
        let lines = Lines()
        let queue = try OfflineQueue(target: NullTarget(size: 1 << 20), depth: 1, bufferSize: 8192, logger: lines.logger())
        #expect(try queue.perform(IODescriptor(operation: .read, startSector: 8, sectorCount: 8)) == 4096)
        #expect(lines.all.isEmpty)
        #expect(try queue.perform(IODescriptor(operation: .write, startSector: 4096, sectorCount: 8)) == -EIO)
        #expect(lines.all.count == 1)
        #expect(lines.all.first?.contains("refused request: sectors 4096+8 lie beyond") == true)
    }

    /// A request the target fails is logged with its own range.
    @Test func aFailedRequestNamesItsRange() throws {
        let lines = Lines()
        let queue = try OfflineQueue(target: NullTarget(size: 1 << 20), depth: 1, bufferSize: 8192, logger: lines.logger())
        #expect(try queue.perform(IODescriptor(operation: .unsupported(4), startSector: 0, sectorCount: 8)) == -EOPNOTSUPP)
        #expect(lines.all.count == 1)
    }

    @Test func userDataRoundTrips() {
        let value = UserData(.target, tag: 4095, step: 3)
        #expect(value.kind == .target && value.tag == 4095 && value.step == 3)
        #expect(UserData(.command, tag: 7).rawValue == 7)
        #expect(UserData(rawValue: 0xff << 56).kind == nil)
        #expect(UserData(.queue, tag: 0).kind == .queue)
    }

    /// Descriptors made up for offline requests encode back to what the driver writes.
    @Test func descriptorsRoundTripThroughTheRawForm() {
        let descriptor = IODescriptor(operation: .write, flags: .fua, startSector: 1 << 40, sectorCount: 256)
        #expect(IODescriptor(raw: descriptor.raw) == descriptor)
        let odd = IODescriptor(operation: .unsupported(13), startSector: 1, sectorCount: 1)
        #expect(IODescriptor(raw: odd.raw) == odd)
    }
}
