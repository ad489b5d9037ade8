#!/bin/bash
# 72-nbd-fio-restart — fio crc32c verify at depth 32 with 2 queues against nbdkit
# (multi-conn); the server is killed in the middle of it and restarted 2 s later:
# the verify passes. Then the server is killed for good: after --reconnect-timeout
# I/O fails with EIO, the ublk server stays up, and `ublk del` still removes the device.
# Where the kernel has QUIESCE, an upgrade with the server down is refused at once.
# timeout: 400
. "$(dirname "$0")/../lib.sh"
need_ublk
need_loopback

dir=$(mktempdir)
truncate -s 64M "$dir/export.img"
start_nbdkit "$dir/export.img"

dev=$("$UBLK" add --target nbd --uri nbd://127.0.0.1/disk --queues 2 --depth 32 --reconnect-timeout 15)
id=${dev#/dev/ublkb}
at_exit "$UBLK" del --all
pid=$(list_field "$id" pid)
expect_eq "$(ls "/sys/block/ublkb$id/mq" | wc -l)" 2 "hardware queues"

fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--iodepth=32 --numjobs=2 --size=24M --offset_increment=24M --verify=crc32c --verify_fatal=1 \
	--do_verify=1 --verify_state_save=0 --group_reporting --output-format=terse >"$dir/fio.out" 2>&1 &
fio=$!
sleep 2
kill -0 "$fio" 2>/dev/null || fail "fio ended before the server was killed: $(cat "$dir/fio.out")"
kill -9 "$server"
wait "$server" 2>/dev/null || true
sleep 2
start_nbdkit "$dir/export.img"
wait "$fio" || { cat "$dir/fio.out"; fail "fio verify failed across the server restart"; }
grep -q "reconnected to 127.0.0.1:10809" "${UBLK_RUN_DIR:-/run/ublk}/server.log" ||
	fail "the server log shows no reconnect: $(tail -5 "${UBLK_RUN_DIR:-/run/ublk}/server.log")"
echo "ok: fio crc32c verify passed with the server killed and restarted in the middle"

# The server stays down: I/O fails once the reconnect timeout (15 s) has passed.
kill -9 "$server"
wait "$server" 2>/dev/null || true
start=$SECONDS
if dd if="$dev" of=/dev/null bs=4k count=1 skip=100 iflag=direct 2>"$dir/dd.err"; then
	fail "a read succeeded with the server gone"
fi
grep -q "Input/output error" "$dir/dd.err" || fail "the read failed otherwise than with EIO: $(cat "$dir/dd.err")"
((SECONDS - start < 60)) || fail "the read took $((SECONDS - start)) s to fail"
kill -0 "$pid" || fail "the ublk server (pid $pid) died"
expect_eq "$(list_field "$id" id)" "$id" "device still listed"
"$UBLK" del --id "$id"
wait_gone "$dev"
wait_exit "$pid" 20
echo "ok: with the server gone for good, I/O failed with EIO after $((SECONDS - start)) s; the ublk server stayed up until ublk del"

# An upgrade while the NBD server is down is refused before anything changes (the new
# server could not reach the export after the quiesce: the device would wait for one).
if has_feature QUIESCE; then
	start_nbdkit "$dir/export.img"
	dev=$("$UBLK" add --target nbd --uri nbd://127.0.0.1/disk --recovery)
	id=${dev#/dev/ublkb}
	kill -9 "$server"
	wait "$server" 2>/dev/null || true
	KEEP_ID=$id expect_error "ublk upgrade with the NBD server down" "connection refused.*nothing changed" -- "$UBLK" upgrade "$dev"
	fail_on_problems "with the NBD server down"
	expect_eq "$(list_field "$id" state)" live "state of the device after the refused upgrade"
	"$UBLK" del "$dev"
	echo "ok: an upgrade with the NBD server down was refused: $(cat "$EXPECT_DIR/err")"
else
	echo "an upgrade needs UBLK_F_QUIESCE: not run"
fi
