#!/bin/bash
# 63-resize — `ublk resize` (UPDATE_SIZE): an ext4 file system on a device grows online.
# The backing grows with truncate, `ublk resize --id N` gives the device the new size
# (the server's limit and record follow), resize2fs grows the file system; df shows it,
# files written past the old end read back after a cache drop, `e2fsck` is clean after
# the unmount. `--size` beyond the backing is refused. Kernels without UPDATE_SIZE get
# one line and the device keeps its size. A --offset/--size window keeps its size
# limit through a plain resize (losetup -c keeps --sizelimit).
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
img=$dir/grow.img
truncate -s 64M "$img"
dev=$("$UBLK" add --file "$img")
id=${dev#/dev/ublkb}

if ! has_feature UPDATE_SIZE; then
	truncate -s 128M "$img"
	rc=0
	"$UBLK" resize --id "$id" >"$dir/out" 2>"$dir/err" || rc=$?
	((rc != 0)) || fail "ublk resize succeeded on a kernel without UPDATE_SIZE"
	expect_eq "$(wc -l <"$dir/err")" 1 "lines of the refusal ($(cat "$dir/err"))"
	grep -q UPDATE_SIZE "$dir/err" || fail "the refusal does not name UPDATE_SIZE: $(cat "$dir/err")"
	expect_eq "$(blockdev --getsize64 "$dev")" $((64 << 20)) "device size after the refused resize"
	echo "ok: no UPDATE_SIZE here: $(cat "$dir/err")"
	exit 0
fi

mkfs.ext4 -q -F "$dev"
mkdir "$dir/mnt"
mount "$dev" "$dir/mnt"
before=$(df -k --output=size "$dir/mnt" | tail -n1)
head -c 20M /dev/urandom >"$dir/mnt/old"

truncate -s 256M "$img"
expect_eq "$("$UBLK" resize "$dev")" "/dev/ublkb$id: $((256 << 20)) bytes" "what ublk resize /dev/ublkbN printed"
expect_eq "$(blockdev --getsize64 "$dev")" $((256 << 20)) "device size after resize"
expect_eq "$(list_field "$id" size)" $((256 << 20)) "size in ublk list"
grep -q "\"size\":$((256 << 20))" "/run/ublk/ublkb$id.json" || fail "the record does not follow: $(cat "/run/ublk/ublkb$id.json")"
resize2fs "$dev" >"$dir/resize2fs.out" 2>&1 || { cat "$dir/resize2fs.out"; fail "resize2fs failed"; }
after=$(df -k --output=size "$dir/mnt" | tail -n1)
((after > before * 3)) || fail "df size went from $before K to only $after K"
echo "ok: online grow: df $before K -> $after K"

# Fill past the old end, then read it back from the device, not the page cache.
for i in 1 2 3 4 5 6; do head -c 30M /dev/urandom >"$dir/mnt/new$i"; done
sha "$dir/mnt/old" >"$dir/sums"
for i in 1 2 3 4 5 6; do sha "$dir/mnt/new$i" >>"$dir/sums"; done
sync
echo 3 >/proc/sys/vm/drop_caches
{ sha "$dir/mnt/old"; for i in 1 2 3 4 5 6; do sha "$dir/mnt/new$i"; done; } | cmp - "$dir/sums" ||
	fail "files written after the resize read back wrong"
echo "ok: 180 MiB written past the old end read back"

rc=0
"$UBLK" resize --id "$id" --size 1G >"$dir/out" 2>"$dir/err" || rc=$?
((rc != 0)) || fail "ublk resize --size 1G beyond a 256M backing succeeded"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of the refusal ($(cat "$dir/err"))"
expect_eq "$(blockdev --getsize64 "$dev")" $((256 << 20)) "device size after the refused resize"
echo "ok: beyond the backing is refused: $(cat "$dir/err")"

umount "$dir/mnt"
e2fsck -f -n "$dev" >"$dir/fsck.out" 2>&1 || { cat "$dir/fsck.out"; fail "e2fsck found errors after the online grow"; }
echo "ok: e2fsck clean"

# A window (--offset, --size) keeps its size limit, as losetup -c keeps --sizelimit: the
# backing grows, `resize` leaves the device at its limit; `--size` sets a new limit, which
# the next plain `resize` keeps too (and the record says, for a recovering server).
win=$dir/window.img
truncate -s 40M "$win"
wdev=$("$UBLK" add --file "$win" --offset 1M --size 32M)
wid=${wdev#/dev/ublkb}
truncate -s 80M "$win"
expect_eq "$("$UBLK" resize --id "$wid")" "/dev/ublkb$wid: $((32 << 20)) bytes" "plain resize of a 32M window"
expect_eq "$("$UBLK" resize --id "$wid" --size 48M)" "/dev/ublkb$wid: $((48 << 20)) bytes" "resize --size 48M"
truncate -s 100M "$win"
expect_eq "$("$UBLK" resize --id "$wid")" "/dev/ublkb$wid: $((48 << 20)) bytes" "plain resize after --size 48M"
expect_eq "$(blockdev --getsize64 "$wdev")" $((48 << 20)) "size of the window device"
expect_eq "$(list_field "$wid" size)" $((48 << 20)) "size in ublk list --json"
echo "ok: a --size window stays at its limit when the backing grows (32M, then 48M after resize --size)"
"$UBLK" del --id "$wid"

# losetup's way: a limit beyond the file; the file grows; a plain resize grows the device
# up to the limit, no further.
truncate -s 16M "$win"
wdev=$("$UBLK" add --file "$win" --size 64M 2>/dev/null)
wid=${wdev#/dev/ublkb}
expect_eq "$(blockdev --getsize64 "$wdev")" $((16 << 20)) "a 64M limit on a 16M file"
truncate -s 40M "$win"
expect_eq "$("$UBLK" resize --id "$wid")" "/dev/ublkb$wid: $((40 << 20)) bytes" "plain resize after the file grew to 40M"
truncate -s 100M "$win"
expect_eq "$("$UBLK" resize --id "$wid")" "/dev/ublkb$wid: $((64 << 20)) bytes" "plain resize after the file grew past the limit"
expect_eq "$("$UBLK" resize --id "$wid" --size 0)" "/dev/ublkb$wid: $((100 << 20)) bytes" "resize --size 0 (no limit)"
truncate -s 120M "$win"
expect_eq "$("$UBLK" resize --id "$wid")" "/dev/ublkb$wid: $((120 << 20)) bytes" "plain resize after the limit was lifted"
echo "ok: a limit beyond the file: the device grew with the file up to the limit; resize --size 0 lifted it"
