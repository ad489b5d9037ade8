#!/bin/bash
# 50-integrity-load — nothing is lost or corrupted under load: fio writes with
# crc32c verification (verify_fatal) at iodepth 64, 2 jobs, block sizes from 4 KiB
# to 1 MiB (1 MiB is twice the device's 512 KiB max I/O, so the kernel splits it),
# verifying while it writes (verify_backlog) and again at the end; for the backing
# opened with direct I/O on and off, with 1 and 2 queues. Afterwards the data
# reads back identical through the kernel's loop driver (what is in the file is
# what fio wrote through the device). UBLK_TEST_ADD_ARGS: extra options for ublk add
# (24-zero-copy runs the load part with "--zero-copy on"; UBLK_TEST_LOAD_ONLY=1 skips
# the check that the job really verifies).
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
per_job=20M

# run DIRECT_IO QUEUES
run() {
	local dio=$1 queues=$2 dev id sys img=$dir/disk-$1-$2.img
	truncate -s 40M "$img"
	# shellcheck disable=SC2086  # the extra options are split on purpose
	dev=$("$UBLK" add --file "$img" --queues "$queues" --depth 128 --direct-io "$dio" ${UBLK_TEST_ADD_ARGS:-})
	id=${dev#/dev/ublkb} sys=/sys/block/${dev#/dev/}
	# The setting took effect, and 1 MiB requests really are split.
	local row
	row=$("$UBLK" list --json | python3 -c '
import json, sys
r = {d["id"]: d for d in json.load(sys.stdin)}[int(sys.argv[1])]
print(r["directIO"], r["queues"])' "$id")
	expect_eq "$row" "$dio $queues" "direct I/O and queues in ublk list"
	expect_eq "$(cat "$sys/queue/max_sectors_kb")" 512 "max_sectors_kb of $dev"

	local started=$SECONDS
	if ! fio --name=load --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
		--bssplit=4k/30:8k/10:64k/15:128k/10:256k/10:512k/15:1m/10 --iodepth=64 --numjobs=2 \
		--size=$per_job --offset_increment=$per_job --verify=crc32c --verify_fatal=1 --do_verify=1 \
		--verify_backlog=256 --verify_state_save=0 --group_reporting --minimal >"$dir/fio.out" 2>&1; then
		cat "$dir/fio.out"
		fail "fio verify failed on $dev (direct-io $dio, $queues queues)"
	fi
	# A buffered reader too (page cache, readahead): the sha must match a direct read.
	local direct buffered
	direct=$(dd if="$dev" bs=1M iflag=direct status=none | sha256sum)
	buffered=$(dd if="$dev" bs=64k status=none | sha256sum)
	expect_eq "$buffered" "$direct" "buffered vs direct read of $dev"
	"$UBLK" del --id "$id"
	wait_gone "$dev" 10
	# What the server wrote is in the file, byte for byte.
	expect_eq "$(sha256sum <"$img")" "$direct" "backing file vs device contents"
	echo "ok: direct-io $dio, $queues queue(s): fio verify passed ($((SECONDS - started)) s), file matches device"
	rm -f "$img"
}

for dio in on off; do
	for queues in 1 2; do
		run "$dio" "$queues"
	done
done

[[ ${UBLK_TEST_LOAD_ONLY:-0} != 1 ]] || exit 0

# The fio job really verifies: corrupt a block behind the device's back and it must fail.
started=$SECONDS
img=$dir/corrupt.img
truncate -s 16M "$img"
check_job=(--name=seed --ioengine=io_uring --direct=1 --bs=64k --size=4M --verify=crc32c --verify_fatal=1
	--verify_state_save=0 --minimal)
dev=$("$UBLK" add --file "$img" --queues 1 --direct-io off)
fio "${check_job[@]}" --filename="$dev" --rw=write --do_verify=0 >/dev/null
fio "${check_job[@]}" --filename="$dev" --rw=read >"$dir/fio.out" 2>&1 ||
	{ cat "$dir/fio.out"; fail "the read-back verify job fails on intact data"; }
"$UBLK" del --id "${dev#/dev/ublkb}"
wait_gone "$dev" 10
printf 'garbage' | dd of="$img" bs=1 seek=$((1 << 20)) conv=notrunc status=none
dev=$("$UBLK" add --file "$img" --queues 1 --direct-io off)
if fio "${check_job[@]}" --filename="$dev" --rw=read >"$dir/fio.out" 2>&1; then
	fail "fio verify did not notice a corrupted block: the checks above prove nothing"
fi
grep -q 'verify' "$dir/fio.out" || { cat "$dir/fio.out"; fail "fio failed, but not on verification"; }
echo "ok: the verify job does catch a corrupted block ($((SECONDS - started)) s)"
