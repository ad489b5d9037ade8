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
