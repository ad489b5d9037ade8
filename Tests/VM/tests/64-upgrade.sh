#!/bin/bash
# 64-upgrade — `ublk upgrade` (QUIESCE_DEV + user recovery) replaces a device's server
# while fio writes and verifies (crc32c) on a mounted ext4: twice in a row, no I/O
# error, the verify passes, the server pid changes each time. The second upgrade runs
# under a burst of reads at depth 32, so that the server holds requests when quiesced. A device added without
# --recovery is refused in one line. Kernels without QUIESCE refuse in one line and
# nothing changes.
# timeout: 400
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
img=$dir/up.img
truncate -s 256M "$img"
dev=$("$UBLK" add --file "$img" --recovery --queues 2)
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)

# refused ID TEXT: `ublk upgrade --id ID` fails in one line containing TEXT, same server.
refused() {
	local rc=0 before
	before=$(list_field "$1" pid)
	timeout 60 "$UBLK" upgrade --id "$1" >"$dir/out" 2>"$dir/err" || rc=$?
	((rc != 0 && rc != 124)) || fail "ublk upgrade --id $1: status $rc (expected a refusal)"
	expect_eq "$(wc -l <"$dir/err")" 1 "lines of the refusal ($(cat "$dir/err"))"
	grep -qF -- "$2" "$dir/err" || fail "the refusal does not say '$2': $(cat "$dir/err")"
	expect_eq "$(list_field "$1" pid)/$(list_field "$1" state)" "$before/live" "server and state after the refusal"
	echo "ok: refused: $(cat "$dir/err")"
}

if ! has_feature QUIESCE; then
	refused "$id" QUIESCE
	exit 0
fi

plain=$("$UBLK" add --target null --size 16M)
refused "${plain#/dev/ublkb}" "--recovery"

mkfs.ext4 -q -F "$dev"
mkdir "$dir/mnt"
mount "$dev" "$dir/mnt"
timeout -k 5 300 fio --name=upgrade --directory="$dir/mnt" --ioengine=io_uring --direct=1 --rw=randwrite \
	--bsrange=4k-128k --size=96M --iodepth=16 --numjobs=2 --verify=crc32c --verify_fatal=1 --do_verify=1 \
	--verify_backlog=64 --verify_state_save=0 --rate=3m,3m --minimal >"$dir/fio.out" 2>&1 &
fio_pid=$!
sleep 4
for round in 1 2; do
	kill -0 "$fio_pid" 2>/dev/null || { cat "$dir/fio.out"; fail "fio ended before upgrade $round"; }
	if ((round == 2)); then
		# Requests held by the server at QUIESCE_DEV: their commits park fetches the
		# driver's cancel has passed already (the server must cancel again).
		timeout -k 5 120 fio --name=burst --filename="$dev" --readonly --direct=1 --ioengine=io_uring \
			--rw=randread --bs=4k --iodepth=32 --time_based --runtime=15 --minimal >"$dir/burst.out" 2>&1 &
		burst_pid=$!
		sleep 2
	fi
	out=$(timeout 90 "$UBLK" upgrade --id "$id" 2>"$dir/err") || {
		rc=$?
		tail -n 30 /run/ublk/server.log 2>/dev/null | sed 's/^/server.log: /'
		fail "ublk upgrade $round failed (status $rc): $(cat "$dir/err")"
	}
	new=$(list_field "$id" pid)
	[[ $new != "$pid" ]] && kill -0 "$new" || fail "upgrade $round: pid '$new' (was $pid) is not a new live server"
	wait_exit "$pid" 10
	expect_eq "$(list_field "$id" state)" live "state after upgrade $round"
	echo "ok: upgrade $round: $out"
	pid=$new
	sleep 3
done
rc=0
wait "$burst_pid" || rc=$?
((rc == 0)) || { cat "$dir/burst.out"; fail "the read burst across upgrade 2 failed (status $rc)"; }
wait "$fio_pid" || rc=$?
((rc == 0)) || { cat "$dir/fio.out"; fail "fio across the upgrades failed (status $rc)"; }
umount "$dir/mnt"
e2fsck -f -n "$dev" >"$dir/fsck.out" 2>&1 || { cat "$dir/fsck.out"; fail "e2fsck found errors after the upgrades"; }
echo "ok: fio verify passed across two upgrades; e2fsck clean"
