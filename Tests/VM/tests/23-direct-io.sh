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
echo "ok: direct I/O on/off/auto behave"
