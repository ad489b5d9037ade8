// The loop target's side of the host benchmark: 4k requests through LoopTarget's
// queue handler driven by UblkTesting.OfflineQueue (descriptor validation, the
// handler's start/complete state machine, BackingSubmitter, the ring, and a NOP
// per request standing in for COMMIT_AND_FETCH), kept `depth` in flight exactly as
// UringBaseline.PlainRingLoop keeps its READ/WRITE + NOP pairs.
import Glibc
import UblkQueue
import UblkTargets
import UblkTesting
import UringBaseline

/// `depth` requests in flight through an OfflineQueue over a LoopTarget.
public final class OfflineLoopDriver {
    public let queue: OfflineQueue<LoopTarget>
    public let operation: BenchOperation
    // The driver's own counters are touched only by `run`'s thread, never with
    // overlapping accesses: no dynamic exclusivity checks, which would be counted
    // against the engine (PlainRingLoop's are unchecked the same way).
    @exclusivity(unchecked) private var random: RandomBlocks
    /// Requests that did not move 4096 bytes (should stay 0).
    @exclusivity(unchecked) public private(set) var failures = 0

    public init(file: ScratchFile, depth: Int, operation: BenchOperation) throws {
        var configuration = LoopConfiguration(path: file.path)
        configuration.directIO = file.direct ? .on : .off
        let target = try LoopTarget(configuration)
        queue = try OfflineQueue(target: target, depth: depth)
        self.operation = operation
        random = RandomBlocks(blocks: UInt64(file.size / ScratchFile.blockSize))
        for tag in 0..<depth { queue.buffer(tag: tag).initializeMemory(as: UInt8.self, repeating: 0x5A, count: 4096) }
    }

    @inline(__always)
    private func start(tag: Int) throws {
        let sector = random.next() &* UInt64(ScratchFile.blockSize / 512)
        let descriptor = IODescriptor(operation: operation == .read ? .read : .write,
                                      startSector: sector, sectorCount: UInt32(ScratchFile.blockSize / 512))
        try queue.start(tag: tag, descriptor)
    }

    /// Performs `count` requests, `queue.depth` at a time: each finished tag restarts at
    /// once, submitted by the next loop turn (as PlainRingLoop does).
    public func run(count: Int) throws {
        var issued = 0
        var done = 0
        while issued < min(queue.depth, count) {
            try start(tag: issued)
            issued += 1
        }
        while done < count {
            try queue.reap { tag, result in
                if result != Int32(ScratchFile.blockSize) { failures += 1 }
                done += 1
                if issued < count {
                    try start(tag: tag)
                    issued += 1
                }
            }
        }
    }
}
