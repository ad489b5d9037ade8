#!/bin/bash
# 25-batch-io — requests arrive and are committed in batches (UBLK_F_BATCH_IO: PREP_IO_CMDS,
# multishot FETCH_IO_CMDS, COMMIT_IO_CMDS). Where the kernel lacks the feature: `--batch-io on`
# is refused in one line and leaves no device; the default (auto) sends one command per
# request. Where it has it: the default batches, `ublk list --json` says so (`--batch-io off` gives
# per-request), the null target takes it, and the mount test and the fio integrity load
# (direct I/O on and off, 1 and 2 queues) pass batched in both data paths (zero copy, where
# each element names a registered buffer, and copy, where each carries the tag's buffer).
# timeout: 900
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
truncate -s 64M "$dir/disk.img"

commands() { list_field "${1#/dev/ublkb}" commands; }

if ! has_feature BATCH_IO; then
	expect_error "--batch-io on without BATCH_IO" 'UBLK_F_BATCH_IO.*--batch-io auto or off' -- \
		"$UBLK" add --file "$dir/disk.img" --batch-io on
	fail_on_problems "refusing batched commands"
	dev=$("$UBLK" add --file "$dir/disk.img")
	expect_eq "$(commands "$dev")" per-request "commands of the default device"
	"$UBLK" del --id "${dev#/dev/ublkb}"
	echo "ok: --batch-io on refused in one line, no device left; auto sends a command per request"
	need_feature BATCH_IO
fi

dev=$("$UBLK" add --file "$dir/disk.img")
expect_eq "$(commands "$dev")" batched "commands of the default device"
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("$UBLK" add --file "$dir/disk.img" --batch-io off)
expect_eq "$(commands "$dev")" per-request "commands with --batch-io off"
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("$UBLK" add --target null --size 64M --batch-io on --depth 256)
expect_eq "$(commands "$dev")" batched "commands of the null target"
fio --name=null --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=256 \
	--size=64M --io_size=128M --minimal >"$dir/fio.out" 2>&1 || { cat "$dir/fio.out"; fail "fio at depth 256 on the batched null device failed"; }
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("$UBLK" add --file "$dir/disk.img" --depth 1)
expect_eq "$(commands "$dev")" per-request "commands of a device of depth 1"
"$UBLK" del --id "${dev#/dev/ublkb}"
expect_error "--batch-io on --depth 1" 'depth of at least 2' -- "$UBLK" add --file "$dir/disk.img" --batch-io on --depth 1
fail_on_problems "refusing a batched queue of depth 1"
echo "ok: default and --batch-io on batch, off does not, the null target takes 256 requests in flight; depth 1 is per-request"

# Devices that may be upgraded in place (--recovery) stay per-request by default; a batched
# one is refused by ublk upgrade in one line and keeps its server. Crash recovery works batched.
dev=$("$UBLK" add --file "$dir/disk.img" --recovery)
expect_eq "$(commands "$dev")" per-request "commands of a --recovery device"
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("$UBLK" add --file "$dir/disk.img" --recovery --batch-io on)
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
KEEP_ID=$id expect_error "ublk upgrade of a batched device" 'batched I/O commands.*--batch-io off' -- "$UBLK" upgrade --id "$id"
expect_eq "$(list_field "$id" pid)/$(list_field "$id" state)" "$pid/live" "server and state after the refused upgrade"
head -c 1M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$dev" bs=1M oflag=direct status=none
kill -KILL "$pid"
wait_exit "$pid" 10
expect_eq "$(timeout 60 "$UBLK" recover --id "$id")" "$dev" "ublk recover of a batched device"
expect_eq "$(commands "$dev")" batched "commands after recovery"
cmp <(dd if="$dev" bs=1M count=1 iflag=direct status=none) "$dir/pattern" || fail "the batched device reads wrong after recovery"
"$UBLK" del --id "$id"
fail_on_problems "with batched --recovery devices"
echo "ok: --recovery devices are per-request by default; a batched one refuses ublk upgrade, and recovers after a crash"

for data in "--zero-copy auto" "--zero-copy off"; do
	export UBLK_TEST_ADD_ARGS="--batch-io on $data"
	bash "$(dirname "$0")/10-loop-mount.sh" || fail "the mount test failed with $UBLK_TEST_ADD_ARGS"
	UBLK_TEST_LOAD_ONLY=1 bash "$(dirname "$0")/50-integrity-load.sh" || fail "the fio integrity load failed with $UBLK_TEST_ADD_ARGS"
	echo "ok: mount test and fio verify (direct I/O on/off, 1 and 2 queues) with $UBLK_TEST_ADD_ARGS"
done
