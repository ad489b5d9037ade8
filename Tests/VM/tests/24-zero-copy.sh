#!/bin/bash
# 24-zero-copy — requests' pages go straight to the backing file (UBLK_F_AUTO_BUF_REG).
# Where the kernel lacks the feature: `--zero-copy on` is refused in one line and leaves
# no device; the default (auto) silently copies. Where it has it: the default uses zero
# copy, `ublk list` says so (and `--zero-copy off` gives copy), its request buffers are
# 512-byte aligned (dma_alignment 511, as loop's), the null target takes it (and a direct
# read of it returns zeros in the reader's pages),
# and the mount test and the fio integrity load (direct I/O on and off, 1 and 2 queues)
# pass with `--zero-copy on`.
# timeout: 600
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
truncate -s 64M "$dir/disk.img"

data_path() { list_field "${1#/dev/ublkb}" dataPath; }

if ! has_feature AUTO_BUF_REG; then
	expect_error "--zero-copy on without AUTO_BUF_REG" 'UBLK_F_AUTO_BUF_REG.*--zero-copy auto or off' -- \
		"$UBLK" add --file "$dir/disk.img" --zero-copy on
	fail_on_problems "refusing zero copy"
	dev=$("$UBLK" add --file "$dir/disk.img")
	expect_eq "$(data_path "$dev")" copy "data path of the default device"
	"$UBLK" list | grep -q " copy " || fail "ublk list does not show the copy data path"
	"$UBLK" del --id "${dev#/dev/ublkb}"
	echo "ok: --zero-copy on refused in one line, no device left; auto copies"
	need_feature AUTO_BUF_REG
fi

dev=$("$UBLK" add --file "$dir/disk.img")
expect_eq "$(data_path "$dev")" zero-copy "data path of the default device"
# The reader's pages go to the backing as they are: aligned as for loop (512 bytes), which
# an O_DIRECT backing accepts, not ublk_drv's default 4.
align=/sys/block/${dev#/dev/}/queue/dma_alignment
[[ ! -r $align ]] || expect_eq "$(cat "$align")" 511 "dma_alignment of a zero-copy device"
"$UBLK" list | grep -q " zero-copy " || fail "ublk list does not show the zero-copy data path"
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("$UBLK" add --file "$dir/disk.img" --zero-copy off)
expect_eq "$(data_path "$dev")" copy "data path with --zero-copy off"
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("$UBLK" add --target null --size 64M --zero-copy on)
expect_eq "$(data_path "$dev")" zero-copy "data path of the null target"
dd if="$dev" of=/dev/null bs=1M count=16 iflag=direct status=none || fail "reading the zero-copy null device failed"
# A direct read lands in the reader's own pages: they must come back zeroed, not as they were.
python3 -c '
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
buf.write(b"\xaa" * (1 << 20))
sys.exit(0 if os.preadv(fd, [buf], 4096) == 1 << 20 and buf[:] == bytes(1 << 20) else 1)
' "$dev" || fail "a direct read of the zero-copy null device did not return zeros"
dd if=/dev/zero of="$dev" bs=1M count=16 oflag=direct status=none || fail "writing the zero-copy null device failed"
"$UBLK" del --id "${dev#/dev/ublkb}"
echo "ok: default and --zero-copy on use zero copy, off copies, the null target takes it"

export UBLK_TEST_ADD_ARGS="--zero-copy on"
bash "$(dirname "$0")/10-loop-mount.sh" || fail "the mount test failed with --zero-copy on"
UBLK_TEST_LOAD_ONLY=1 bash "$(dirname "$0")/50-integrity-load.sh" || fail "the fio integrity load failed with --zero-copy on"
echo "ok: mount test and fio verify (direct I/O on/off, 1 and 2 queues) with --zero-copy on"
