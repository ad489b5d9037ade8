#!/bin/bash
# 64-upgrade — `ublk upgrade` (QUIESCE_DEV + user recovery) replaces a device's server
# while fio writes and verifies (crc32c) on a mounted ext4: twice in a row, no I/O
# error, the verify passes, the server pid changes each time. The second upgrade runs
# under a burst of reads at depth 32, so that the server holds requests when quiesced. A device added without
# --recovery is refused in one line. Kernels without QUIESCE refuse in one line and
# nothing changes. An encrypted device is upgraded with its key (--key-file PATH or -);
# without it, with a key of the wrong size (in a file or on standard input) or another key
# (the record keeps a check value), with another file at the backing's path, or with a
# --binary that is no ublk (a directory, /bin/true), the upgrade
# is refused in one line before anything changes (it once quiesced the device for a server
# that could not start).
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

# refused ID TEXT [ARGS...]: `ublk upgrade --id ID ARGS` fails in one line containing
# TEXT, same server; standard input from $STDIN (default /dev/null).
refused() {
	local rc=0 before
	before=$(list_field "$1" pid)
	timeout 60 "$UBLK" upgrade --id "$1" "${@:3}" >"$dir/out" 2>"$dir/err" <"${STDIN:-/dev/null}" || rc=$?
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
refused "$id" "not encrypted" --key-file /dev/null
# Another file at the backing's path: the new server would open that one. Refused before
# the quiesce; the file put back, the upgrades below go on.
mv "$img" "$img.orig" && truncate -s 256M "$img"
refused "$id" "no longer the file device $id was added with"
mv "$img.orig" "$img"
# A --binary that is no ublk (a directory, a program that does nothing) is found out
# before the quiesce, not after the old server left the device.
refused "$id" "/usr/bin is not an executable file" --binary /usr/bin
refused "$id" "is no ublk binary" --binary /bin/true
refused "$id" "/nonexistent/ublk cannot be run (No such file or directory)" --binary /nonexistent/ublk

# An encrypted device: its key is never recorded, so the new server is given it again.
head -c 64 /dev/urandom >"$dir/key"
head -c 16 /dev/urandom >"$dir/short-key"
truncate -s 32M "$dir/crypt.img"
crypt=$("$UBLK" add --file "$dir/crypt.img" --encryption aes-xts-plain64 --key-file "$dir/key" --recovery)
cid=${crypt#/dev/ublkb}
head -c 4M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$crypt" bs=1M oflag=direct conv=fsync status=none
refused "$cid" "--key-file"
refused "$cid" "short-key" --key-file "$dir/short-key"
# From standard input too: read and checked before the old server is quiesced.
STDIN=$dir/short-key refused "$cid" "standard input" --key-file -
# Another key of the right size is not the device's: refused before the quiesce.
head -c 64 /dev/urandom >"$dir/other-key"
refused "$cid" "not the key device $cid was added with" --key-file "$dir/other-key"
before=$(list_field "$cid" pid)
timeout 90 "$UBLK" upgrade --id "$cid" --key-file "$dir/key" >/dev/null 2>"$dir/err" ||
	fail "ublk upgrade of an encrypted device with --key-file failed: $(cat "$dir/err")"
after=$(list_field "$cid" pid)
timeout 90 "$UBLK" upgrade --id "$cid" --key-file - <"$dir/key" >/dev/null 2>"$dir/err" ||
	fail "ublk upgrade of an encrypted device with --key-file - failed: $(cat "$dir/err")"
last=$(list_field "$cid" pid)
[[ $after != "$before" && $last != "$after" ]] && kill -0 "$last" || fail "encrypted upgrades: pids $before -> $after -> $last"
expect_eq "$(list_field "$cid" state)" live "state of the encrypted device after two upgrades"
cmp <(dd if="$crypt" bs=1M count=4 iflag=direct status=none) "$dir/pattern" ||
	fail "the encrypted device's data does not read back after its upgrades"
"$UBLK" del --id "$cid"
echo "ok: an encrypted device is upgraded with --key-file PATH and -, refused without a key or with a short one (file or standard input)"

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
