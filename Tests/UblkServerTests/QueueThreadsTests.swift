import Testing
import UblkControl
import UblkQueue
@testable import UblkServer
import UblkTargets

/// How many threads serve each queue, and which tags each one fetches: several threads
/// share a queue only where the device says the kernel lets them (PER_IO_DAEMON, which
/// ADD_DEV grants only without BATCH_IO) and the target asks for them.
@Suite struct QueueThreadsTests {
    /// A null target that asks for `threadsPerQueue` threads per queue.
    final class SharingTarget: Target {
        let name = "sharing"
        let properties = TargetProperties(size: 1 << 20)
        let fixedFiles: [Int32] = []
        let threadsPerQueue: Int
        init(threadsPerQueue: Int) { self.threadsPerQueue = threadsPerQueue }
        func makeQueueHandler(queueID: Int, depth: Int, share: TagShare) throws -> NullQueueHandler {
            try NullTarget(size: 1 << 20).makeQueueHandler(queueID: queueID, depth: depth, share: share)
        }
        func sync() throws {}
    }

    func info(_ flags: FeatureFlags, depth: UInt16 = 128) -> DeviceInfo {
        DeviceInfo(id: 1, queueCount: 2, queueDepth: depth, maxIOBufferBytes: 524_288, flags: flags)
    }

    @Test func theDeviceFlagsDecide() {
        let three = SharingTarget(threadsPerQueue: 3)
        #expect(DeviceServer.threadsPerQueue(info([.perIODaemon]), target: three) == 3)
        #expect(DeviceServer.threadsPerQueue(info([]), target: three) == 1)
        #expect(DeviceServer.threadsPerQueue(info([.perIODaemon, .batchIO]), target: three) == 1)
        // At most one thread per tag: a thread without tags would have nothing to fetch.
        #expect(DeviceServer.threadsPerQueue(info([.perIODaemon], depth: 2), target: three) == 2)
        #expect(DeviceServer.threadsPerQueue(info([.perIODaemon]), target: NullTarget(size: 1 << 20)) == 1)
    }

    /// `--batch-io auto` leaves batching off where the target would share its queues and the
    /// kernel lets it; asked for with `on`, batching wins and the queue has one thread.
    @Test func sharingQueuesTakesPrecedenceOverAutomaticBatching() throws {
        let kernel: FeatureFlags = [.batchIO, .perIODaemon]
        let options = ServerOptions(queues: 1, depth: 64)
        #expect(try DeviceServer.batchFlags(options, target: SharingTarget(threadsPerQueue: 2), features: kernel) == [])
        #expect(try DeviceServer.batchFlags(options, target: SharingTarget(threadsPerQueue: 1), features: kernel) == [.batchIO])
        #expect(try DeviceServer.batchFlags(options, target: SharingTarget(threadsPerQueue: 2), features: [.batchIO])
            == [.batchIO])
        var forced = options
        forced.batchIO = .on
        #expect(try DeviceServer.batchFlags(forced, target: SharingTarget(threadsPerQueue: 2), features: kernel) == [.batchIO])
    }

    /// The shares of a queue's tags are interleaved and together hold every tag once.
    @Test(arguments: [1, 2, 3, 5])
    func sharesPartitionTheTags(count: Int) {
        let depth = 13
        var seen: [Int] = []
        for index in 0..<count {
            let share = TagShare(index: index, count: count)
            let tags = Array(share.tags(depth: depth))
            #expect(tags.count == share.tagCount(depth: depth))
            #expect(tags.allSatisfy { $0 % count == index })
            seen += tags
        }
        #expect(seen.sorted() == Array(0..<depth))
        #expect(TagShare(index: 3, count: 4).tagCount(depth: 2) == 0)
        #expect(Array(TagShare.all.tags(depth: 4)) == [0, 1, 2, 3])
    }

    /// A share's tags take consecutive slots of its per-tag memory, from 0, none beyond
    /// `slotCount`: a thread's buffers cover its own tags and no others'.
    @Test(arguments: [1, 2, 3, 5])
    func aSharesTagsTakeConsecutiveSlots(count: Int) {
        for depth in [1, 13, 128] {
            for index in 0..<count {
                let share = TagShare(index: index, count: count)
                let slots = share.tags(depth: depth).map { share.slot(of: $0) }
                #expect(slots == Array(0..<share.tagCount(depth: depth)))
                #expect(slots.allSatisfy { $0 < share.slotCount(depth: depth) })
                // Every tag of the queue has a slot (a stray one must not run off the end).
                #expect((0..<depth).allSatisfy { share.slot(of: $0) < share.slotCount(depth: depth) })
            }
        }
        #expect(TagShare.all.slotCount(depth: 128) == 128)
        #expect(TagShare(index: 0, count: 5).slotCount(depth: 128) == 26)
    }
}
