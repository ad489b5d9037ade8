#!/bin/bash
# 11-null-list-del — the null target reads zeros; `ublk list` shows every live
# device with id, state, target, backing, size, queues, depth, direct I/O and
# server pid, or only the devices named or those over a file (losetup -j);
# `ublk del --all` leaves no /dev/ublkb*.
# timeout: 200
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

null=$("$UBLK" add --target null --size 64M --queues 1 --depth 16)
[[ -b $null ]] || fail "null device $null missing"
# Write junk first: the same tag buffers are reused, reads must still be zeros.
head -c 4M /dev/urandom | dd of="$null" bs=1M oflag=direct status=none
cmp -n $((64 << 20)) "$null" /dev/zero || fail "the null target did not read back zeros"
echo "ok: $null reads 64 MiB of zeros"

dir=$(mktempdir)
truncate -s 32M "$dir/a.img"
loopdev=$("$UBLK" add --file "$dir/a.img" --queues 2 --depth 64 --direct-io off)

list=$("$UBLK" list)
echo "$list"
line() { awk -v id="$1" '$1 == id' <<<"$list"; }
n=${null#/dev/ublkb} l=${loopdev#/dev/ublkb}
read -r id state target size queues depth dio data pid backing <<<"$(line "$n")"
expect_eq "$state/$target/$size/$queues/$depth" "live/null/64M/1/16" "list row of $null"
kill -0 "$pid" || fail "server pid $pid of $null is not running"
read -r id state target size queues depth dio data pid backing <<<"$(line "$l")"
expect_eq "$state/$target/$size/$queues/$depth/$dio/$backing" "live/loop/32M/2/64/off/$dir/a.img" "list row of $loopdev"
kill -0 "$pid" || fail "server pid $pid of $loopdev is not running"

json=$("$UBLK" list --json)
python3 - "$json" "$l" "$dir/a.img" <<'PY'
import json, sys
rows = {r["id"]: r for r in json.loads(sys.argv[1])}
r = rows[int(sys.argv[2])]
assert r["backing"] == sys.argv[3] and r["queues"] == 2 and r["depth"] == 64 and r["size"] == 32 << 20, r
assert r["directIO"] == "off" and r["serverAlive"] is True, r
PY
echo "ok: ublk list and list --json show both devices"

# As losetup DEVICE and losetup -j FILE: only the devices named, or those over the file
# (by its inode: a hard link finds it too); a device that does not exist fails in one line.
ids() { "$UBLK" list "$@" | awk 'NR > 1 { print $1 }' | tr '\n' ' '; }
ln "$dir/a.img" "$dir/link.img"
truncate -s 1M "$dir/other.img"
expect_eq "$(ids "$loopdev")" "$l " "ublk list $loopdev"
expect_eq "$(ids --id "$n" "$loopdev")" "$(printf '%s\n' "$n" "$l" | sort -n | tr '\n' ' ')" "ublk list --id $n $loopdev"
expect_eq "$(ids --file "$dir/link.img")" "$l " "ublk list --file (a hard link of the backing)"
expect_eq "$(ids --file "$dir/other.img")" "" "ublk list --file (a file no device serves)"
"$UBLK" list --json --file "$dir/other.img" | python3 -c 'import json, sys; assert json.load(sys.stdin) == []' ||
	fail "ublk list --json --file (a file no device serves) is not []"
set +e
out=$("$UBLK" list --id 999 "$loopdev" 2>&1); rc=$?
set -e
((rc == 1)) || fail "ublk list --id 999 exited $rc"
[[ $(grep -c . <<<"$out") == 3 && $out == *"ublk device 999 does not exist"* ]] || fail "ublk list --id 999: $out"
echo "ok: ublk list DEVICE, --id and --file show only those; a missing one fails in one line"

# As losetup: a renamed backing shows its new name (the kernel's, from the server's open
# file), one whose name was removed "(deleted)" (the device still serves it).
mv "$dir/a.img" "$dir/moved.img"
rm "$dir/link.img"
[[ $("$UBLK" list "$loopdev" | tail -n 1) == *"$dir/moved.img (renamed)" ]] || fail "list of a device whose backing was renamed: $("$UBLK" list "$loopdev")"
expect_eq "$(list_field "$l" backingChanged)/$(list_field "$l" backing)" "renamed/$dir/moved.img" "backingChanged and backing in list --json"
expect_eq "$(ids --file "$dir/moved.img")" "$l " "ublk list --file (the backing under its new name)"
truncate -s 1M "$dir/a.img"  # another file takes the old name
[[ $("$UBLK" list "$loopdev" | tail -n 1) == *"$dir/moved.img (renamed)" ]] || fail "list of a device whose backing was renamed and replaced: $("$UBLK" list "$loopdev")"
rm "$dir/a.img" "$dir/moved.img"
[[ $("$UBLK" list "$loopdev" | tail -n 1) == *"$dir/a.img (deleted)" ]] || fail "list of a device whose backing was removed: $("$UBLK" list "$loopdev")"
expect_eq "$(list_field "$l" backingChanged)" deleted "backingChanged in list --json"
echo "ok: a renamed backing shows its new name, a removed one (deleted); it is found under its new name"

# As losetup -l's RO: a device made read-only since (blockdev --setro) says so.
expect_eq "$(list_field "$l" readOnly)" False "readOnly of a writable device"
blockdev --setro "$loopdev"
expect_eq "$(list_field "$l" readOnly)" True "readOnly after blockdev --setro"
blockdev --setrw "$loopdev"
expect_eq "$(list_field "$l" readOnly)" False "readOnly after blockdev --setrw"
echo "ok: list --json readOnly follows blockdev --setro and --setrw"

# As losetup: --file /dev/stdin serves the file the shell redirected (the background
# server's own standard input is /dev/null).
printf 'redirected' | dd of="$dir/stdin.img" bs=1M seek=1 conv=notrunc status=none
truncate -s 2M "$dir/stdin.img"
sdev=$("$UBLK" add --file /dev/stdin <"$dir/stdin.img")
expect_eq "$(dd if="$sdev" bs=1M skip=1 count=1 status=none | head -c 10)" redirected "data of a device added with --file /dev/stdin"
expect_eq "$(list_field "${sdev#/dev/ublkb}" backing)" "$dir/stdin.img" "backing of a device added with --file /dev/stdin"
echo "ok: --file /dev/stdin serves the redirected file, listed by its name"

"$UBLK" del --all
shopt -s nullglob
left=(/dev/ublkb* /dev/ublkc*)
((${#left[@]} == 0)) || fail "left after del --all: ${left[*]}"
[[ -z $("$UBLK" list | tail -n +2) ]] || fail "ublk list still shows devices"
echo "ok: del --all removed every device"
