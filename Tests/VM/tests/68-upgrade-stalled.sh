#!/bin/bash
# 68-upgrade-stalled — `ublk upgrade` while the backing holds a request: the backing (a
# device-mapper device) is suspended with a read of the device waiting on it, so the
# old server's queue cannot end after QUIESCE_DEV. After 30 s it leaves the device by
# exiting (the kernel parks new requests from QUIESCE_DEV on, so serving on would stall the
# device for good), the new server takes it over, and once the backing is resumed the
# waiting read completes with the right data, the upgrade reports the new server, and the
# device is live.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
need_feature QUIESCE
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
name=ublk-test-stall-$$
img=$dir/backing.img
head -c 32M /dev/urandom >"$img"
loopdev=$(loop_device "$img")
dm_device "$name" "0 65536 linear $loopdev 0"
at_exit dmsetup resume --noudevsync "$name"

dev=$("$UBLK" add --file "/dev/mapper/$name" --recovery)
id=${dev#/dev/ublkb}
old=$(list_field "$id" pid)

dmsetup suspend --noudevsync --nolockfs "$name"
dd if="$dev" of="$dir/got" bs=64k skip=100 count=1 iflag=direct status=none &
reader=$!
sleep 2
kill -0 "$reader" || fail "the read finished while the backing was suspended"

"$UBLK" upgrade --id "$id" >"$dir/out" 2>"$dir/err" &
upgrade=$!
# QUIESCE_DEV gives up after 30 s; the old server then leaves.
wait_exit "$old" 60
dmsetup resume --noudevsync "$name"

wait "$reader" || fail "the read that waited through the upgrade failed"
cmp "$dir/got" <(dd if="$img" bs=64k skip=100 count=1 status=none) || fail "the read that waited got the wrong data"
wait "$upgrade" || fail "ublk upgrade failed: $(cat "$dir/err")"
grep -q "served by pid" "$dir/out" || fail "ublk upgrade said: $(cat "$dir/out" "$dir/err")"
expect_eq "$(list_field "$id" state)" live "state after the upgrade"
[[ $(list_field "$id" pid) != "$old" ]] || fail "device $id is still served by the old pid $old"
grep -q "still in the backing's hands 30 s after QUIESCE_DEV: this server exits" /run/ublk/server.log ||
	fail "the old server's log does not say why it left"
echo "ok: with the backing stalled, the old server left after QUIESCE_DEV timed out; $(cat "$dir/out")"
