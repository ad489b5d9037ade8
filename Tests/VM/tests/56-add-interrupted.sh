#!/bin/bash
# 56-add-interrupted — Ctrl-C during a background `ublk add` leaves no device behind:
# the server runs in a session of its own, so SIGINT reaches only the waiting CLI; the
# server still brings the device up, finds it cannot report it (the pipe's reader is
# gone: EPIPE, not a SIGPIPE that kills it), and removes the device as `ublk del` would,
# its backing unchanged. The backing is slowed down (dm-delay, every read and write
# 1 s late) so that the interrupt surely comes before the device is live.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
modprobe dm-delay 2>/dev/null || { echo "SKIP: needs the dm-delay module"; exit 77; }

dir=$(mktempdir)
name=ublk-test-slow-$$
img=$dir/backing.img
head -c 32M /dev/urandom >"$img"
before=$(sha "$img")
loopdev=$(loop_device "$img")
dm_device "$name" "0 65536 delay $loopdev 0 1000"
at_exit "$UBLK" del --all --force
log=${UBLK_RUN_DIR:-/run/ublk}/server.log
mark=0
[[ ! -f $log ]] || mark=$(wc -l <"$log")

# The shell starts background commands with SIGINT ignored: give the CLI the default, as
# at a terminal.
env --default-signal=INT "$UBLK" add --file "/dev/mapper/$name" >"$dir/out" 2>"$dir/err" &
cli=$!
# ADD_DEV made /dev/ublkcN; the first read of the backing keeps it from going live for a while.
deadline=$((SECONDS + 20))
until compgen -G '/dev/ublkc*' >/dev/null; do
	((SECONDS < deadline)) || fail "the server made no device within 20 s: $(cat "$dir/err")"
	sleep 0.05
done
kill -INT "$cli"
rc=0
wait "$cli" || rc=$?
expect_eq "$rc" 130 "status of the interrupted ublk add"
[[ ! -s $dir/out ]] || fail "the device was live before the interrupt (the test lost its race): $(cat "$dir/out")"
echo "ok: ublk add interrupted before the device was live ($(compgen -G '/dev/ublk[bc]*' | paste -sd' '))"

# The server goes on, goes live, cannot report, and removes the device.
deadline=$((SECONDS + 60))
while compgen -G '/dev/ublk[bc]*' >/dev/null; do
	((SECONDS < deadline)) || fail "the unreported device is still there after 60 s: $(compgen -G '/dev/ublk[bc]*' | paste -sd' '); $("$UBLK" list)"
	sleep 0.2
done
[[ -z $("$UBLK" list | tail -n +2) ]] || fail "ublk list still shows a device: $("$UBLK" list)"
for _ in $(seq 50); do pgrep -f -- "--file /dev/mapper/$name" >/dev/null || break; sleep 0.1; done
! pgrep -f -- "--file /dev/mapper/$name" >/dev/null || fail "the server still runs: $(pgrep -af -- "--file /dev/mapper/$name")"
tail -n +"$((mark + 1))" "$log" | grep -q "never heard of /dev/ublkb.*: removing it" ||
	fail "the server log does not say why the device went: $(tail -n +"$((mark + 1))" "$log")"
echo "ok: the server removed the device nobody heard of: $(tail -n +"$((mark + 1))" "$log" | grep -o 'the ublk command.*')"

expect_eq "$(sha "$img")" "$before" "the backing after the removed device"
echo "ok: the backing is unchanged"
