#!/bin/bash
# 62-recovery-fail-io — `--recovery fail-io` (UBLK_F_USER_RECOVERY_FAIL_IO): after the
# server is killed, I/O fails within a second instead of waiting; `ublk list` says
# fail-io; `ublk recover` brings the device back with the data written before the kill.
# `ublk upgrade` of such a device is refused (its handover would fail I/O).
# Kernels without the feature refuse the option in one line and add nothing.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
img=$dir/failio.img
truncate -s 64M "$img"

if ! has_feature USER_RECOVERY_FAIL_IO; then
	rc=0
	"$UBLK" add --file "$img" --recovery fail-io >"$dir/out" 2>"$dir/err" || rc=$?
	((rc != 0)) || fail "ublk add --recovery fail-io succeeded on a kernel without FAIL_IO"
	expect_eq "$(wc -l <"$dir/err")" 1 "lines of the refusal ($(cat "$dir/err"))"
	grep -q FAIL_IO "$dir/err" || fail "the refusal does not name FAIL_IO: $(cat "$dir/err")"
	[[ -z $(ls /sys/class/ublk-char) ]] || fail "a device was left after the refusal"
	echo "ok: no FAIL_IO here: $(cat "$dir/err")"
	exit 0
fi

dev=$("$UBLK" add --file "$img" --recovery fail-io --queues 2)
id=${dev#/dev/ublkb}
head -c 8M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$dev" bs=1M oflag=direct conv=fsync status=none
pid=$(list_field "$id" pid)
# An upgrade would fail the handover's I/O (QUIESCE_DEV ends new requests at once under
# fail-io): refused before anything changes.
if has_feature QUIESCE; then
	KEEP_ID=$id expect_error "ublk upgrade of a fail-io device" "fail-io.*nothing changed" -- "$UBLK" upgrade --id "$id"
	fail_on_problems "with ublk upgrade of a fail-io device"
	expect_eq "$(list_field "$id" pid)/$(list_field "$id" state)" "$pid/live" "server and state after the refused upgrade"
fi
started=$(date +%s%N)
kill -KILL "$pid"
wait_exit "$pid" 10
rc=0
timeout 10 dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none 2>"$dir/err" || rc=$?
ms=$((($(date +%s%N) - started) / 1000000))
((rc != 0 && rc != 124)) || fail "a read with the server dead: status $rc, expected an I/O error at once"
((ms < 1000)) || fail "the read failed only $ms ms after the kill"
expect_eq "$(list_field "$id" state)" "fail-io,server-dead" "state in ublk list"
echo "ok: a read failed $ms ms after the kill: $(cat "$dir/err"); ublk list says fail-io"

expect_eq "$(timeout 60 "$UBLK" recover --id "$id")" "$dev" "what ublk recover printed"
expect_eq "$(list_field "$id" state)" live "state after recover"
cmp <(dd if="$dev" bs=1M count=8 iflag=direct status=none) "$dir/pattern" || fail "the data written before the kill reads back wrong"
echo "ok: recovered; the data written before the kill reads back"
