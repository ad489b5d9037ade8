#!/bin/bash
# 20-tuning-sysfs — what `ublk add` is told shows up in the block layer:
# logical/physical block size, size, nr_requests (depth), hardware queues,
# discard limits, write cache and FUA, read-only — for several combinations; more queues
# than CPUs gets the kernel's one per CPU and a line that says so.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
truncate -s 64M "$dir/disk.img"

# check QUEUES DEPTH BLOCKSIZE READONLY [extra ublk add options...]
check() {
	local queues=$1 depth=$2 bs=$3 ro=$4
	shift 4
	local dev name sys
	dev=$("$UBLK" add --file "$dir/disk.img" --queues "$queues" --depth "$depth" --block-size "$bs" "$@")
	name=${dev#/dev/} sys=/sys/block/${dev#/dev/}
	echo "-- $dev: queues=$queues depth=$depth block-size=$bs read-only=$ro $*"
	expect_eq "$(blockdev --getss "$dev")" "$bs" "logical block size"
	# Physical block size follows the backing's (the disk under the file), never below the logical.
	local pbs=$(cat "/sys/dev/block/$(stat -c %Hd:%Ld "$dir/disk.img")/queue/physical_block_size")
	expect_eq "$(blockdev --getpbsz "$dev")" $((pbs > bs ? pbs : bs)) "physical block size"
	expect_eq "$(blockdev --getsize64 "$dev")" $((64 << 20)) "size"
	# No I/O scheduler, as on the kernel's loop devices; so nr_requests is the tag
	# set's depth, which is what the device announced.
	grep -q '\[none\]' "$sys/queue/scheduler" || fail "scheduler is not none: $(cat "$sys/queue/scheduler")"
	expect_eq "$(cat "$sys/queue/nr_requests")" "$depth" "nr_requests"
	expect_eq "$(ls "$sys/mq" | wc -l)" "$queues" "hardware queues in $sys/mq"
	expect_eq "$(blockdev --getro "$dev")" "$ro" "read-only flag"
	if [[ $ro == 1 ]]; then
		expect_eq "$(cat "$sys/queue/discard_max_bytes")" 0 "discard_max_bytes of a read-only device"
	else
		(($(cat "$sys/queue/discard_max_bytes") > 0)) || fail "discard not advertised on a file that can punch holes"
		(($(cat "$sys/queue/write_zeroes_max_bytes") > 0)) || fail "write-zeroes not advertised"
	fi
	expect_eq "$(cat "$sys/queue/write_cache")" "write back" "write_cache"
	expect_eq "$(cat "$sys/queue/fua")" 1 "fua"
	"$UBLK" del --id "${dev#/dev/ublkb}"
	wait_gone "$dev" 5
}

check 1 32 512 0
check 2 256 4096 0
check 2 64 1024 1 --read-only
check 1 4096 2048 0 --direct-io off
check 1 1 512 0

# Without --queues: one queue per 4 CPUs (1 to 4).
dev=$("$UBLK" add --file "$dir/disk.img")
quarter=$(($(nproc) / 4))
expect_eq "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" "$((quarter < 1 ? 1 : quarter > 4 ? 4 : quarter))" "default queue count"
"$UBLK" del --id "${dev#/dev/ublkb}"
wait_gone "$dev" 5

# Each queue thread runs on the CPUs the block layer maps to its queue.
dev=$("$UBLK" add --file "$dir/disk.img" --queues "$(nproc)")
pid=$(list_field "${dev#/dev/ublkb}" pid)
for task in /proc/$pid/task/*; do
	name=$(cat "$task/comm")
	[[ $name == ublk-q* ]] || continue
	q=${name#ublk-q}
	expect_eq "$(awk '/^Cpus_allowed_list/ { print $2 }' "$task/status")" "$(cat /sys/block/${dev#/dev/}/mq/$q/cpu_list)" "CPUs of queue thread $q"
	echo "queue $q thread on CPUs $(cat /sys/block/${dev#/dev/}/mq/$q/cpu_list)"
done
"$UBLK" del --id "${dev#/dev/ublkb}"
wait_gone "$dev" 5

# More queues than CPUs: ublk_drv gives one per CPU, and `ublk add` says so in one line.
dev=$("$UBLK" add --file "$dir/disk.img" --queues $(($(nproc) + 2)) 2>"$dir/err")
expect_eq "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" "$(nproc)" "hardware queues when asked for more than CPUs"
expect_eq "$(list_field "${dev#/dev/ublkb}" queues)" "$(nproc)" "queues in ublk list"
expect_eq "$(wc -l <"$dir/err")" 1 "lines on stderr ($(cat "$dir/err"))"
grep -q "at most one per CPU" "$dir/err" || fail "no word of the queues the kernel gave: $(cat "$dir/err")"
echo "ok: $(cat "$dir/err")"
echo "ok: every combination matches sysfs"
