#!/bin/bash
# 64-crypt-fio — an encrypted device with 2 queues at depth 32: fio random
# read/write with crc32c verification passes, for block size 512 (mixed request
# sizes, many 512-byte units per request) and 4096. The data survives ublk del and
# add with the same key (fio verifies it again), and with another key it does not
# read back (the key really is used).
# timeout: 600
. "$(dirname "$0")/../lib.sh"
need_ublk

dir=$(mktempdir)
head -c 64 /dev/urandom >"$dir/key"
head -c 64 /dev/urandom >"$dir/other-key"

# add IMAGE KEY BLOCK: prints the device of IMAGE through the encrypting target.
add() {
	local dev
	dev=$("$UBLK" add --file "$1" --encryption aes-xts-plain64 --key-file "$2" --block-size "$3" \
		--queues 2 --depth 32)
	at_exit sh -c "'$UBLK' del --id ${dev#/dev/ublkb} 2>/dev/null || true"
	echo "$dev"
}

del() {
	"$UBLK" del --id "${1#/dev/ublkb}"
	wait_gone "$1" 10
}

# verify DEVICE BLOCK WRITE|CHECK: fio writes (and verifies) or only verifies the
# same pattern (same seed, same job layout) on DEVICE.
verify() {
	local mode=() sizes
	if [[ $3 == CHECK ]]; then mode=(--verify_only=1); fi
	if (($2 == 512)); then sizes=(--bsrange=512-64k --blockalign=512); else sizes=(--bsrange=4k-128k --blockalign=4k); fi
	fio --name=crypt --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite "${sizes[@]}" \
		--iodepth=32 --numjobs=2 --size=48M --offset_increment=48M --randseed=4242 --verify=crc32c \
		--verify_fatal=1 --do_verify=1 --verify_state_save=0 --group_reporting --output-format=terse \
		"${mode[@]}" >"$dir/fio.out" 2>&1
}

for block in 512 4096; do
	img=$dir/disk-$block.img
	truncate -s 128M "$img"
	dev=$(add "$img" "$dir/key" "$block")
	expect_eq "$(ls "/sys/block/${dev#/dev/}/mq" | wc -l)" 2 "hardware queues"
	expect_eq "$(blockdev --getss "$dev")" "$block" "logical block size"
	verify "$dev" "$block" WRITE || { cat "$dir/fio.out"; fail "block $block: fio randwrite+verify failed"; }
	del "$dev"

	dev=$(add "$img" "$dir/key" "$block")
	verify "$dev" "$block" CHECK || { cat "$dir/fio.out"; fail "block $block: the data did not verify after del and add"; }
	del "$dev"

	dev=$(add "$img" "$dir/other-key" "$block")
	if verify "$dev" "$block" CHECK; then fail "block $block: the data verified with another key"; fi
	del "$dev"
	echo "ok: block $block: fio crc32c verify at depth 32 on 2 queues; data kept across del/add; wrong key reads garbage"
done
