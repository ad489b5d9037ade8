#!/bin/bash
# 26-busy-poll — busy polling (--poll-us N): `ublk list --json` reports the window, a
# depth-1 stream keeps the queue thread spinning (its CPU time shows it), requests a
# window apart or more back the spin off (a trickle costs little CPU), an idle device
# costs none, and `ublk recover` keeps the window. Bad values get one line and no device.
# fio crc32c verify passes with polling at depth 1 and 32.
# timeout: 400
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
truncate -s 64M "$dir/disk.img"

expect_error "--poll-us=-1" 'poll-us.*out of range' -- "$UBLK" add --file "$dir/disk.img" --poll-us=-1
expect_error "--poll-us 2000000" 'poll-us.*out of range' -- "$UBLK" add --file "$dir/disk.img" --poll-us 2000000
expect_error "--poll-us abc" 'poll-us' -- "$UBLK" add --file "$dir/disk.img" --poll-us abc
fail_on_problems "refusing bad --poll-us values"

# Percent of one CPU the process used over the next $2 seconds (utime + stime, in ticks).
cpu_percent() {
	local pid=$1 seconds=$2 before after hz
	hz=$(getconf CLK_TCK)
	before=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
	sleep "$seconds"
	after=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
	echo $(((after - before) * 100 / (hz * seconds)))
}
# Percent of one CPU that process $1 used while a depth-1 fio read stream ran on device $2
# (measured for 3 s after 2 s of warm-up); more fio options after those two.
stream_cpu() {
	local pid=$1 dev=$2 fio_pid percent
	shift 2
	fio --name=stream --filename="$dev" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=1 \
		--time_based --runtime=6 --size=32M "$@" --output-format=terse >"$dir/stream.out" 2>&1 &
	fio_pid=$!
	sleep 2
	percent=$(cpu_percent "$pid" 3)
	wait "$fio_pid" || { cat "$dir/stream.out" >&2; fail "the depth-1 stream $* failed"; }
	echo "$percent"
}

# Adds a device with --poll-us $1 (more add options after it), checks that ublk list --json
# reports the window, and sets dev, id and pid.
add_polled() {
	local window=$1
	shift
	dev=$("$UBLK" add --file "$dir/disk.img" --poll-us "$window" "$@")
	id=${dev#/dev/ublkb}
	pid=$(list_field "$id" pid)
	expect_eq "$(list_field "$id" pollMicroseconds)" "$window" "the window of --poll-us $window in ublk list --json"
}

# A 5 ms window: a depth-1 stream (a request every few hundred µs, even emulated) keeps the
# thread spinning; at 50 requests a second (20 ms apart) every spin would miss, and back-off
# keeps it far below the 25% of a CPU that spinning 5 ms per request would cost.
add_polled 5000
busy=$(stream_cpu "$pid" "$dev")
echo "server CPU under a depth-1 stream with --poll-us 5000: $busy% of a CPU"
((busy >= 70)) || fail "the queue thread used $busy% of a CPU under a depth-1 stream: it does not spin"
trickle=$(stream_cpu "$pid" "$dev" --rate_iops=50)
echo "server CPU under 50 requests a second: $trickle% of a CPU"
((trickle <= 12)) || fail "the queue thread used $trickle% of a CPU at 50 requests a second: spins do not back off"
idle=$(cpu_percent "$pid" 2)
echo "server CPU idle: $idle% of a CPU"
((idle <= 2)) || fail "the idle server used $idle% of a CPU"
echo "ok: polling spins under a depth-1 stream ($busy%), backs off under a trickle ($trickle%), idles at $idle%"

for depth in 1 32; do
	fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=$depth \
		--size=32M --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
		--output-format=terse >"$dir/fio.out" 2>&1 || { cat "$dir/fio.out"; fail "fio verify at depth $depth failed with polling"; }
done
"$UBLK" del --id "$id"
echo "ok: fio crc32c verify at depth 1 and 32 with --poll-us 5000"

# No polling: the same stream leaves the thread sleeping between requests.
add_polled 0
quiet=$(stream_cpu "$pid" "$dev")
echo "server CPU under a depth-1 stream with --poll-us 0: $quiet% of a CPU"
((quiet < busy)) || fail "without polling the thread used $quiet% of a CPU, with it $busy%"
"$UBLK" del --id "$id"

# A recovering server keeps the window the device was added with.
add_polled 300 --recovery
kill -KILL "$pid"
wait_exit "$pid" 10
expect_eq "$(timeout 60 "$UBLK" recover --id "$id")" "$dev" "ublk recover"
expect_eq "$(list_field "$id" pollMicroseconds)" 300 "the window after recovery"
dd if="$dev" of=/dev/null bs=4k count=64 iflag=direct status=none || fail "the recovered device does not read"
"$UBLK" del --id "$id"
fail_on_problems "with busy polling"
echo "ok: ublk recover keeps --poll-us"
