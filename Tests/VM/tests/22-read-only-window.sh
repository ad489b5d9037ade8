#!/bin/bash
# 22-read-only-window — a read-only device refuses writes and leaves the backing
# unchanged; an --offset/--size window maps only that part of the file and
# never touches the bytes outside it.
# timeout: 200
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
head -c 32M /dev/urandom >"$dir/disk.img"
sum=$(sha "$dir/disk.img")

dev=$("$UBLK" add --file "$dir/disk.img" --read-only)
expect_eq "$(blockdev --getro "$dev")" 1 "read-only flag"
if dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
	fail "a write to the read-only device succeeded"
fi
cmp -n $((32 << 20)) "$dev" "$dir/disk.img" || fail "the read-only device does not read the file"
"$UBLK" del --id "${dev#/dev/ublkb}"
expect_eq "$(sha "$dir/disk.img")" "$sum" "backing checksum after the read-only device"
echo "ok: read-only device refused the write, backing unchanged"

offset=$((3 << 20)) size=$((8 << 20))
head -c $offset "$dir/disk.img" | sha256sum >"$dir/head"
tail -c +$((offset + size + 1)) "$dir/disk.img" | sha256sum >"$dir/tail"
dev=$("$UBLK" add --file "$dir/disk.img" --offset 3M --size 8M)
expect_eq "$(blockdev --getsize64 "$dev")" "$size" "window size"
expect_eq "$(list_field "${dev#/dev/ublkb}" offset)/$(list_field "${dev#/dev/ublkb}" sizeLimit)" "$offset/$size" \
	"offset/sizeLimit in ublk list --json"
head -c $size /dev/urandom >"$dir/new"
dd if="$dir/new" of="$dev" bs=1M oflag=direct status=none
# A write past the end of the device is refused by the block layer.
if dd if=/dev/zero of="$dev" bs=4k seek=$((size / 4096)) count=1 oflag=direct status=none 2>/dev/null; then
	fail "a write past the window's end succeeded"
fi
"$UBLK" del --id "${dev#/dev/ublkb}"
expect_eq "$(head -c $offset "$dir/disk.img" | sha256sum)" "$(cat "$dir/head")" "bytes before the window"
expect_eq "$(tail -c +$((offset + size + 1)) "$dir/disk.img" | sha256sum)" "$(cat "$dir/tail")" "bytes after the window"
cmp <(tail -c +$((offset + 1)) "$dir/disk.img" | head -c $size) "$dir/new" || fail "window content differs from what was written"
echo "ok: --offset 3M --size 8M wrote only its window"

# A backing that cannot be written (here on a read-only mount), without --read-only: as
# losetup, the device is read-only, and `ublk add` says why in one line; with
# --no-read-only it is refused.
mkdir "$dir/ro"
mount -t tmpfs -o size=64M tmpfs "$dir/ro"  # (unmounted with $dir at exit)
head -c 8M /dev/urandom >"$dir/ro/disk.img"
mount -o remount,ro "$dir/ro"
dev=$("$UBLK" add --file "$dir/ro/disk.img" 2>"$dir/err") || fail "ublk add of a backing on a read-only mount: $(cat "$dir/err")"
expect_eq "$(wc -l <"$dir/err")" 1 "lines ublk add said of a backing on a read-only mount ($(cat "$dir/err"))"
grep -qF "cannot be written (Read-only file system): the device is read-only" "$dir/err" ||
	fail "ublk add of a backing on a read-only mount: $(cat "$dir/err")"
expect_eq "$(blockdev --getro "$dev")" 1 "read-only flag of a device whose backing is on a read-only mount"
expect_eq "$(list_field "${dev#/dev/ublkb}" readOnly)" True "readOnly in ublk list --json"
if dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
	fail "a write to a device whose backing is on a read-only mount succeeded"
fi
cmp "$dev" "$dir/ro/disk.img" || fail "the device does not read its read-only backing"
"$UBLK" del --id "${dev#/dev/ublkb}"
echo "ok: a backing on a read-only mount made a read-only device: $(cat "$dir/err")"
# --no-read-only (read-only = no in a config) asks for a writable device or none.
expect_error "--no-read-only with a backing on a read-only mount" "asks for a writable device" -- \
	"$UBLK" add --file "$dir/ro/disk.img" --no-read-only
fail_on_problems "--no-read-only with a backing on a read-only mount"
echo "ok: --no-read-only with a backing on a read-only mount: $(cat "$EXPECT_DIR/err")"
