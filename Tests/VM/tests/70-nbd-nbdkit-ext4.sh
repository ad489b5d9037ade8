#!/bin/bash
# 70-nbd-nbdkit-ext4 — the nbd target against nbdkit (file plugin, CAN_MULTI_CONN) on
# 127.0.0.1 with 2 queues: mkfs.ext4, mount, fill, unmount, `ublk del`; the export
# file then passes e2fsck and the files in it (read with debugfs) have the checksums
# written. `ublk list` shows the target and its URI.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
need_loopback

dir=$(mktempdir)
truncate -s 128M "$dir/export.img"
start_nbdkit "$dir/export.img"

dev=$("$UBLK" add --target nbd --uri nbd://127.0.0.1/disk --queues 2 --depth 32)
id=${dev#/dev/ublkb}
at_exit "$UBLK" del --id "$id"
expect_eq "$(list_field "$id" target)" nbd "target in ublk list"
expect_eq "$(list_field "$id" backing)" nbd://127.0.0.1/disk "backing in ublk list"
expect_eq "$(ls "/sys/block/ublkb$id/mq" | wc -l)" 2 "hardware queues (nbdkit allows multi-conn)"
expect_eq "$(blockdev --getsize64 "$dev")" $((128 << 20)) "device size"

ext4_through "$dev" "$id" "$dir/export.img" "$dir"
echo "ok: ext4 on nbd (nbdkit, 2 queues): e2fsck clean, 6 files match"
