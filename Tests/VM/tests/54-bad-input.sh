#!/bin/bash
# 54-bad-input — every mistake gets ONE line on stderr that says what to do, a
# non-zero exit status, no Swift crash or backtrace, and leaves no device behind
# (no /dev/ublkb*, /dev/ublkc*, nothing in `ublk list`): missing, unreadable
# (root reads anything, so root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH;
# a non-root user is told to run as root before the backing is looked at),
# directory and empty backing files;
# --offset beyond the file, --size less than a block, either not whole bytes (1.1K)
# (an odd --offset or --size is taken as losetup takes it: the data at that byte,
# a limit rounded down to whole blocks and said; 1MB is 10^6 bytes); --depth 0
# and 4097; --queues 0; --block-size 3000 and 8192; --direct-io bogus; an --id
# already in use (the device using it survives); ublk_drv not loaded; not root;
# del/recover of ids that do not exist; config files missing, a directory or
# endless (/dev/zero), and read from standard input or <(...). Every case runs, then all failures are listed.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
chmod 755 "$dir"
shopt -s nullglob

truncate -s 64M "$dir/ok.img"
mkdir "$dir/adir"
: >"$dir/empty.img"
truncate -s 64M "$dir/secret.img"
chmod 000 "$dir/secret.img"
chmod 644 "$dir/ok.img"
truncate -s 64M "$dir/readonly.img"
chmod 444 "$dir/readonly.img"

# Backing files.
expect_error "missing backing file" "does not exist.*(create|truncate)" -- "$UBLK" add --file "$dir/nope.img"
expect_error "unreadable backing file (root without DAC override)" "not readable.*permission" --no-dac -- "$UBLK" add --file "$dir/secret.img"
expect_error "unreadable backing file, --foreground" "not readable.*permission" --no-dac -- "$UBLK" add --file "$dir/secret.img" --foreground
# A write-protected backing with --no-read-only (a writable device or none): refused.
for dio in on auto; do
	expect_error "write-protected backing file, --no-read-only, --direct-io $dio (root without DAC override)" \
		"asks for a writable device" --no-dac -- "$UBLK" add --file "$dir/readonly.img" --direct-io "$dio" --no-read-only
done
# Without it, as losetup: a read-only device, said in one line.
dev=$(setpriv --bounding-set=-dac_override,-dac_read_search "$UBLK" add --file "$dir/readonly.img" 2>"$dir/err") ||
	fail "ublk add of a write-protected backing (root without DAC override): $(cat "$dir/err")"
grep -qF "cannot be written (Permission denied): the device is read-only" "$dir/err" ||
	fail "ublk add of a write-protected backing said: $(cat "$dir/err")"
expect_eq "$(blockdev --getro "$dev")" 1 "read-only flag of the device over a write-protected backing"
"$UBLK" del "$dev"
echo "ok: a write-protected backing made a read-only device: $(cat "$dir/err")"
expect_error "unreadable backing file as uid 65534" "root" --as-nobody -- "$UBLK" add --file "$dir/secret.img"
expect_error "directory as backing" "directory.*(regular file|block device)" -- "$UBLK" add --file "$dir/adir"
expect_error "zero-length backing file" "empty.*(truncate|size)" -- "$UBLK" add --file "$dir/empty.img"

# Sizes and offsets.
expect_error "--size less than a block" "less than one 512-byte block" -- "$UBLK" add --file "$dir/ok.img" --size 100
# As losetup: a limit that is not whole blocks is rounded down (and said), and any offset
# is taken, buffered (said too), the device's data starting at that very byte.
dev=$("$UBLK" add --file "$dir/ok.img" --size 1000 2>"$dir/round.err") || fail "--size 1000 was refused: $(cat "$dir/round.err")"
expect_eq "$(blockdev --getsize64 "$dev")" 512 "size of a device with --size 1000"
grep -qF -- "--size 1000 is not a whole number of 512-byte blocks: the device has 512 bytes" "$dir/round.err" ||
	fail "no note of the rounded limit: $(cat "$dir/round.err")"
