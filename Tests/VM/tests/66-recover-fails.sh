#!/bin/bash
# 66-recover-fails — a `ublk recover` that fails does not take the device with it: a
# --recovery device whose server was killed, recovered while its backing's first block
# fails (a device-mapper table switched to an error target there), fails in one line and
# leaves the device waiting for a server (quiesced, the mounted file system intact); once
# the backing reads again, `ublk recover` brings it back with its data. A backing that
# shrank below the device is refused before anything changes, and so is another file put
# at the backing's path.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk

dir=$(mktempdir)
name=ublk-test-recover-$$
img=$dir/backing.img
truncate -s 64M "$img"
loopdev=$(loop_device "$img")
dm_device "$name" "0 131072 linear $loopdev 0"
at_exit "$UBLK" del --all --force
backing=/dev/mapper/$name

dev=$("$UBLK" add --file "$backing" --recovery)
id=${dev#/dev/ublkb}
mkfs.ext4 -q -F "$dev"
mkdir "$dir/mnt"
mount "$dev" "$dir/mnt"
head -c 3M /dev/urandom >"$dir/mnt/data"
want=$(sha "$dir/mnt/data")
sync

pid=$(list_field "$id" pid)
kill -9 "$pid"
wait_exit "$pid" 10
# The first block of the backing now fails.
printf '0 8 error\n8 131064 linear %s 8\n' "$loopdev" | dmsetup load "$name"
dmsetup resume "$name"

rc=0
"$UBLK" recover --id "$id" >"$dir/out" 2>"$dir/err" || rc=$?
((rc != 0)) || fail "ublk recover succeeded with the backing's first block failing"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of the failure ($(cat "$dir/err"))"
grep -q "not readable.*ublk recover --id $id" "$dir/err" || fail "the failure does not say why: $(cat "$dir/err")"
[[ -b $dev ]] || fail "$dev is gone after the failed recover"
for _ in $(seq 50); do [[ $(list_field "$id" state) == quiesced* ]] && break; sleep 0.1; done
[[ $(list_field "$id" state) == quiesced* ]] || fail "device $id is '$(list_field "$id" state)' after the failed recover, not quiesced"
echo "ok: the failed recover said: $(cat "$dir/err"); $dev stays, quiesced"

echo "0 131072 linear $loopdev 0" | dmsetup load "$name"
dmsetup resume "$name"
"$UBLK" recover --id "$id" >/dev/null
expect_eq "$(list_field "$id" state)" live "state after the second recover"
expect_eq "$(sha "$dir/mnt/data")" "$want" "the file written before the kill, through the mount that stayed"
umount "$dir/mnt"
echo "ok: the next recover brought $dev back; the mounted file system kept its data"

# A backing that shrank below the device (which recovery keeps as it was) is refused
# before anything changes; grown back, the device recovers.
"$UBLK" del --id "$id"
small=$dir/shrinks.img
truncate -s 32M "$small"
sdev=$("$UBLK" add --file "$small" --recovery)
sid=${sdev#/dev/ublkb}
spid=$(list_field "$sid" pid)
kill -9 "$spid"
wait_exit "$spid" 10
truncate -s 16M "$small"
KEEP_ID=$sid
expect_error "recover onto a backing that shrank" "cannot be taken over with this backing.*holds.*ublk recover --id $sid" -- "$UBLK" recover --id "$sid"
fail_on_problems "recovering onto a backing that shrank"
[[ -b $sdev ]] || fail "$sdev is gone after the refused recover"
truncate -s 32M "$small"
"$UBLK" recover --id "$sid" >/dev/null
expect_eq "$(list_field "$sid" state)" live "state after recovering onto the grown-back backing"
expect_eq "$(blockdev --getsize64 "$sdev")" $((32 << 20)) "size of $sdev"
echo "ok: a backing that shrank is refused ($(cat "$EXPECT_DIR/err")); grown back, $sdev recovers"

# Another file renamed over the backing's path (same size): recovering onto it would serve
# other data under whatever uses the device, so it is refused; the file put back, the
# device recovers.
"$UBLK" del --id "$sid"
moved=$dir/moved.img
truncate -s 32M "$moved"
mdev=$("$UBLK" add --file "$moved" --recovery)
mid=${mdev#/dev/ublkb}
head -c 1M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$mdev" bs=1M oflag=direct conv=fsync status=none
mpid=$(list_field "$mid" pid)
kill -9 "$mpid"
wait_exit "$mpid" 10
mv "$moved" "$moved.orig"
truncate -s 32M "$moved"
KEEP_ID=$mid
expect_error "recover onto another file at the backing's path" "no longer the file device $mid was added with.*put it back" -- \
	"$UBLK" recover --id "$mid"
fail_on_problems "recovering onto another file"
mv "$moved.orig" "$moved"
"$UBLK" recover --id "$mid" >/dev/null
cmp <(dd if="$mdev" bs=1M count=1 iflag=direct status=none) "$dir/pattern" || fail "$mdev does not read back after the file was put back"
echo "ok: another file at the backing's path is refused ($(cat "$EXPECT_DIR/err")); put back, $mdev recovers with its data"
