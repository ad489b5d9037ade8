#!/bin/bash
# 13-partitions — a partitioned image works as a disk, as `losetup -P` makes it:
#  * the partitions of an image with a GPT exist when `ublk add` returns (on 6.12 the
#    kernel reads the table inside START_DEV; on kernels that scan later, in a work
#    item, the server asks for no automatic scan, UBLK_F_NO_AUTO_PART_SCAN, and reads
#    the table itself before it reports the device live), with the table's sizes;
#  * a file system made on the second partition holds its files, and through the
#    kernel loop driver (`losetup -P`) the same partition reads back identical;
#  * `ublk del` refuses while a partition is mounted, naming the mount point;
#  * partitioning the device afresh (sfdisk, BLKRRPART) shows the new table at once.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
img=$dir/parted.img
truncate -s 96M "$img"
# Two partitions: 32 MiB from 1 MiB, then the rest but the backup GPT.
printf 'label: gpt\nstart=2048, size=65536\nstart=67584, size=124928\n' | sfdisk -q "$img" >/dev/null

log=${UBLK_RUN_DIR:-/run/ublk}/server.log
mkdir -p "$(dirname "$log")" && touch "$log"
log_start=$(($(wc -l <"$log") + 1))
new_log() { tail -n +"$log_start" "$log"; }

for round in 1 2 3; do
	dev=$("$UBLK" add --file "$img")
	[[ -b ${dev}p1 && -b ${dev}p2 ]] || fail "round $round: ${dev}p1 and ${dev}p2 do not exist when ublk add returned ($(ls "$dev"* | tr '\n' ' '))"
	expect_eq "$(blockdev --getsize64 "${dev}p1")" $((65536 * 512)) "size of ${dev}p1"
	expect_eq "$(blockdev --getsize64 "${dev}p2")" $((124928 * 512)) "size of ${dev}p2"
	((round == 3)) || { "$UBLK" del --id "${dev#/dev/ublkb}"; wait_gone "$dev" 5; }
done
echo "ok: in 3 adds, ${dev}p1 and ${dev}p2 existed with the table's sizes when ublk add returned"
if new_log | grep -F "partition table of"; then fail "a server could not have the partition table read"; fi
if has_feature NO_AUTO_PART_SCAN; then
	null=$("$UBLK" add --verbose --target null --size 16M)
	new_log | grep -q "ADD_DEV: device ${null#/dev/ublkb} has flags .*NO_AUTO_PART_SCAN" ||
		fail "the kernel has NO_AUTO_PART_SCAN, the device was added without it: $(new_log | grep ADD_DEV | tail -1)"
	"$UBLK" del --id "${null#/dev/ublkb}"
	echo "ok: the kernel scans later, so the server asked for NO_AUTO_PART_SCAN and read the table itself"
fi

mkfs.ext4 -q -F "${dev}p2"
mkdir "$dir/mnt"
mount "${dev}p2" "$dir/mnt"
head -c 5M /dev/urandom >"$dir/mnt/data"
want=$(sha "$dir/mnt/data")
rc=0
"$UBLK" del --id "${dev#/dev/ublkb}" 2>"$dir/err" || rc=$?
((rc != 0)) || fail "ublk del of $dev with ${dev}p2 mounted exited 0"
grep -qF "mounted on $dir/mnt" "$dir/err" || fail "the refusal does not name the mount point: $(cat "$dir/err")"
echo "ok: del refused while ${dev}p2 is mounted: $(cat "$dir/err")"
umount "$dir/mnt"
"$UBLK" del --id "${dev#/dev/ublkb}"
wait_gone "$dev" 5

loopdev=$(losetup --find --show --partscan --read-only "$img")
at_exit losetup -d "$loopdev"
wait_for_path "${loopdev}p2" 5
mount -o ro "${loopdev}p2" "$dir/mnt"
expect_eq "$(sha "$dir/mnt/data")" "$want" "the file on partition 2 through $loopdev"
umount "$dir/mnt"
echo "ok: the file written on ${dev}p2 reads back identical through ${loopdev}p2"

# A new table written through the device is read back at once (sfdisk asks BLKRRPART).
dev=$("$UBLK" add --file "$img")
printf 'label: dos\nstart=2048, size=20480\nstart=22528, size=20480\nstart=43008, size=20480\n' |
	sfdisk -q "$dev" >/dev/null
[[ -b ${dev}p3 ]] || fail "${dev}p3 does not exist after sfdisk wrote three partitions"
expect_eq "$(blockdev --getsize64 "${dev}p3")" $((20480 * 512)) "size of ${dev}p3"
echo "ok: repartitioned through $dev, ${dev}p3 is there"
