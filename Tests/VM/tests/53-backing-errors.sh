#!/bin/bash
# 53-backing-errors — a backing that fails some sectors: a device-mapper table of
# linear (a loop device of a file) / error (1 MiB at 16 MiB) / linear again, given
# to `ublk add --file /dev/mapper/X`. Reads and writes of the error range fail with
# an I/O error, the sectors around it keep working (and hold the right data), the
# server keeps serving, and its log (/run/ublk/server.log) names each failed request
# exactly once (operation, sectors, error). A backing that shrinks under the device
# fails reads past its new end with EIO, as loop does.
# timeout: 200
. "$(dirname "$0")/../lib.sh"
need_ublk

dir=$(mktempdir)
name=ublk-test-errors-$$
img=$dir/backing.img
head -c 64M /dev/urandom >"$img"
loopdev=$(loop_device "$img")
# Sectors: [0, 32768) linear, [32768, 34816) error, [34816, 131072) linear.
dm_device "$name" "0 32768 linear $loopdev 0
32768 2048 error
34816 96256 linear $loopdev 34816"
at_exit "$UBLK" del --all # (exit commands run last first: the device goes before its backing)
backing=/dev/mapper/$name
expect_eq "$(blockdev --getsize64 "$backing")" $((64 << 20)) "size of $backing"

log=/run/ublk/server.log
mkdir -p /run/ublk
touch "$log"
log_start=$(($(wc -l <"$log") + 1))
new_log() { tail -n +"$log_start" "$log"; }

