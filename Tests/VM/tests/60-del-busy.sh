#!/bin/bash
# 60-del-busy — `ublk del` does not pull a disk out from under its users:
#  * a mounted device: `del` exits non-zero in one line naming the mount point, the
#    device stays and still works; an open one: the line names the pid;
#  * `del --all` removes the idle devices, keeps the busy one and names it; so does
#    `del --id A --id B ... /dev/ublkbC`, which names a missing id too and exits 1;
#  * swap on it (no mount, no process names it) is found and named as well;
#  * `del --force` on a mounted device returns within a few seconds (the file system
#    sees I/O errors), and once it is unmounted the device and its server are gone;
#  * stacked devices go in one del, in any order; a stopped server (SIGSTOP) is said,
#    and `del --force` does not wait on requests a stopped server holds.
# Holds on kernels with TRY_STOP_DEV (SAFE_STOP_DEV) and without (a scan decides).
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
has_feature SAFE_STOP_DEV && echo "kernel has TRY_STOP_DEV" || echo "kernel has no TRY_STOP_DEV: del scans mounts and openers"

# refused ID WHAT: `ublk del --id ID` fails in one line that contains WHAT; the device stays.
refused() {
	local rc=0
	timeout 30 "$UBLK" del --id "$1" >"$dir/out" 2>"$dir/err" || rc=$?
	((rc != 0 && rc != 124)) || fail "ublk del of busy device $1: status $rc (expected a refusal)"
	expect_eq "$(wc -l <"$dir/err")" 1 "lines of the refusal ($(cat "$dir/err"))"
	grep -qF -- "$2" "$dir/err" || fail "the refusal does not name '$2': $(cat "$dir/err")"
	[[ -b /dev/ublkb$1 ]] || fail "/dev/ublkb$1 is gone after a refused del"
	expect_eq "$(list_field "$1" state)" live "state of device $1 after a refused del"
	echo "ok: refused: $(cat "$dir/err")"
}

