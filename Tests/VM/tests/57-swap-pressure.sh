#!/bin/bash
# 57-swap-pressure — swap on a ublk device under memory pressure: a program that wants
# more than memory and swap together is killed by the OOM killer, as with a loop device,
# and swapoff then works; the machine does not freeze. The server and the program share
# a memory cgroup (256 MiB), so the kernel reclaims the server's memory too: a server
# whose pages could be swapped out to its own device would wait for itself.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
[[ -e /sys/fs/cgroup/cgroup.controllers ]] || { echo "SKIP: needs cgroup v2"; exit 77; }
grep -qw memory /sys/fs/cgroup/cgroup.controllers || { echo "SKIP: needs the memory controller"; exit 77; }

dir=$(mktempdir)
truncate -s 256M "$dir/swap.img"
group=/sys/fs/cgroup/ublk-swap-test
echo +memory >/sys/fs/cgroup/cgroup.subtree_control
mkdir -p "$group"
at_exit rmdir "$group"
echo 256M >"$group/memory.max"
# The server is started from inside the group, and stays in it.
dev=$(bash -c "echo \$\$ >$group/cgroup.procs && exec $UBLK add --file $dir/swap.img --direct-io on")
at_exit "$UBLK" del --all --force
at_exit bash -c "swapoff $dev 2>/dev/null"
pid=$(list_field "${dev#/dev/ublkb}" pid)
grep -qx "0::/ublk-swap-test" "/proc/$pid/cgroup" || fail "the server is not in the test's group: $(cat "/proc/$pid/cgroup")"
mkswap -q "$dev"
swapon "$dev"
start=$SECONDS
rc=0
bash -c "echo \$\$ >$group/cgroup.procs && exec timeout -k 5 150 python3 -c '
a = [bytearray(b\"\\x01\") * (1 << 20) for i in range(700)]
print(\"allocated\", len(a), \"MiB\")'" || rc=$?
expect_oom_killed "$rc" "$start" "$pid" "$dev"
echo "ok: 700 MiB in a 256 MiB group with 256 MiB of ublk swap: the program was OOM-killed after $((SECONDS - start)) s, the server lived, swapoff worked"
