#!/bin/bash
# 61-add-overlap — `ublk add` refuses a second read-write device over bytes a live device
# already serves read-write (as losetup refuses an overlapping read-write loop device):
# one line naming the device, no device left; a hard link is the same file; --read-only,
# a disjoint --offset/--size window and --force are allowed. Two adds of one file at once
# give one device.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
img=$dir/shared.img
truncate -s 64M "$img"
ln "$img" "$dir/link.img"
first=$("$UBLK" add --file "$img" --size 32M)
id=${first#/dev/ublkb}

# refused ARGS...: `ublk add ARGS` fails in one line naming device $id; no device is added.
refused() {
	local rc=0 before
	before=$(ls /sys/class/ublk-char | wc -l)
	timeout 60 "$UBLK" add "$@" >"$dir/out" 2>"$dir/err" || rc=$?
	((rc != 0 && rc != 124)) || fail "ublk add $* over a served range: status $rc (expected a refusal)"
	expect_eq "$(wc -l <"$dir/err")" 1 "lines of the refusal ($(cat "$dir/err"))"
	grep -qF "ublk device $id already serves" "$dir/err" || fail "the refusal does not name device $id: $(cat "$dir/err")"
	expect_eq "$(ls /sys/class/ublk-char | wc -l)" "$before" "ublk devices after the refused add"
	echo "ok: refused: $(cat "$dir/err")"
}
refused --file "$img"
refused --file "$dir/link.img" --offset 16M
refused --file "$img" --offset 31M --size 1M --recovery

ro=$("$UBLK" add --file "$img" --read-only)
second=$("$UBLK" add --file "$img" --offset 32M)
expect_eq "$(blockdev --getsize64 "$second")" $((32 << 20)) "size of the disjoint window"
forced=$("$UBLK" add --file "$img" --force)
for dev in "$ro" "$second" "$forced"; do [[ -b $dev ]] || fail "$dev was not added"; done
echo "ok: --read-only ($ro), a disjoint window ($second) and --force ($forced) are served"

# Two adds of one file at once: one device, the other add refused (each used to pass the
# check before the other had a record, and both served the file read-write).
"$UBLK" del --all --force >/dev/null 2>&1
race=$dir/race.img
truncate -s 64M "$race"
for round in 1 2 3; do
	"$UBLK" add --file "$race" >"$dir/race1.out" 2>"$dir/race1.err" & p1=$!
	"$UBLK" add --file "$race" >"$dir/race2.out" 2>"$dir/race2.err" & p2=$!
	rc1=0 rc2=0
	wait "$p1" || rc1=$?
	wait "$p2" || rc2=$?
	expect_eq "$(ls /sys/class/ublk-char | wc -l)" 1 "devices after two adds of one file at once (round $round: $(cat "$dir"/race?.err))"
	((rc1 + rc2 > 0 && rc1 * rc2 == 0)) || fail "round $round: statuses $rc1 and $rc2 (expected one success)"
	grep -qF "already serves" "$dir/race1.err" "$dir/race2.err" || fail "round $round: the refusal does not say why: $(cat "$dir"/race?.err)"
	"$UBLK" del --all
done
# Each add's lock file goes when its device is live (or the add gives up). (Other tests'
# upgrades leave a lock file per device id, upgrade-ublkbN: not the adds'.)
expect_eq "$(ls -A /run/ublk/locks | grep -v '^upgrade-ublkb' || true)" "" "lock files left under /run/ublk/locks"
echo "ok: two adds of one file at once give one device, three times, and leave no lock file"

# Another file put at the served backing's path (the first deleted, or renamed over): it is
# not the file the device serves, so it may have a read-write device of its own, as losetup
# allows. (The check compared the path's file now with the new device's, which is the same.)
held=$("$UBLK" add --file "$img")
truncate -s 64M "$dir/other.img"
mv "$dir/other.img" "$img"
second=$("$UBLK" add --file "$img" 2>"$dir/err") || fail "ublk add of a new file at a served backing's path: $(cat "$dir/err")"
"$UBLK" del "$second" "$held"
echo "ok: a new file at a served backing's path gets a read-write device of its own"
