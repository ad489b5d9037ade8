#!/bin/bash
# 52-crash-recovery — a server killed with SIGKILL:
#  * with --recovery the device stays, I/O waits (nothing fails), and
#    `ublk recover --id N` (run as soon as the old server is gone) starts a new
#    server that takes the device over: a fio job writing with crc32c verification
#    across the kill passes, a read that waited through the outage completes, a
#    pattern written before the kill reads back, and this works twice in a row;
#    recovering a device whose server lives is refused and changes nothing; and
#    `ublk del --force` of such a device whose server died fails the waiting I/O and
#    removes it (plain `del` refuses: the waiting read holds it open);
#  * without --recovery nothing hangs: fio's requests fail (EIO), `ublk recover`
#    refuses with a one-line message, and `ublk del` removes the device.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
shopt -s nullglob

# crash ID: SIGKILL the server of device ID; returns once the process is gone.
crash() {
	local pid
	pid=$(list_field "$1" pid)
	kill -0 "$pid" || fail "no live server (pid '$pid') for device $1"
	kill -KILL "$pid"
	wait_exit "$pid" 10
	echo "killed server $pid of /dev/ublkb$1"
}

# --- with --recovery ---------------------------------------------------------------
img=$dir/rec.img
truncate -s 64M "$img"
dev=$("$UBLK" add --file "$img" --recovery --queues 2 --depth 64)
id=${dev#/dev/ublkb}

# A known pattern in the last 8 MiB, written before any crash.
head -c 8M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$dev" bs=1M seek=56 oflag=direct status=none

# fio writes (and verifies while writing and at the end) the first 48 MiB across the
# crash; the rate limit makes sure it is still writing when the server dies.
across=(--name=across --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-256k
	--size=48M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --minimal)
timeout -k 5 240 fio "${across[@]}" --iodepth=32 --rate=4m,4m --do_verify=1 --verify_backlog=64 >"$dir/fio.out" 2>&1 &
fio_pid=$!
sleep 3
kill -0 "$fio_pid" 2>/dev/null || { cat "$dir/fio.out"; fail "fio finished before the crash: make it bigger"; }

old_pid=$(list_field "$id" pid)
crash "$id"
[[ -b $dev ]] || fail "$dev is gone after its --recovery server was killed"
# A read now waits for a server instead of failing.
dd if="$dev" of="$dir/waited" bs=1M skip=56 count=8 iflag=direct status=none &
dd_pid=$!
sleep 3
kill -0 "$dd_pid" 2>/dev/null || { wait "$dd_pid" || true; fail "a read of $dev did not wait for a new server (it ended during the outage)"; }
kill -0 "$fio_pid" 2>/dev/null || { cat "$dir/fio.out"; fail "fio ended while the server was dead: $(cat "$dir/fio.out")"; }
state=$(list_field "$id" state)
[[ $state == quiesced* ]] || fail "state of $dev with a dead --recovery server: '$state', expected quiesced"
echo "ok: $dev stays with its server dead (state $state); I/O waits"

recovered=$(timeout 60 "$UBLK" recover --id "$id" 2>"$dir/err") || fail "ublk recover --id $id failed: $(cat "$dir/err")"
expect_eq "$recovered" "$dev" "what ublk recover printed"
new_pid=$(list_field "$id" pid)
[[ $new_pid != "$old_pid" ]] && kill -0 "$new_pid" || fail "after recover, pid '$new_pid' (old $old_pid) is not a new live server"
expect_eq "$(list_field "$id" state)" live "state after recover"

timeout 60 tail --pid="$dd_pid" -f /dev/null || fail "the read that waited did not finish after recovery"
wait "$dd_pid" || fail "the read that waited through the outage failed"
cmp "$dir/waited" "$dir/pattern" || fail "the read that waited through the outage returned wrong data"
fio_rc=0
wait "$fio_pid" || fio_rc=$?
((fio_rc == 0)) || { cat "$dir/fio.out"; fail "fio across the crash failed (status $fio_rc)"; }
echo "ok: recovered by pid $new_pid; fio verify across the crash passed; the waiting read got the pattern"

# Again: crash the recovered server while idle, recover (the device named by its path, as
# losetup takes one), everything still there.
crash "$id"
expect_eq "$(timeout 60 "$UBLK" recover "$dev")" "$dev" "second ublk recover, of /dev/ublkbN"
cmp <(dd if="$dev" bs=1M skip=56 count=8 iflag=direct status=none) "$dir/pattern" ||
	fail "the pattern written before the first crash reads back wrong after the second recovery"
fio "${across[@]}" --verify_only >"$dir/fio.out" 2>&1 ||
	{ cat "$dir/fio.out"; fail "the data fio wrote across the first crash does not verify after the second"; }
echo "ok: second crash and recovery: the pattern and fio's data are intact"

# Recovering a device whose server lives is refused, in one line, and changes nothing.
live_pid=$(list_field "$id" pid)
rc=0
timeout 30 "$UBLK" recover --id "$id" >"$dir/out" 2>"$dir/err" || rc=$?
((rc != 0 && rc != 124)) || fail "ublk recover of a served device: status $rc"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of the error from ublk recover of a served device ($(cat "$dir/err"))"
grep -q "still served" "$dir/err" || fail "ublk recover of a served device does not say it is served: $(cat "$dir/err")"
expect_eq "$(list_field "$id" pid)/$(list_field "$id" state)" "$live_pid/live" "server and state after the refused recover"
cmp <(dd if="$dev" bs=1M skip=56 count=8 iflag=direct status=none) "$dir/pattern" || fail "the device reads wrong after the refused recover"
echo "ok: ublk recover of a served device refuses: $(cat "$dir/err")"

# Giving up instead: crash once more, and `ublk del` the device while a read waits on it.
crash "$id"
dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none 2>"$dir/err" &
dd_pid=$!
sleep 2
kill -0 "$dd_pid" 2>/dev/null || fail "a read of $dev did not wait for a server after the third crash"
# The waiting read holds the device open: plain del refuses, --force pulls it.
timeout 30 "$UBLK" del --id "$id" 2>/dev/null && fail "ublk del of a device a read holds open succeeded without --force"
timeout 30 "$UBLK" del --id "$id" --force || fail "ublk del --force of a --recovery device with a dead server failed or hung (status $?)"
timeout 30 tail --pid="$dd_pid" -f /dev/null || fail "the waiting read still hangs 30 s after ublk del"
rc=0
wait "$dd_pid" || rc=$?
((rc != 0)) || fail "the read that waited on the deleted device succeeded"
wait_gone "$dev" 10
[[ ! -e /dev/ublkc$id ]] || fail "/dev/ublkc$id left after ublk del"
[[ ! -e /run/ublk/ublkb$id.json ]] || fail "the record of the deleted device is still in /run/ublk"
[[ ! -e /run/ublk/ublkb$id.sock ]] || fail "the killed server's request socket is still in /run/ublk"
[[ -z $("$UBLK" list | tail -n +2) ]] || fail "ublk list still shows devices: $("$UBLK" list)"
cmp <(tail -c 8M "$img") "$dir/pattern" || fail "the backing file lacks the pattern after ublk del"
echo "ok: ublk del of a --recovery device whose server died: the waiting read fails ($(cat "$dir/err")), the device goes, the file holds the data"

# --- without --recovery --------------------------------------------------------------
img=$dir/norec.img
truncate -s 64M "$img"
dev=$("$UBLK" add --file "$img" --queues 2 --depth 64)
id=${dev#/dev/ublkb}
timeout -k 5 120 fio --name=doomed --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k-128k \
	--iodepth=32 --time_based --runtime=100 --minimal >"$dir/fio.out" 2>&1 &
fio_pid=$!
sleep 3
crash "$id"
timeout 30 tail --pid="$fio_pid" -f /dev/null || fail "fio still runs 30 s after the server died: its I/O hangs"
fio_rc=0
wait "$fio_pid" || fio_rc=$?
((fio_rc != 0 && fio_rc != 124 && fio_rc != 137)) || { cat "$dir/fio.out"; fail "fio on a device whose server died: status $fio_rc, expected an I/O error"; }
grep -q 'Input/output error' "$dir/fio.out" || { cat "$dir/fio.out"; fail "fio failed, but not with EIO"; }
echo "fio: $(grep -m1 'error' "$dir/fio.out")"
rc=0
timeout 20 dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none 2>"$dir/err" || rc=$?
((rc != 0 && rc != 124)) || fail "a read after the server died: status $rc, expected a failure"
echo "a read after the server died: $(cat "$dir/err")"
echo "ok: without --recovery, I/O fails once the server is killed (fio status $fio_rc, dd status $rc)"

rc=0
timeout 30 "$UBLK" recover --id "$id" >"$dir/out" 2>"$dir/err" || rc=$?
((rc != 0 && rc != 124)) || fail "ublk recover of a device without --recovery: status $rc"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of the error from ublk recover ($(cat "$dir/err"))"
grep -q -- "--recovery" "$dir/err" || fail "ublk recover does not say the device lacks --recovery: $(cat "$dir/err")"
echo "ok: ublk recover refuses: $(cat "$dir/err")"

timeout 30 "$UBLK" del --id "$id" || fail "ublk del of a device whose server was killed failed (status $?)"
wait_gone "$dev" 10
[[ ! -e /dev/ublkc$id ]] || fail "/dev/ublkc$id left after ublk del"
[[ -z $("$UBLK" list | tail -n +2) ]] || fail "ublk list still shows devices: $("$UBLK" list)"
[[ ! -e /run/ublk/ublkb$id.json ]] || fail "the record of the deleted device is still in /run/ublk"
[[ ! -e /run/ublk/ublkb$id.sock ]] || fail "the killed server's request socket is still in /run/ublk"
echo "ok: ublk del removed the device of the killed server, its record and socket"
