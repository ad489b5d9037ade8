#!/bin/bash
# 12-fio-verify — 2 queues, depth 128: fio random read/write with crc32c
# verification through the device passes.
# timeout: 400
. "$(dirname "$0")/../lib.sh"
need_ublk

dir=$(mktempdir)
truncate -s 256M "$dir/disk.img"
dev=$("$UBLK" add --file "$dir/disk.img" --queues 2 --depth 128)
at_exit "$UBLK" del --id "${dev#/dev/ublkb}"
expect_eq "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" 2 "hardware queues"
expect_eq "$(cat /sys/block/${dev#/dev/}/queue/nr_requests)" 128 "queue depth"

fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
	--iodepth=64 --numjobs=2 --size=64M --offset_increment=64M --verify=crc32c --verify_fatal=1 \
	--do_verify=1 --verify_state_save=0 --group_reporting --output-format=terse >"$dir/fio.out" ||
	{ cat "$dir/fio.out"; fail "fio verify failed"; }
echo "ok: fio randrw crc32c verify through $dev (2 queues, depth 128)"
