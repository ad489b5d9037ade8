#!/bin/bash
# 21-discard — blkdiscard punches holes in the backing file (its allocated size
# shrinks, the rest is untouched); blkdiscard -z (write-zeroes) reads back zeros.
# timeout: 200
. "$(dirname "$0")/../lib.sh"
need_ublk

dir=$(mktempdir)
head -c 64M /dev/urandom >"$dir/disk.img"
sync
dev=$("$UBLK" add --file "$dir/disk.img")
at_exit "$UBLK" del --id "${dev#/dev/ublkb}"

allocated() { echo $(($(stat -c %b "$dir/disk.img") * $(stat -c %B "$dir/disk.img"))); }
tail_sha=$(tail -c 32M "$dir/disk.img" | sha256sum)
before=$(allocated)
blkdiscard --offset 0 --length $((16 << 20)) "$dev"
after=$(allocated)
echo "allocated: $before -> $after bytes"
((before - after >= 16 << 20)) || fail "discarding 16 MiB freed only $((before - after)) bytes of the backing file"
cmp -n $((16 << 20)) "$dir/disk.img" /dev/zero || fail "discarded range does not read as zeros"
expect_eq "$(tail -c 32M "$dir/disk.img" | sha256sum)" "$tail_sha" "bytes after the discarded range"

blkdiscard -z --offset $((16 << 20)) --length $((8 << 20)) "$dev"
cmp -n $((8 << 20)) <(dd if="$dev" bs=1M skip=16 count=8 iflag=direct status=none) /dev/zero ||
	fail "write-zeroes range does not read back zeros through the device"
expect_eq "$(tail -c 32M "$dir/disk.img" | sha256sum)" "$tail_sha" "bytes after the zeroed range"
echo "ok: discard punched $((before - after)) bytes; write-zeroes reads back zeros"

# A file on tmpfs punches holes but cannot zero a range in place: its device offers
# discard and no write-zeroes, so `blkdiscard -z` is the kernel's own zero writes, with no
# failed request in the kernel log (each one was, before).
truncate -s 16M /tmp/ublk-21-tmpfs.img
at_exit rm -f /tmp/ublk-21-tmpfs.img
head -c 4M /dev/urandom | dd of=/tmp/ublk-21-tmpfs.img conv=notrunc status=none
dev=$("$UBLK" add --file /tmp/ublk-21-tmpfs.img)
sys=/sys/block/${dev#/dev/}/queue
expect_eq "$(cat "$sys/write_zeroes_max_bytes")" 0 "write-zeroes of a device on tmpfs"
(($(cat "$sys/discard_max_bytes") > 0)) || fail "a device on tmpfs offers no discard"
dmesg -C
blkdiscard -z --offset 0 --length $((4 << 20)) "$dev" || fail "blkdiscard -z on a device on tmpfs"
cmp -n $((4 << 20)) <(dd if="$dev" bs=1M count=4 iflag=direct status=none) /dev/zero || fail "zeroed range on tmpfs does not read zeros"
if dmesg | grep -q "ublkb.*WRITE_ZEROES\|error.*ublkb"; then fail "the kernel logged failed requests: $(dmesg | grep ublkb | head -3)"; fi
"$UBLK" del "$dev"
echo "ok: a device on tmpfs offers discard without write-zeroes; blkdiscard -z zeroes without errors"