img=$dir/a.img
truncate -s 128M "$img"
dev=$("$UBLK" add --file "$img")
id=${dev#/dev/ublkb}
mkfs.ext4 -q -F "$dev"
mkdir "$dir/mnt"
mount "$dev" "$dir/mnt"
head -c 4M /dev/urandom >"$dir/mnt/before"
refused "$id" "mounted on $dir/mnt"
sync
cmp <(head -c 4M "$dir/mnt/before") "$dir/mnt/before" || fail "the file system misreads after the refused del"

# del --all: the idle device goes, the mounted one stays and is named.
idle=$("$UBLK" add --target null --size 16M)
rc=0
"$UBLK" del --all >"$dir/out" 2>"$dir/err" || rc=$?
((rc != 0)) || fail "ublk del --all with a mounted device exited 0"
grep -qF "device $id is in use" "$dir/err" || fail "del --all does not name the busy device: $(cat "$dir/err")"
[[ ! -e $idle ]] || fail "del --all kept the idle $idle"
[[ -b $dev ]] || fail "del --all removed the mounted $dev"
echo "ok: del --all removed $idle and kept $dev: $(cat "$dir/err")"

# Several ids (losetup -d /dev/loop1 /dev/loop2): each in turn; the mounted one and one
# that does not exist are named in a line each, the idle ones still go, status 1.
first=$("$UBLK" add --target null --size 16M)
second=$("$UBLK" add --target null --size 16M)
rc=0
"$UBLK" del --id "${first#/dev/ublkb}" --id "$id" --id 99 "$second" >"$dir/out" 2>"$dir/err" || rc=$?
expect_eq "$rc" 1 "status of del with a busy and a missing id among four"
expect_eq "$(wc -l <"$dir/err")" 2 "lines of del with a busy and a missing id ($(cat "$dir/err"))"
grep -qF "device $id is in use" "$dir/err" || fail "del of several ids does not name the busy device: $(cat "$dir/err")"
grep -qF "device 99 does not exist" "$dir/err" || fail "del of several ids does not name the missing device: $(cat "$dir/err")"
[[ ! -e $first && ! -e $second ]] || fail "del of several ids kept an idle device ($first, $second)"
[[ -b $dev ]] || fail "del of several ids removed the mounted $dev"
echo "ok: del --id ${first#/dev/ublkb} --id $id --id 99 $second removed the idle two: $(paste -sd'|' "$dir/err")"

# Open (not mounted): the holder's pid is named.
umount "$dir/mnt"
sleep 600 <"$dev" &
holder=$!
sleep 0.5
refused "$id" "open by pid $holder"
kill "$holder"
wait "$holder" 2>/dev/null || true

# Swap on it: no mount or process names it; /proc/swaps does, on every kernel (with
# TRY_STOP_DEV the refusal had said only "open").
if mkswap -q "$dev" >/dev/null 2>&1 && swapon "$dev" 2>/dev/null; then
	refused "$id" "swap: swapoff $dev"
	swapoff "$dev"
	mkfs.ext4 -q -F "$dev"  # (mkswap wrote over it)
else
	echo "note: no swap in this guest, the claimed-device case is not run"
fi

# --force on a mounted device: returns at once; the device goes once unmounted.
mount "$dev" "$dir/mnt"
pid=$(list_field "$id" pid)
started=$SECONDS
timeout 20 "$UBLK" del --id "$id" --force || fail "ublk del --force of a mounted device failed or hung (status $?)"
took=$((SECONDS - started))
((took <= 5)) || fail "ublk del --force took $took s"
echo "ok: del --force of a mounted device returned in $took s"
wait_gone "$dev" 10
rc=0
dd if=/dev/urandom of="$dir/mnt/after" bs=1M count=4 conv=fsync status=none 2>"$dir/err" || rc=$?
((rc != 0)) || fail "writing to the file system of a pulled device succeeded"
echo "ok: the file system sees errors: $(head -n1 "$dir/err")"
umount "$dir/mnt" || umount -l "$dir/mnt"
wait_gone "/dev/ublkc$id" 10
wait_exit "$pid" 10
[[ -z $("$UBLK" list | tail -n +2) ]] || fail "ublk list still shows devices: $("$UBLK" list)"
[[ ! -e /run/ublk/ublkb$id.json ]] || fail "the record of the pulled device is still in /run/ublk"
echo "ok: after the unmount the device and its server (pid $pid) are gone"

# Stacked: a device whose backing is another ublk device (its server holds the lower one
# open). Removed in any order: a lower one named first is in use until the upper one has
# gone, and del tries it again then.
lower=$("$UBLK" add --file "$img")
upper=$("$UBLK" add --file "$lower")
top=$("$UBLK" add --file "$upper")
rc=0
"$UBLK" del "$lower" 2>"$dir/err" || rc=$?
expect_eq "$rc" 1 "status of del of a device another is stacked on"
grep -qF "$upper is stacked on it" "$dir/err" || fail "del of a device another is stacked on does not name that one: $(cat "$dir/err")"
timeout 60 "$UBLK" del "$lower" "$top" "$upper" 2>"$dir/err" || fail "ublk del of three stacked devices, lowest first: status $? ($(cat "$dir/err"))"
for d in "$lower" "$upper" "$top"; do [[ ! -e $d ]] || fail "del of stacked devices kept $d"; done
lower=$("$UBLK" add --file "$img")
upper=$("$UBLK" add --file "$lower")
timeout 60 "$UBLK" del --all 2>"$dir/err" || fail "ublk del --all of two stacked devices: status $? ($(cat "$dir/err"))"
[[ ! -e $lower && ! -e $upper ]] || fail "del --all of stacked devices kept one ($lower, $upper)"
echo "ok: stacked devices are removed by one del, whatever the order"

# A server stopped by a signal never closes /dev/ublkcN, and DEL_DEV would wait with it:
# del removes the disk, says so and how to free the id, and returns.
dev=$("$UBLK" add --file "$img")
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
kill -STOP "$pid"
rc=0
started=$SECONDS
timeout 60 "$UBLK" del --id "$id" 2>"$dir/err" || rc=$?
took=$((SECONDS - started))
kill -CONT "$pid"
expect_eq "$rc" 1 "status of del of a device whose server is stopped ($(cat "$dir/err"))"
((took <= 10)) || fail "del of a device whose server is stopped took $took s"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of del with a stopped server ($(cat "$dir/err"))"
grep -qF "kill -CONT $pid" "$dir/err" || fail "del with a stopped server does not say what to do: $(cat "$dir/err")"
[[ ! -e $dev ]] || fail "del with a stopped server kept $dev"
wait_exit "$pid" 20
wait_gone "/dev/ublkc$id" 10
dev=$("$UBLK" add --file "$img" --id "$id")
"$UBLK" del "$dev"
echo "ok: del with a stopped server returned in $took s: $(cat "$dir/err"); continued, it ended and id $id was free"

# --force with a request in the stopped server's hands: STOP_DEV would wait for it as long
# as the server stays stopped, so del says so instead; continued, the request completes.
dev=$("$UBLK" add --file "$img")
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
kill -STOP "$pid"
dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none &
reader=$!
for _ in $(seq 50); do
	read -r reads writes <"/sys/block/ublkb$id/inflight"
	((reads + writes > 0)) && break
	sleep 0.2
done
((reads + writes > 0)) || fail "the read did not reach the stopped server's device"
rc=0
timeout 30 "$UBLK" del --id "$id" --force 2>"$dir/err" || rc=$?
kill -CONT "$pid"
expect_eq "$rc" 1 "status of del --force with a request held by a stopped server ($(cat "$dir/err"))"
grep -qF "is in use and its server (pid $pid) is stopped" "$dir/err" || fail "del --force with a stopped server: $(cat "$dir/err")"
wait "$reader" || fail "the read held by the stopped server failed after it was continued"
[[ -b $dev ]] || fail "the refused del --force removed $dev"
"$UBLK" del "$dev"
echo "ok: del --force with a request held by a stopped server: $(cat "$dir/err")"

# A server that died (no --recovery) under a mounted file system: the disk is gone, and its
# id stays taken until the unmount. del says so at once (or, where its scan still finds the
# mount, refuses in one line); it never waits for the unmount.
dev=$("$UBLK" add --file "$img")
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
mkfs.ext4 -q -F "$dev"
mount "$dev" "$dir/mnt"
kill -9 "$pid"
wait_exit "$pid" 10
rc=0
started=$SECONDS
timeout 60 "$UBLK" del --id "$id" 2>"$dir/err" || rc=$?
took=$((SECONDS - started))
expect_eq "$rc" 1 "status of del of a dead server's mounted device ($(cat "$dir/err"))"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of del of a dead server's mounted device ($(cat "$dir/err"))"
grep -qE "stays taken until the last user of /dev/ublkb$id|in use" "$dir/err" || fail "del of a dead server's mounted device: $(cat "$dir/err")"
((took <= 10)) || fail "del of a dead server's mounted device took $took s"
# Removed, its id held by the mount: `ublk list --id` says so (it had printed nothing).
if grep -qF "stays taken" "$dir/err"; then
	rc=0
	"$UBLK" list --id "$id" >"$dir/out" 2>"$dir/err2" || rc=$?
	expect_eq "$rc" 1 "status of list --id of a removed device whose id is held ($(cat "$dir/err2"))"
	grep -qF "ublk device $id is removed, but id $id stays taken" "$dir/err2" || fail "list --id of a removed device whose id is held: $(cat "$dir/err2")"
	echo "ok: list --id of a removed device whose id is held: $(cat "$dir/err2")"
fi
umount "$dir/mnt" || umount -l "$dir/mnt"
timeout 30 "$UBLK" del --id "$id" 2>/dev/null || true  # (where the scan refused it)
wait_gone "/sys/class/ublk-char/ublkc$id" 10
dev=$("$UBLK" add --file "$img" --id "$id")
"$UBLK" del "$dev"
echo "ok: del of a dead server's mounted device returned in $took s: $(cat "$dir/err"); after the unmount id $id was free"
