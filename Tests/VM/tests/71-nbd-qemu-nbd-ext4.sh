#!/bin/bash
# 71-nbd-qemu-nbd-ext4 — the nbd target against qemu-nbd (export "disk", no
# CAN_MULTI_CONN), started from a config file with `ublk start`: asking for 2 queues
# gets one, said once; mkfs.ext4, mount, fill, unmount, `ublk del`; the export then
# passes e2fsck and its files have the checksums written.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
need_loopback

dir=$(mktempdir)
truncate -s 128M "$dir/export.img"
qemu-nbd -t -f raw -b 127.0.0.1 -p 10810 -x disk "$dir/export.img" 2>"$dir/qemu-nbd.log" &
server=$!
at_exit kill "$server"
wait_port 10810 10 "$dir/qemu-nbd.log"

mkdir "$dir/conf"
cat >"$dir/conf/nbdtest.conf" <<CONF
# an NBD export served as a device
target = nbd
uri = nbd://127.0.0.1:10810/disk
queues = 2
depth = 32
reconnect-timeout = 20
CONF
dev=$(UBLK_CONFIG_DIR=$dir/conf "$UBLK" start nbdtest 2>"$dir/start.err")
id=${dev#/dev/ublkb}
at_exit "$UBLK" del --id "$id"
expect_eq "$(grep -c 'CAN_MULTI_CONN' "$dir/start.err")" 1 "the one-queue note, said once"
expect_eq "$(ls "/sys/block/ublkb$id/mq" | wc -l)" 1 "hardware queues (qemu-nbd -e 1: no multi-conn)"
expect_eq "$(list_field "$id" name)" nbdtest "config name in ublk list"

ext4_through "$dev" "$id" "$dir/export.img" "$dir"
echo "ok: ext4 on nbd (qemu-nbd, ublk start, 1 queue): e2fsck clean, 6 files match"
