#!/bin/bash
# 10-loop-mount — a file becomes a disk: 256 MiB file -> ublk add -> mkfs.ext4 ->
# mount -> random files -> umount -> ublk del. The node is gone, the backing passes
# e2fsck, and through the kernel's own loop driver the files read back identical.
# (40-legacy-opcodes runs this same script with the legacy opcodes forced, 24-zero-copy
# with UBLK_TEST_ADD_ARGS="--zero-copy on": extra options for ublk add.)
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk

dir=$(mktempdir)
img=$dir/disk.img
truncate -s 256M "$img"

# shellcheck disable=SC2086  # the extra options are split on purpose
dev=$("$UBLK" add --file "$img" ${UBLK_TEST_ADD_ARGS:-})
[[ $dev =~ ^/dev/ublkb[0-9]+$ ]] || fail "ublk add printed '$dev', not a device path"
at_exit "$UBLK" del --id "${dev#/dev/ublkb}"
[[ -b $dev ]] || fail "$dev is not a block device right after ublk add returned"
expect_eq "$(blockdev --getsize64 "$dev")" $((256 << 20)) "device size"

mkfs.ext4 -q -F "$dev"
mkdir "$dir/mnt"
mount "$dev" "$dir/mnt"
for i in 1 2 3 4 5; do
	head -c $((i * 3 << 20)) /dev/urandom >"$dir/mnt/file$i"
	sha "$dir/mnt/file$i" >"$dir/file$i.sha"
done
mkdir "$dir/mnt/sub" && head -c 12345 /dev/urandom >"$dir/mnt/sub/odd" && sha "$dir/mnt/sub/odd" >"$dir/odd.sha"
umount "$dir/mnt"

"$UBLK" del --id "${dev#/dev/ublkb}"
wait_gone "$dev" 5
[[ ! -e /dev/ublkc${dev#/dev/ublkb} ]] || fail "/dev/ublkc${dev#/dev/ublkb} still exists after ublk del"
pgrep -f "ublk add --file $img" >/dev/null && fail "the server of $dev is still running after ublk del"

e2fsck -fn "$img" || fail "e2fsck found errors in the backing file"

loopdev=$(losetup --find --show --read-only "$img")
at_exit losetup -d "$loopdev"
mount -o ro "$loopdev" "$dir/mnt"
at_exit umount "$dir/mnt"
for i in 1 2 3 4 5; do
	expect_eq "$(sha "$dir/mnt/file$i")" "$(cat "$dir/file$i.sha")" "file$i through the kernel loop driver"
done
expect_eq "$(sha "$dir/mnt/sub/odd")" "$(cat "$dir/odd.sha")" "sub/odd through the kernel loop driver"
echo "ok: mkfs, mount, 6 files written through $dev read back identical through $loopdev"
