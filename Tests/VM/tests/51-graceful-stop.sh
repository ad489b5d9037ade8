#!/bin/bash
# 51-graceful-stop — a signal stops a server cleanly and loses nothing:
#  * SIGTERM, SIGINT and SIGHUP to `ublk add --foreground`: exit status 0, the
#    device nodes and the record under /run/ublk are gone, and what was written
#    before the signal (buffered, never synced by the writer: the kernel flushes it
#    while the device goes away) is in the backing file;
#  * SIGTERM to a background server (pid from `ublk list --json`): the same, and
#    its log says why it stopped and nothing failed; with --recovery too (a signal
#    is a stop, not a crash: the device goes);
#  * `ublk del` while fio hammers the device refuses (it is open); `del --force`
#    returns, fio ends (with errors or not) instead of hanging, and no server process is left;
#  * SIGTERM to the server of a mounted device: it ends at once, the device goes with the unmount.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
shopt -s nullglob

# written_then_stopped DEV IMG PATTERN: the device is gone, and so is everything of
# it, and the pattern written through it is at the start of the backing file.
check_stopped() {
	local dev=$1 img=$2 pattern=$3 id=${1#/dev/ublkb}
	wait_gone "$dev" 10
	[[ ! -e /dev/ublkc$id ]] || fail "/dev/ublkc$id still exists after the server exited"
	[[ ! -e /run/ublk/ublkb$id.json ]] || fail "/run/ublk/ublkb$id.json still exists after the server exited"
	[[ -z $("$UBLK" list | tail -n +2) ]] || fail "ublk list still shows a device: $("$UBLK" list)"
	expect_eq "$(head -c "$(stat -c %s "$pattern")" "$img" | sha256sum)" "$(sha256sum <"$pattern")" \
		"the data written through $dev before the signal, read from the backing file"
}

head -c 8M /dev/urandom >"$dir/pattern"

for sig in TERM INT HUP; do
	img=$dir/fg-$sig.img
	truncate -s 32M "$img"
	rm -f "$dir/out" "$dir/err" # (a new file each time: the old one must not look like the answer)
	"$UBLK" add --file "$img" --queues 2 --foreground >"$dir/out" 2>"$dir/err" &
	pid=$!
	_wait_until 20 -s "$dir/out" || fail "ublk add --foreground printed no device within 20 s: $(cat "$dir/err" 2>/dev/null)"
	dev=$(head -n 1 "$dir/out")
	[[ -b $dev ]] || fail "ublk add --foreground printed '$dev', not a block device"
	# Buffered: the data sits dirty in the device's page cache when the signal comes.
	dd if="$dir/pattern" of="$dev" bs=1M status=none
	kill -"$sig" "$pid"
	rc=0
	timeout 30 tail --pid="$pid" -f /dev/null || fail "the server did not exit within 30 s of SIG$sig"
	wait "$pid" || rc=$?
	expect_eq "$rc" 0 "exit status of the server after SIG$sig (stderr: $(cat "$dir/err"))"
	check_stopped "$dev" "$img" "$dir/pattern"
	grep -q "signal" "$dir/err" || fail "the server did not log the signal it stopped on: $(cat "$dir/err")"
	if grep -Eiq 'error|fail|fatal' "$dir/err"; then fail "the server logged an error on SIG$sig: $(cat "$dir/err")"; fi
	echo "ok: SIG$sig: the foreground server exited 0, $dev is gone, the unsynced 8 MiB are in the file"
done

# A background server, found by `ublk list --json`.
img=$dir/bg.img
truncate -s 32M "$img"
log=/run/ublk/server.log
lines_before=$(if [[ -f $log ]]; then wc -l <"$log"; else echo 0; fi)
dev=$("$UBLK" add --file "$img")
pid=$(list_field "${dev#/dev/ublkb}" pid)
kill -0 "$pid" || fail "ublk list shows pid $pid for $dev, which does not run"
dd if="$dir/pattern" of="$dev" bs=1M status=none
kill -TERM "$pid"
wait_exit "$pid" 30
check_stopped "$dev" "$img" "$dir/pattern"
new_log=$(tail -n +$((lines_before + 1)) "$log")
grep -q "signal 15" <<<"$new_log" || fail "the server log does not say it stopped on SIGTERM: $new_log"
if grep -Eiq 'error|fail|fatal' <<<"$new_log"; then fail "the server logged an error: $new_log"; fi
echo "ok: SIGTERM to the background server (pid $pid from ublk list --json): clean exit, data in the file"

# A --recovery server stopped by a signal is a clean stop too: the device goes, it does not wait for a recover.
img=$dir/rec.img
truncate -s 32M "$img"
dev=$("$UBLK" add --file "$img" --recovery)
pid=$(list_field "${dev#/dev/ublkb}" pid)
dd if="$dir/pattern" of="$dev" bs=1M status=none
kill -TERM "$pid"
wait_exit "$pid" 30
check_stopped "$dev" "$img" "$dir/pattern"
echo "ok: SIGTERM to a --recovery server removes its device (no recovery pending), data in the file"

# `ublk del` while fio is busy on the device.
img=$dir/busy.img
truncate -s 64M "$img"
dev=$("$UBLK" add --file "$img" --queues 2 --depth 64)
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
timeout -k 5 90 fio --name=busy --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k-256k \
	--iodepth=32 --numjobs=2 --time_based --runtime=80 --minimal >"$dir/fio.out" 2>&1 &
fio_pid=$!
sleep 5
kill -0 "$fio_pid" 2>/dev/null || { cat "$dir/fio.out"; fail "fio ended before the device was deleted"; }
# Plain `del` refuses a device fio has open; --force removes it as a pulled disk.
rc=0
timeout 30 "$UBLK" del --id "$id" 2>"$dir/err" || rc=$?
((rc != 0 && rc != 124)) || fail "ublk del --id $id of a device fio has open: status $rc, expected a refusal"
grep -q "in use" "$dir/err" || fail "ublk del of an open device does not say it is in use: $(cat "$dir/err")"
started=$SECONDS
timeout 30 "$UBLK" del --id "$id" --force || fail "ublk del --force --id $id under load failed or hung (status $?)"
echo "ublk del --force took $((SECONDS - started)) s under load"
fio_rc=0
timeout 30 tail --pid="$fio_pid" -f /dev/null || fail "fio still runs 30 s after its device was deleted"
wait "$fio_pid" || fio_rc=$?
((fio_rc != 124 && fio_rc != 137)) || fail "fio was killed by its timeout: it hung on the deleted device"
echo "fio ended with status $fio_rc after the device went away"
wait_exit "$pid" 10
[[ ! -e $dev && ! -e /dev/ublkc$id ]] || fail "device nodes of $id left after ublk del"
left=$(pgrep -x ublk || true)
[[ -z $left ]] || fail "ublk processes left: $(ps -o pid,args -p "${left//$'\n'/,}")"
echo "ok: ublk del --force under fio load returned; fio ended (status $fio_rc); no server left"

# SIGTERM to a server whose device is mounted: it ends at once (the file system sees I/O
# errors, as under del --force); it used to wait in DEL_DEV until the unmount.
img=$dir/mounted.img
truncate -s 64M "$img"
dev=$("$UBLK" add --file "$img")
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
mkfs.ext4 -q -F "$dev"
mkdir -p "$dir/mnt"
mount "$dev" "$dir/mnt"
kill -TERM "$pid"
wait_exit "$pid" 15
umount "$dir/mnt" 2>/dev/null || umount -l "$dir/mnt"
wait_gone "$dev" 10
[[ ! -e /dev/ublkc$id ]] || fail "/dev/ublkc$id left after the unmount"
_wait_until 10 ! -e "/sys/class/ublk-char/ublkc$id" || fail "device $id still exists 10 s after the unmount"
echo "ok: SIGTERM to the server of a mounted device: it ended at once; the device went with the unmount"
