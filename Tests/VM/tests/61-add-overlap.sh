#!/bin/bash
# 61-add-overlap — `ublk add` refuses a second read-write device over bytes a live device
# already serves read-write (as losetup refuses an overlapping read-write loop device):
# one line naming the device, no device left; a hard link is the same file; --read-only,
# a disjoint --offset/--size window and --force are allowed.
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
