#!/bin/bash
# 58-swap-global — swap on a device added with --swap under the whole machine's memory
# pressure (57 has a cgroup's): a program that wants more than memory and swap together
# is killed by the OOM killer, as with a loop device, the server lives, and swapoff
# works. Huge pages, which nothing reclaims, take all but about 768 MiB of the VM's
# memory for the test. Without --swap, Linux 6.12 stalled here for good (a swap-out
# needed a free page for the tag buffer it is copied into); --swap has the server's
# memory faulted in and locked at start: resident (`VmRSS`) before any request.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
[[ -w /proc/sys/vm/nr_hugepages ]] || { echo "SKIP: needs huge pages (/proc/sys/vm/nr_hugepages)"; exit 77; }

dir=$(mktempdir)
# Written whole, as a swap file must be (no holes): a swap-out into a hole has the file
# system allocate under memory pressure, holding the file's lock (a sparse backing stalled
# the queue thread's own time stamp behind it, in one run of the whole suite on 6.12).
dd if=/dev/zero of="$dir/swap.img" bs=1M count=512 conv=fsync status=none
# (Copying, so that the tag buffers are there to be faulted in on every kernel.)
dev=$("$UBLK" add --file "$dir/swap.img" --direct-io on --zero-copy off --swap) || fail "ublk add --swap failed"
at_exit "$UBLK" del --all --force
at_exit bash -c "swapoff $dev 2>/dev/null"
at_exit sh -c "echo 0 >/proc/sys/vm/nr_hugepages"
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
expect_eq "$(list_field "$id" swap)" True "list --json swap of a device added with --swap"
# The tag buffers (queues × depth × 512 KiB, unless zero copy has none) are there already.
# (VmLck would say nothing: it counts mappings locked on fault before their first.)
resident_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
buffers_kb=0
[[ $(list_field "$id" dataPath) == copy ]] && buffers_kb=$(($(list_field "$id" queues) * $(list_field "$id" depth) * 512))
((resident_kb > buffers_kb)) || fail "the server has $resident_kb kB resident, its buffers are $buffers_kb kB"
echo "the server has $resident_kb kB resident at start (buffers: $buffers_kb kB)"
mkswap -q "$dev"
swapon "$dev"

available_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
pages=$(((available_kb - 768 * 1024) / 2048))
((pages > 0)) || { echo "SKIP: needs more than 768 MiB available (has $((available_kb >> 10)) MiB)"; exit 77; }
echo "$pages" >/proc/sys/vm/nr_hugepages
got=$(cat /proc/sys/vm/nr_hugepages)
echo "huge pages: $got of $pages asked for ($((got * 2)) MiB); MemAvailable now $(($(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) >> 10)) MiB"
((got * 2048 >= available_kb - 1024 * 1024)) || { echo "SKIP: could not take enough memory into huge pages"; exit 77; }

start=$SECONDS
rc=0
timeout -k 5 150 python3 -c '
a = [bytearray(b"\x01") * (1 << 20) for i in range(1600)]
print("allocated", len(a), "MiB")' || rc=$?
echo 0 >/proc/sys/vm/nr_hugepages
expect_oom_killed "$rc" "$start" "$pid" "$dev"
echo "ok: 1600 MiB wanted with about 768 MiB free and 512 MiB of ublk swap (--swap): the program was OOM-killed after $((SECONDS - start)) s, the server lived, swapoff worked"
