#!/bin/bash
# 23-direct-io — --direct-io on|off|auto: auto uses O_DIRECT where the backing
# allows it and otherwise says so in one line and uses buffered I/O; `on` (and a
# bare --direct-io) refuses a backing that cannot do it.
# timeout: 200
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
truncate -s 32M "$dir/disk.img"
dio_of() { "$UBLK" list | awk -v id="${1#/dev/ublkb}" '$1 == id { print $7 }'; }

dev=$("$UBLK" add --file "$dir/disk.img")
expect_eq "$(dio_of "$dev")" on "direct I/O with auto on ext4"
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("$UBLK" add --file "$dir/disk.img" --direct-io off)
expect_eq "$(dio_of "$dev")" off "direct I/O with off"
"$UBLK" del --id "${dev#/dev/ublkb}"

# A backing block device with 4096-byte sectors cannot take 512-byte O_DIRECT I/O.
loopdev=$(losetup --find --show --sector-size 4096 "$dir/disk.img")
at_exit losetup -d "$loopdev"
dev=$("$UBLK" add --file "$loopdev" --block-size 512 2>"$dir/err")
cat "$dir/err"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of the fallback note"
grep -q "direct I/O" "$dir/err" && grep -q "buffered" "$dir/err" || fail "the fallback note does not say what happened"
expect_eq "$(dio_of "$dev")" off "direct I/O after the fallback"
dd if=/dev/urandom of="$dev" bs=512 count=7 oflag=direct status=none || fail "512-byte writes failed on the buffered fallback"
"$UBLK" del --id "${dev#/dev/ublkb}"

for on in "--direct-io on" "--direct-io"; do
	# (A bare --direct-io is on, as losetup's --direct-io[=on|off].)
	# shellcheck disable=SC2086
	if "$UBLK" add --file "$loopdev" --block-size 512 $on 2>"$dir/err"; then
		fail "$on accepted a backing that cannot do it"
	fi
	cat "$dir/err"
	grep -q -- "--direct-io off" "$dir/err" || fail "the error of $on does not say what to do"
done
dev=$("$UBLK" add --file "$loopdev")
expect_eq "$(blockdev --getss "$dev")" 4096 "block size follows a 4096-byte backing"
expect_eq "$(dio_of "$dev")" on "direct I/O on a 4096-byte backing at block size 4096"
"$UBLK" del --id "${dev#/dev/ublkb}"

# An image file on a disk of 4096-byte sectors: a disk image counts 512-byte sectors, so
# by default the device has 512-byte blocks (buffered, said in a line with the way to
# direct I/O), as under losetup, and its partitions are found; with --direct-io on, 4096.
mkfs.ext4 -q -F "$loopdev"
mkdir -p "$dir/4k"
mount "$loopdev" "$dir/4k"
truncate -s 16M "$dir/4k/image.img"
printf 'label: gpt\n,4M\n,\n' | sfdisk -q "$dir/4k/image.img" >/dev/null || fail "sfdisk on the image file"
for mode in auto off; do
	dev=$("$UBLK" add --file "$dir/4k/image.img" --direct-io "$mode" 2>"$dir/err")
	expect_eq "$(blockdev --getss "$dev")" 512 "block size of an image on a 4096-byte disk, --direct-io $mode"
	wait_for_path "${dev}p2" 10
	if [[ $mode == auto ]]; then
		grep -q "buffered I/O.*--block-size 4096 gives direct I/O" "$dir/err" || fail "no note of the buffered fallback: $(cat "$dir/err")"
	else
		[[ -s $dir/err ]] && fail "--direct-io off said: $(cat "$dir/err")"
	fi
	"$UBLK" del --id "${dev#/dev/ublkb}"
done
dev=$("$UBLK" add --file "$dir/4k/image.img" --direct-io on)
expect_eq "$(blockdev --getss "$dev")" 4096 "block size with --direct-io on, on a 4096-byte disk"
expect_eq "$(dio_of "$dev")" on "direct I/O with --direct-io on, on a 4096-byte disk"
"$UBLK" del --id "${dev#/dev/ublkb}"
umount "$dir/4k"
echo "ok: direct I/O on/off/auto behave"
