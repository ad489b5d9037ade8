#!/bin/bash
# 76-nbd-upgrade-lost-writes — writes an NBD server answered and then lost in a crash
# (an nbdkit memory export, killed and started again) are told by the next FLUSH failing
# once, also across `ublk upgrade`: the old server hands the loss on through the device
# record, and the new server's first FLUSH fails (an fsync of the device sees EIO, once).
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
need_feature QUIESCE
command -v nbdkit >/dev/null || { echo "SKIP: needs nbdkit"; exit 77; }
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
pidfile=$dir/nbdkit.pid
# A memory export: whatever the server held is gone when it dies.
memory_server() {
	nbdkit -f -i 127.0.0.1 -p 10809 memory size=64M 2>>"$dir/nbdkit.log" &
	server=$!
	echo "$server" >"$pidfile"
	wait_port 10809 10 "$dir/nbdkit.log"
}
at_exit bash -c "kill \$(cat '$pidfile') 2>/dev/null"
fsync_device() { python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); os.fsync(fd)' "$1"; }

memory_server
dev=$("$UBLK" add --uri nbd://127.0.0.1/ --recovery) || fail "ublk add of the memory export"
# 1 MiB answered, not flushed; then the server dies with it, and comes back empty.
head -c 1M /dev/urandom | dd of="$dev" bs=1M oflag=direct status=none || fail "the write"
kill -9 "$server"
wait "$server" 2>/dev/null || true
memory_server
sleep 1
timeout 120 "$UBLK" upgrade "$dev" >"$dir/up.out" 2>&1 || fail "ublk upgrade: $(cat "$dir/up.out")"
fsync_device "$dev" 2>"$dir/fsync.err" && fail "the first fsync after the lost writes succeeded: the upgrade hid the loss"
grep -q "Input/output error" "$dir/fsync.err" || fail "the first fsync said: $(cat "$dir/fsync.err")"
fsync_device "$dev" || fail "the second fsync failed too"
"$UBLK" del "$dev"
echo "ok: across ublk upgrade, the first fsync after the server lost answered writes failed with EIO, the next one worked"
