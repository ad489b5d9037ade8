#!/bin/bash
# 11-null-list-del — the null target reads zeros; `ublk list` shows every live
# device with id, state, target, backing, size, queues, depth, direct I/O and
# server pid; `ublk del --all` leaves no /dev/ublkb*.
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

"$UBLK" del --all
shopt -s nullglob
left=(/dev/ublkb* /dev/ublkc*)
((${#left[@]} == 0)) || fail "left after del --all: ${left[*]}"
[[ -z $("$UBLK" list | tail -n +2) ]] || fail "ublk list still shows devices"
echo "ok: del --all removed every device"
