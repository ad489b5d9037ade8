#!/bin/bash
# 55-stress-add-del — 50 add/del cycles (null and small loop devices, each used
# before it goes) while fio writes and verifies on another ublk device, over and
# over: every fio pass verifies; every cycle's device works and goes away; after
# the cycles no server, node or record is left but the long-running one; and that
# server has the same threads and descriptors as before, and about the same memory.
# (Tag buffers are anonymous memory that becomes resident on first use, so a 512 KiB
# fio pass on both queues first makes all of them resident; the io_uring workers the
# kernel starts and stops in the process on its own, iou-wrk-*, are not counted.)
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
shopt -s nullglob
cycles=${STRESS_CYCLES:-50}

truncate -s 64M "$dir/long.img"
long=$("$UBLK" add --file "$dir/long.img" --queues 2 --depth 64)
long_id=${long#/dev/ublkb}
pid=$("$UBLK" list --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["pid"])')

# Warm up: every tag of both queues busy with a maximal (512 KiB) write, then read.
for rw in write read; do
	fio --name=warm --filename="$long" --ioengine=io_uring --direct=1 --rw=$rw --bs=512k --iodepth=64 --numjobs=2 \
		--cpus_allowed=0-1 --cpus_allowed_policy=split --size=32M --offset_increment=32M --minimal >/dev/null
done

# fio passes (write 24 MiB with crc32c, verify while writing and at the end) one after
# another until told to stop; a failing pass stops the loop and leaves its output.
(
	runs=0
	while [[ ! -e $dir/stop ]]; do
		if ! fio --name=steady --filename="$long" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k-128k \
			--iodepth=32 --size=24M --verify=crc32c --verify_fatal=1 --verify_backlog=64 --verify_state_save=0 \
			--minimal >"$dir/fio.out" 2>&1; then
			cp "$dir/fio.out" "$dir/fio.failed"
			break
		fi
		runs=$((runs + 1))
		echo "$runs" >"$dir/fio.runs"
	done
) &
fio_loop=$!
at_exit touch "$dir/stop"

# usage PID: threads (but the kernel's io_uring workers), open descriptors and resident KiB.
usage() {
	echo "$(cat /proc/"$1"/task/*/comm | grep -vc '^iou-') $(ls "/proc/$1/fd" | wc -l) $(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status")"
}
sleep 3
read -r threads0 fds0 rss0 <<<"$(usage "$pid")"
echo "long-running server $pid before: $threads0 threads, $fds0 fds, $rss0 KiB resident"

truncate -s 8M "$dir/small.img"
head -c 64K /dev/urandom >"$dir/pattern"
started=$SECONDS
for ((i = 1; i <= cycles; i++)); do
	if ((i % 2)); then
		dev=$("$UBLK" add --target null --size 16M --queues 1 --depth 16) || fail "cycle $i: ublk add (null) failed"
		cmp -n 65536 "$dev" /dev/zero || fail "cycle $i: null device $dev does not read zeros"
	else
		dev=$("$UBLK" add --file "$dir/small.img" --queues $((i % 4 == 0 ? 2 : 1)) --depth 32) || fail "cycle $i: ublk add (loop) failed"
		dd if="$dir/pattern" of="$dev" bs=64k seek=$((i % 100)) oflag=direct status=none || fail "cycle $i: write to $dev failed"
		cmp <(dd if="$dev" bs=64k skip=$((i % 100)) count=1 iflag=direct status=none) "$dir/pattern" ||
			fail "cycle $i: $dev read back wrong data"
	fi
	[[ $dev != "$long" ]] || fail "cycle $i: got the long-running device's path $dev"
	"$UBLK" del --id "${dev#/dev/ublkb}" || fail "cycle $i: ublk del of $dev failed"
	[[ ! -e $dev && ! -e /dev/ublkc${dev#/dev/ublkb} ]] || fail "cycle $i: $dev is still there after ublk del"
	[[ ! -e $dir/fio.failed ]] || { cat "$dir/fio.failed"; fail "fio verify on $long failed during cycle $i"; }
done
echo "$cycles add/del cycles in $((SECONDS - started)) s"

read -r threads1 fds1 rss1 <<<"$(usage "$pid")"
echo "long-running server $pid after: $threads1 threads, $fds1 fds, $rss1 KiB resident"
touch "$dir/stop"
timeout 120 tail --pid="$fio_loop" -f /dev/null || fail "the fio loop did not end"
wait "$fio_loop" || true
[[ ! -e $dir/fio.failed ]] || { cat "$dir/fio.failed"; fail "fio verify on $long failed"; }
runs=$(cat "$dir/fio.runs" 2>/dev/null || echo 0)
((runs >= 2)) || fail "only $runs fio passes completed during the cycles"
echo "ok: $runs fio write+verify passes on $long during the cycles, all verified"

expect_eq "$threads1" "$threads0" "threads of the long-running server"
expect_eq "$fds1" "$fds0" "open descriptors of the long-running server"
((rss1 - rss0 < 8192)) || fail "resident memory of the long-running server grew by $((rss1 - rss0)) KiB"
echo "ok: the long-running server kept $threads1 threads and $fds1 descriptors; resident memory $rss0 -> $rss1 KiB"

# Nothing else is left: nodes, kernel devices, records, servers.
nodes=(/dev/ublkb* /dev/ublkc*)
expect_eq "${nodes[*]}" "/dev/ublkb$long_id /dev/ublkc$long_id" "ublk nodes left"
chars=(/sys/class/ublk-char/*)
expect_eq "${#chars[@]}" 1 "devices in /sys/class/ublk-char"
records=(/run/ublk/*.json)
expect_eq "${records[*]}" "/run/ublk/ublkb$long_id.json" "records in /run/ublk"
expect_eq "$(pgrep -x ublk | tr '\n' ' ')" "$pid " "ublk processes"
expect_eq "$("$UBLK" list | tail -n +2 | awk '{ print $1 }')" "$long_id" "devices in ublk list"
echo "ok: after $cycles cycles only $long (pid $pid) is left"