dev=$("$UBLK" add --file "$backing" --queues 2)
id=${dev#/dev/ublkb}
pid=$("$UBLK" list --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["pid"])')

# read_at SECTOR COUNT [dd options]: read COUNT sectors at SECTOR with O_DIRECT, in one
# read (one request, as long as it is at most 512 KiB).
read_at() { dd if="$dev" bs=$(($2 * 512)) skip=$(($1 * 512)) count=1 iflag=direct,skip_bytes status=none "${@:3}"; }

# The error range fails, once per request, with EIO; each failure is logged once.
for sector in 32768 33000 34808; do
	if read_at "$sector" 8 of=/dev/null 2>"$dir/err"; then
		fail "reading sectors $sector+8 (in the error range) succeeded"
	fi
	grep -q "Input/output error" "$dir/err" || fail "reading sectors $sector+8 failed, but not with EIO: $(cat "$dir/err")"
done
if dd if=/dev/zero of="$dev" bs=4k seek=$((33280 / 8)) count=1 oflag=direct status=none 2>"$dir/err"; then
	fail "writing sectors 33280+8 (in the error range) succeeded"
fi
grep -q "Input/output error" "$dir/err" || fail "writing into the error range failed, but not with EIO: $(cat "$dir/err")"
echo "ok: reads and writes of the error range fail with EIO"

# Right next to the range, and far from it, everything works and reads what the file holds.
for range in "32760 8" "34816 8" "0 2048" "100000 4096"; do
	read -r sector count <<<"$range"
	cmp <(read_at "$sector" "$count") <(dd if="$img" bs=512 skip="$sector" count="$count" status=none) ||
		fail "sectors $sector+$count (outside the error range) do not read back what the file holds"
done
head -c 1M /dev/urandom >"$dir/new"
dd if="$dir/new" of="$dev" bs=1M seek=40 oflag=direct status=none || fail "writing 1 MiB at 40 MiB failed"
cmp <(dd if="$dev" bs=1M skip=40 count=1 iflag=direct status=none) "$dir/new" || fail "1 MiB written at 40 MiB reads back wrong"
fio --name=after --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k-64k --iodepth=16 \
	--offset=20M --size=20M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --minimal >"$dir/fio.out" 2>&1 ||
	{ cat "$dir/fio.out"; fail "fio verify outside the error range failed after the errors"; }
kill -0 "$pid" || fail "the server (pid $pid) died after the I/O errors"
expect_eq "$("$UBLK" list --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["state"])')" live "device state"
echo "ok: outside the error range everything works; the server (pid $pid) still serves $dev"

# The log: each failed request named exactly once, with operation, sectors and error.
sync
new_log | grep -E 'failed|error' || true
for request in "read of sectors 32768+8" "read of sectors 33000+8" "read of sectors 34808+8" "write of sectors 33280+8"; do
	count=$(new_log | grep -c "$request failed: Input/output error" || true)
	expect_eq "$count" 1 "log lines for the failed request '$request'"
done
unexpected=$(new_log | grep -E 'error|failed' | grep -vE 'of sectors (32768|33000|34808|33280)\+8 failed: Input/output error' || true)
[[ -z $unexpected ]] || fail "unexpected errors in the server log: $unexpected"
echo "ok: $log names each of the 4 failed requests once"

"$UBLK" del --id "$id"
wait_gone "$dev" 10
echo "ok: the device is deleted cleanly after the errors"

# A backing whose first block fails: the device never reads, so `ublk add` fails in one
# line (after its few seconds of retries) and leaves no device, rather than printing a
# device path that then goes away.
bad=ublk-test-head-errors-$$
dm_device "$bad" "0 2048 error
2048 129024 linear $loopdev 2048"
expect_error "a backing whose first block fails" "not readable" -- "$UBLK" add --file "/dev/mapper/$bad"
fail_on_problems "with a failing first block"
echo "ok: a backing whose first block fails: $(cat "$EXPECT_DIR/err")"

# A server added from a shell with a file-size limit (ulimit -f, 16 MiB here) writes its
# backing without it, as the kernel's loop driver does: a write at 40 MiB succeeds and
# the server lives on (it was killed by SIGXFSZ, the device left dead).
limited=$dir/limited.img
truncate -s 64M "$limited"
dev=$(bash -c 'ulimit -f 16384; exec "$@"' ublk "$UBLK" add --file "$limited" 2>"$dir/err") ||
	fail "ublk add under ulimit -f: $(cat "$dir/err")"
id=${dev#/dev/ublkb}
head -c 1M /dev/urandom >"$dir/chunk"
dd if="$dir/chunk" of="$dev" bs=1M seek=40 count=1 oflag=direct status=none ||
	fail "a write at 40 MiB through a device added under ulimit -f 16 MiB failed"
cmp <(dd if="$limited" bs=1M skip=40 count=1 status=none) "$dir/chunk" || fail "the write at 40 MiB is not in the backing"
expect_eq "$(list_field "$id" state)" live "state of the device added under ulimit -f after the write"
"$UBLK" del --id "$id"
echo "ok: a device added under ulimit -f 16 MiB writes at 40 MiB, and lives on"

# A backing that shrinks under the device: as with a loop device, a read past its new
# end fails with an I/O error (no zeros the file does not hold), a read before it works,
# and the server lives on.
shrunk=$dir/shrunk.img
head -c 16M /dev/urandom >"$shrunk"
dev=$("$UBLK" add --file "$shrunk") || fail "ublk add of the file to shrink"
id=${dev#/dev/ublkb}
truncate -s 8M "$shrunk"
dd if="$dev" of=/dev/null bs=4k count=1 skip=3000 iflag=direct status=none 2>"$dir/shrunk.err" &&
	fail "a read past the end of a backing truncated to 8 MiB succeeded"
grep -q "Input/output error" "$dir/shrunk.err" || fail "a read past the end of the shrunk backing said: $(cat "$dir/shrunk.err")"
cmp <(dd if="$dev" bs=4k count=1 skip=100 iflag=direct status=none) <(dd if="$shrunk" bs=4k count=1 skip=100 status=none) ||
	fail "a read before the end of the shrunk backing has other data"
# A read across the new end, which is inside a block: it fails too, zero copy or not (with
# zero copy ublk_drv ends a request whole on a partial result: the server must fail it).
truncate -s $((8 * 1048576 + 1000)) "$shrunk"
dd if="$dev" of="$dir/across" bs=64k count=1 skip=128 iflag=direct status=none 2>"$dir/shrunk.err" &&
	fail "a read across the end of a backing truncated to 8 MiB + 1000 succeeded ($(list_field "$id" dataPath)): $(cmp "$dir/across" <(head -c 65536 /dev/zero) && echo zeros)"
grep -q "Input/output error" "$dir/shrunk.err" || fail "a read across the end of the shrunk backing said: $(cat "$dir/shrunk.err")"
expect_eq "$(list_field "$id" state)" live "state of the device whose backing shrank"
path=$(list_field "$id" dataPath)
"$UBLK" del --id "$id"
echo "ok: a read past or across the end of a backing that shrank under the device failed with EIO, as with loop ($path data path)"