"$UBLK" del "$dev"
printf 'odd offset marker' | dd of="$dir/ok.img" bs=1 seek=1000 conv=notrunc status=none
dev=$("$UBLK" add --file "$dir/ok.img" --offset 1000 2>"$dir/offset.err") || fail "--offset 1000 was refused: $(cat "$dir/offset.err")"
expect_eq "$(head -c 17 "$dev")" "odd offset marker" "first bytes of a device at --offset 1000"
expect_eq "$(blockdev --getsize64 "$dev")" $(((64 << 20) - 1000 - 24)) "size of a device at --offset 1000"
printf 'written through' | dd of="$dev" bs=512 seek=1 conv=sync,fsync status=none
expect_eq "$(dd if="$dir/ok.img" bs=1 skip=1512 count=15 status=none)" "written through" "backing bytes at 1000 + 512"
grep -q "offset 1000: using buffered I/O" "$dir/offset.err" || grep -q "O_DIRECT" "$dir/offset.err" ||
	fail "no note of buffered I/O at an odd offset: $(cat "$dir/offset.err")"
"$UBLK" del "$dev"
expect_error "--offset 1000 --direct-io on" "alignment.*offset 1000" -- "$UBLK" add --file "$dir/ok.img" --offset 1000 --direct-io on
echo "ok: --size 1000 and --offset 1000 taken as losetup takes them"
expect_error "--offset beyond the file" "beyond the end" -- "$UBLK" add --file "$dir/ok.img" --offset 64M
# A --size beyond the file is a limit, as losetup's --sizelimit: the device ends with the file.
dev=$("$UBLK" add --file "$dir/ok.img" --offset 32M --size 48M 2>"$dir/limit.err") || fail "--size beyond the file was refused"
expect_eq "$(blockdev --getsize64 "$dev")" $((32 << 20)) "size of a device whose --size goes beyond the file"
grep -q "more than .* holds after the offset: the device has 33554432 bytes" "$dir/limit.err" || fail "no note of the limit: $(cat "$dir/limit.err")"
"$UBLK" del "$dev"
dev=$("$UBLK" add --file "$dir/ok.img" --block-size 4096 --size 6144 2>/dev/null) || fail "--block-size 4096 --size 6144 was refused"
expect_eq "$(blockdev --getsize64 "$dev")" 4096 "size of a device with --block-size 4096 --size 6144"
"$UBLK" del "$dev"
expect_error "null target --size 1000" "multiple of the block size" -- "$UBLK" add --target null --size 1000
# MB is 10^6 bytes, as losetup reads it (util-linux strtosize): no multiple of 512.
dev=$("$UBLK" add --file "$dir/ok.img" --offset 1MB 2>/dev/null) || fail "--offset 1MB was refused"
expect_eq "$(blockdev --getsize64 "$dev")" $((((64 << 20) - 1000000) / 512 * 512)) "size of a device at --offset 1MB"
"$UBLK" del "$dev"
expect_error "--size 1.1K" "whole number of bytes" -- "$UBLK" add --file "$dir/ok.img" --size 1.1K

# Queue shape and other options.
expect_error "--depth 0" "depth.*(1 to 4096)" -- "$UBLK" add --file "$dir/ok.img" --depth 0
expect_error "--depth 4097" "depth.*(1 to 4096)" -- "$UBLK" add --file "$dir/ok.img" --depth 4097
expect_error "--queues 0" "queues.*(1 or more|give)" -- "$UBLK" add --file "$dir/ok.img" --queues 0
expect_error "--block-size 3000" "512, 1024, 2048 or 4096" -- "$UBLK" add --file "$dir/ok.img" --block-size 3000
expect_error "--block-size 8192" "512, 1024, 2048 or 4096" -- "$UBLK" add --file "$dir/ok.img" --block-size 8192
expect_error "--direct-io bogus" "on.*off.*auto" -- "$UBLK" add --file "$dir/ok.img" --direct-io bogus
expect_error "--size bogus" "size" -- "$UBLK" add --file "$dir/ok.img" --size 12Q
expect_error "no --file" "--file" -- "$UBLK" add
expect_error "--foreground with a missing file" "does not exist" -- "$UBLK" add --file "$dir/nope.img" --foreground

