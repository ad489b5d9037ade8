#!/bin/bash
# 74-nbd-stop-server-down — with the NBD server down and a read waiting for it,
# `ublk del --force` and SIGTERM to the ublk server do not wait out the reconnect
# timeout (60 s here): the read fails with EIO within seconds and the device goes, as
# with the kernel's `nbd-client -d`. A server that answers keeps serving a read that
# comes while `ublk del` waits for nothing (the idle case is unchanged).
# timeout: 240
. "$(dirname "$0")/../lib.sh"
need_ublk
need_loopback

dir=$(mktempdir)
truncate -s 64M "$dir/export.img"
at_exit "$UBLK" del --all --force

# A device whose NBD server is killed, and a read that waits for it.
device_with_waiting_read() {
	start_nbdkit "$dir/export.img"
	dev=$("$UBLK" add --target nbd --uri nbd://127.0.0.1/disk --reconnect-timeout 60)
	id=${dev#/dev/ublkb}
	pid=$(list_field "$id" pid)
	read_waiting_for_server "$dev" "$dir/dd.err"
}

# The read must have failed with EIO, and soon.
expect_failed_read() {
	local start=$1 what=$2
	wait "$reader" && fail "the read succeeded with the server gone ($what)"
	grep -q "Input/output error" "$dir/dd.err" || fail "the read failed otherwise than with EIO ($what): $(cat "$dir/dd.err")"
	((SECONDS - start < 20)) || fail "$what took $((SECONDS - start)) s with a read waiting (reconnect timeout 60 s)"
}

device_with_waiting_read
start=$SECONDS
"$UBLK" del --force --id "$id" || fail "ublk del --force failed"
wait_gone "$dev"
wait_exit "$pid" 20
expect_failed_read "$start" "ublk del --force"
grep -q "the device is stopping: failing the requests that wait" "${UBLK_RUN_DIR:-/run/ublk}/server.log" ||
	fail "the server log does not say why the read failed: $(tail -5 "${UBLK_RUN_DIR:-/run/ublk}/server.log")"
echo "ok: ublk del --force took $((SECONDS - start)) s with the NBD server down and a read waiting"

device_with_waiting_read
start=$SECONDS
kill -TERM "$pid"
wait_exit "$pid" 20
wait_gone "$dev"
expect_failed_read "$start" "SIGTERM to the ublk server"
echo "ok: SIGTERM to the ublk server ended it in $((SECONDS - start)) s with the NBD server down and a read waiting"

# With the server up, a device held open and pulled with --force (the path that tells
# the server it is stopping) is removed, and what was written is in the export.
start_nbdkit "$dir/export.img"
dev=$("$UBLK" add --target nbd --uri nbd://127.0.0.1/disk)
head -c 1M /dev/urandom >"$dir/data"
dd if="$dir/data" of="$dev" bs=1M oflag=direct status=none || fail "write through the device"
exec 3<"$dev"
"$UBLK" del --force "$dev" || fail "ublk del --force with the server up"
exec 3<&-
wait_gone "$dev"
expect_eq "$(head -c 1M "$dir/export.img" | sha256sum | cut -d' ' -f1)" "$(sha "$dir/data")" "the export's first MiB after the removal"
echo "ok: with the NBD server up, ublk del --force of an open device removed it, and the data is in the export"

# Stopped with the NBD server down, a server whose device only read ends with status 0;
# one with a write no FLUSH covered says that the write may not be durable and ends with
# status 3, which a service manager sees (and does not restart on).
kill "$server" 2>/dev/null || true  # (the last step's NBD server: the port must be free)
wait "$server" 2>/dev/null || true
for io in read write; do
	start_nbdkit "$dir/export.img"
	"$UBLK" add --target nbd --uri nbd://127.0.0.1/disk --foreground >"$dir/fg.out" 2>"$dir/fg.err" &
	fg=$!
	for _ in $(seq 100); do [[ -s $dir/fg.out ]] && break; sleep 0.1; done
	dev=$(cat "$dir/fg.out")
	[[ -b $dev ]] || fail "ublk add --foreground did not print a device: $(cat "$dir/fg.err")"
	if [[ $io == read ]]; then
		dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none || fail "read through the device"
	else
		dd if=/dev/urandom of="$dev" bs=4k count=1 oflag=direct status=none || fail "write through the device"
	fi
	kill -9 "$server"
	wait "$server" 2>/dev/null || true
	kill -TERM "$fg"
	wait "$fg" && status=0 || status=$?
	wait_gone "$dev"
	if [[ $io == read ]]; then
		expect_eq "$status" 0 "exit status of a server that only read, stopped with the NBD server down"
	else
		expect_eq "$status" 3 "exit status of a server with an unflushed write, stopped with the NBD server down"
		grep -q "writes it completed may not be on stable storage" "$dir/fg.err" ||
			fail "the server did not say that a write may be lost: $(tail -3 "$dir/fg.err")"
	fi
done
echo "ok: stopped with the NBD server down, a server that only read exits 0, one with an unflushed write says so and exits 3"
