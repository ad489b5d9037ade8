#!/bin/bash
# 00-vm-sanity — the test VM is usable: ublk driver present, the project's
# release binary runs, /scratch is a writable ext4 with O_DIRECT and
# fallocate, and the tools the other tests use are there.
# timeout: 120
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"

echo "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"

# The ublk driver (ublk_drv is loaded by the VM's init).
[[ -c /dev/ublk-control ]] || fail "/dev/ublk-control is missing (ublk_drv not loaded?)"
grep -qw '^ublk_drv' /proc/modules || fail "ublk_drv is not listed in /proc/modules"
[[ -f $UBLK_VM_MODULES/ublk_drv.ko ]] || fail "no ublk_drv.ko in UBLK_VM_MODULES=$UBLK_VM_MODULES"
echo "ok: /dev/ublk-control, ublk_drv.ko in $UBLK_VM_MODULES"

# null_blk is loaded without devices; loop and device-mapper are there.
[[ ! -e /dev/nullb0 ]] || fail "/dev/nullb0 exists: null_blk should load with nr_devices=0"
[[ -c /dev/loop-control ]] || fail "/dev/loop-control is missing"
[[ -c /dev/mapper/control ]] || fail "/dev/mapper/control is missing"
echo "ok: null_blk (no devices), loop, device-mapper"

# The project's freshly built binary.
[[ -x $UBLK ]] || fail "the project binary $UBLK is missing (run: swift build -c release)"
"$UBLK" --help >/dev/null || fail "$UBLK --help exited with $?"
echo "ok: $UBLK --help"

# /scratch: ext4, writable, O_DIRECT and fallocate.
fstype=$(findmnt -n -o FSTYPE --target "$SCRATCH")
expect_eq "$fstype" ext4 "file system of $SCRATCH"
dir=$(mktempdir)
dd if=/dev/urandom of="$dir/data" bs=1M count=4 oflag=direct status=none || fail "O_DIRECT write failed"
dd if="$dir/data" of=/dev/null bs=1M iflag=direct status=none || fail "O_DIRECT read failed"
fallocate -l 64M "$dir/falloc" || fail "fallocate failed"
expect_eq "$(stat -c %s "$dir/falloc")" $((64 << 20)) "fallocated size"
echo "ok: $SCRATCH is ext4, writable, O_DIRECT and fallocate work"

# Tools.
for tool in fio mkfs.ext4 dmsetup losetup blockdev; do
	command -v "$tool" >/dev/null || fail "$tool is not installed on the host"
done
echo "ok: $(fio --version), $(mkfs.ext4 -V 2>&1 | head -n 1)"