# An id already in use: refused, and the device that has it is untouched.
dev=$("$UBLK" add --file "$dir/ok.img" --id 7)
expect_eq "$dev" /dev/ublkb7 "device added with --id 7"
pid=$("$UBLK" list --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["pid"])')
# (Another backing file: ok.img itself is refused earlier, as served read-write by device 7.)
truncate -s 64M "$dir/other.img"
KEEP_ID=7 expect_error "--id already in use" "already in use.*(another --id|leave it out)" -- "$UBLK" add --file "$dir/other.img" --id 7
KEEP_ID=7 expect_error "--id already in use, --foreground" "already in use" -- "$UBLK" add --file "$dir/other.img" --id 7 --foreground
[[ -b /dev/ublkb7 ]] && kill -0 "$pid" || problem "--id already in use: the device that had id 7 (pid $pid) is gone"
dd if=/dev/ublkb7 of=/dev/null bs=4k count=16 iflag=direct status=none || problem "--id already in use: /dev/ublkb7 no longer reads"
"$UBLK" del --id 7
wait_gone /dev/ublkb7 10

# Config files that cannot be: one line, "create it" only for a missing one.
expect_error "--config of a missing file" "does not exist: create it" -- "$UBLK" add --config "$dir/nope.conf"
expect_error "--config of a directory" "is a directory" -- "$UBLK" add --config "$dir/adir"
expect_error "--config /dev/zero" "more than 1 MiB" -- "$UBLK" add --config /dev/zero
# ...and pipes are read: standard input, and a process substitution.
dev=$(printf 'file = %s\n' "$dir/ok.img" | "$UBLK" add --config /dev/stdin) || problem "--config /dev/stdin failed"
[[ -b $dev ]] && "$UBLK" del --id "${dev#/dev/ublkb}" || problem "--config /dev/stdin made no device"
dev=$("$UBLK" add --config <(printf 'target = null\nsize = 16M\n')) || problem "--config <(...) failed"
[[ -b $dev ]] && "$UBLK" del --id "${dev#/dev/ublkb}" || problem "--config <(...) made no device"

# Ids that do not exist.
expect_error "del --id 99" "does not exist.*ublk list" -- "$UBLK" del --id 99
expect_error "recover --id 99" "does not exist.*ublk list" -- "$UBLK" recover --id 99
expect_error "recover --id 99 --foreground" "does not exist.*ublk list" -- "$UBLK" recover --id 99 --foreground

# Not root: told to run as root (and nothing half-made).
expect_error "add as uid 65534" "root" --as-nobody -- "$UBLK" add --file "$dir/ok.img"
expect_error "add --foreground as uid 65534" "root" --as-nobody -- "$UBLK" add --file "$dir/ok.img" --foreground
expect_error "list as uid 65534" "root" --as-nobody -- "$UBLK" list
expect_error "del as uid 65534" "root" --as-nobody -- "$UBLK" del --id 0

# The driver not loaded: told to modprobe it.
rmmod ublk_drv || fail "cannot rmmod ublk_drv (devices left?)"
at_exit sh -c 'grep -qw ^ublk_drv /proc/modules || insmod "$UBLK_VM_MODULES/ublk_drv.ko"'
expect_error "ublk_drv not loaded: add" "modprobe ublk_drv" -- "$UBLK" add --file "$dir/ok.img"
expect_error "ublk_drv not loaded: add --foreground" "modprobe ublk_drv" -- "$UBLK" add --file "$dir/ok.img" --foreground
expect_error "ublk_drv not loaded: list" "modprobe ublk_drv" -- "$UBLK" list
expect_error "ublk_drv not loaded: del" "modprobe ublk_drv" -- "$UBLK" del --id 0
insmod "$UBLK_VM_MODULES/ublk_drv.ko"
_wait_until 10 -c /dev/ublk-control || fail "/dev/ublk-control did not come back after insmod"

# And after all that, a good add still works.
dev=$("$UBLK" add --file "$dir/ok.img" --offset 0x100000 --size 1.5M) || fail "a valid ublk add failed after the bad ones"
expect_eq "$(list_field "${dev#/dev/ublkb}" offset)/$(list_field "${dev#/dev/ublkb}" size)" "1048576/1572864" "--offset 0x100000 --size 1.5M"
"$UBLK" del --id "${dev#/dev/ublkb}"

fail_on_problems "with bad input"
echo "ok: every bad input got one line, a non-zero status and left no device"
