# shellcheck shell=bash
# lib.sh — sourced by the VM tests (Tests/VM/tests/*.sh):
#
#   . "$(dirname "$0")/../lib.sh"
#
# Gives: PROJECT (the project dir), UBLK (the release binary), and
#   fail MSG                       print "FAIL: MSG" and exit 1
#   need_ublk                      fail unless $UBLK is built
#   expect_eq ACTUAL EXPECTED WHAT fail unless equal
#   wait_for_path PATH [SECS]      wait (default 10 s) until PATH exists
#   wait_gone PATH [SECS]          wait (default 10 s) until PATH is gone
#   wait_port PORT [SECS [LOG]]    wait (default 10 s) until 127.0.0.1:PORT accepts;
#                                  on failure LOG (the server's) is shown
#   need_loopback                  bring up lo (the guest starts without it) for local servers
#   mktempdir                      new dir /scratch/ublk-test.XXXXXX; at exit
#                                  what is mounted in it is unmounted, then
#                                  the at_exit commands run, then it goes
#   at_exit CMD...                 run CMD at exit (last registered first);
#                                  use it instead of "trap ... EXIT"
#   sha FILE                       sha256 of FILE (hex only)
#   ext4_through DEV ID IMAGE DIR  mkfs.ext4 on DEV (device ID), mount, write files,
#                                  unmount, ublk del; then IMAGE (what DEV was backed
#                                  by) must pass e2fsck and hold the same files (debugfs)
#   list_field ID NAME             field NAME of device ID in `ublk list --json`
#                                  (empty if there is no such device)
#   wait_exit PID SECS             wait until PID (not our child) is gone or a zombie
#   loop_device FILE               a kernel loop device of FILE, detached at exit; prints its path
#   dm_device NAME TABLE           device-mapper device /dev/mapper/NAME from TABLE (dmsetup's
#                                  lines), its node made without udev, removed at exit
#   has_feature NAME               does the kernel report UBLK_F_NAME (GET_FEATURES)?
#   need_feature NAME...           print "SKIP: needs UBLK_F_NAME" and exit 77
#                                  (the suite counts it as skipped) unless the
#                                  kernel reports every one of them
# and, for tests of bad input (note problems, go on, fail at the end):
#   problem MSG                    note a problem
#   fail_on_problems WHAT          fail if any problem was noted ("N problem(s) WHAT")
#   no_device_left WHAT [ID]       note a problem if any ublk device but ID exists
#   expect_error WHAT PATTERN [--as-nobody|--no-dac] -- COMMAND...
#                                  COMMAND must fail with ONE line on stderr that
#                                  matches PATTERN (an extended regex: what to do),
#                                  print nothing on stdout, not crash, and leave
#                                  no device (but the one with id $KEEP_ID, if set);
#                                  its output stays in $EXPECT_DIR/out and /err
# and sets "set -euo pipefail".
set -euo pipefail

PROJECT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
UBLK=$PROJECT/.build/release/ublk
SCRATCH=${UBLK_SCRATCH:-/scratch}

fail() {
	echo "FAIL: $*" >&2
	exit 1
}

need_ublk() {
	[[ -x $UBLK ]] || fail "$UBLK is missing (build it first: swift build -c release)"
}

expect_eq() {
	[[ $1 == "$2" ]] || fail "${3:-value}: expected '$2', got '$1'"
}

# _wait_until SECS TEST-ARGS...: poll every 0.1 s until "test ARGS" holds.
_wait_until() {
	local deadline=$((SECONDS + $1))
	shift
	until test "$@"; do
		((SECONDS < deadline)) || return 1
		sleep 0.1
	done
}
wait_for_path() { _wait_until "${2:-10}" -e "$1" || fail "$1 did not appear within ${2:-10} s"; }
wait_gone() { _wait_until "${2:-10}" ! -e "$1" || fail "$1 still exists after ${2:-10} s"; }
need_loopback() {
	ip link set lo up || fail "cannot bring up the loopback interface"
}
wait_port() {
	local deadline=$((SECONDS + ${2:-10}))
	until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
		((SECONDS < deadline)) || fail "nothing listens on 127.0.0.1:$1 after ${2:-10} s${3:+: $(cat "$3" 2>&1)}"
		sleep 0.1
	done
}

# nbdkit serving IMAGE (file plugin) on 127.0.0.1:10809, its pid in $server (and in
# IMAGE.nbdkit.pid, which the exit command reads: a server started again is killed too).
start_nbdkit() {
	nbdkit -f -i 127.0.0.1 -p 10809 file "$1" 2>>"$1.nbdkit.log" &
	server=$!
	[[ -e $1.nbdkit.pid ]] || at_exit bash -c "kill \$(cat '$1.nbdkit.pid') 2>/dev/null"
	echo "$server" >"$1.nbdkit.pid"
	wait_port 10809 10 "$1.nbdkit.log"
}

# Kills the NBD server $server, then starts a direct read of DEVICE that waits for it
# (its pid in $reader, its stderr in ERRFILE), and checks after 2 s that it still waits.
read_waiting_for_server() {
	kill -9 "$server"
	wait "$server" 2>/dev/null || true
	dd if="$1" of=/dev/null bs=4k count=1 skip=300 iflag=direct 2>"$2" &
	reader=$!
	sleep 2
	kill -0 "$reader" 2>/dev/null || fail "the read did not wait for the server: $(cat "$2")"
}

# The dirs and exit commands are listed in files, so mktempdir works inside
# $(...) subshells too ($$ is the test's pid there as well).
_LIB_DIRS=/tmp/.ublk-lib-dirs.$$
_LIB_AT_EXIT=/tmp/.ublk-lib-at-exit.$$

mktempdir() {
	local dir
	dir=$(mktemp -d "$SCRATCH/ublk-test.XXXXXX")
	echo "$dir" >>"$_LIB_DIRS"
	echo "$dir"
}

at_exit() { printf '%q ' "$@" >>"$_LIB_AT_EXIT" && echo >>"$_LIB_AT_EXIT"; }

sha() { sha256sum "$1" | cut -d' ' -f1; }

ext4_through() {
	local dev=$1 id=$2 image=$3 dir=$4 i
	mkfs.ext4 -q -F "$dev"
	mkdir -p "$dir/mnt"
	mount "$dev" "$dir/mnt"
	for i in 1 2 3 4 5 6; do head -c 3M /dev/urandom >"$dir/mnt/f$i"; done
	(cd "$dir/mnt" && sha256sum f*) >"$dir/written.sums"
	umount "$dir/mnt"
	"$UBLK" del --id "$id"
	wait_gone "$dev"
	e2fsck -fn "$image" >"$dir/fsck.out" 2>&1 || { cat "$dir/fsck.out"; fail "e2fsck found problems in $image"; }
	for i in 1 2 3 4 5 6; do
		echo "$(debugfs -R "cat /f$i" "$image" 2>/dev/null | sha256sum | cut -d' ' -f1)  f$i"
	done >"$dir/image.sums"
	diff "$dir/written.sums" "$dir/image.sums" || fail "the files in $image differ from what was written"
}

# A program that wanted more than memory and swap together (swap on ublk device DEV, served
# by PID) ended with status RC, started at START ($SECONDS): it was killed by the OOM killer
# in time (not stalled), the server lived, and swapoff of DEV worked; DEV is deleted then.
expect_oom_killed() {
	local rc=$1 start=$2 pid=$3 dev=$4
	echo "the program ended with status $rc after $((SECONDS - start)) s"
	# (137 is also timeout's own SIGKILL: the time tells them apart.)
	((rc == 137 && SECONDS - start < 140)) ||
		fail "the program was not killed by the OOM killer (status $rc after $((SECONDS - start)) s): the machine stalled"
	grep -q "oom-kill\|Killed process" <(dmesg) || fail "the kernel log shows no OOM kill"
	kill -0 "$pid" || fail "the ublk server died"
	timeout 120 swapoff "$dev" || fail "swapoff failed"
	"$UBLK" del "$dev"
}

list_field() {
	"$UBLK" list --json | python3 -c '
import json, sys
rows = {d["id"]: d for d in json.load(sys.stdin)}
r = rows.get(int(sys.argv[1]))
print("" if r is None else r[sys.argv[2]])' "$1" "$2"
}

loop_device() {
	local dev
	dev=$(losetup --find --show "$1") || fail "losetup of $1 failed"
	at_exit losetup -d "$dev"
	echo "$dev"
}

# No udev in the test VM: no sync with it, and dmsetup makes the /dev/mapper node itself.
dm_device() {
	dmsetup create --noudevsync "$1" <<<"$2" || fail "dmsetup create $1 failed"
	at_exit dmsetup remove --noudevsync --retry "$1"
	dmsetup mknodes "$1"
}

has_feature() {
	"$UBLK" features 2>/dev/null | grep -qx "  UBLK_F_$1"
}

need_feature() {
	local name
	for name in "$@"; do
		if ! has_feature "$name"; then
			echo "SKIP: needs UBLK_F_$name (this kernel: $("$UBLK" features 2>/dev/null | sed -n 's/^features: //p'))"
			exit 77
		fi
	done
}

wait_exit() {
	local deadline=$((SECONDS + $2))
	while kill -0 "$1" 2>/dev/null && [[ $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) != Z ]]; do
		((SECONDS < deadline)) || fail "process $1 still runs $2 s later"
		sleep 0.05
	done
}

PROBLEMS=()
problem() { echo "  PROBLEM: $*"; PROBLEMS+=("$*"); }

fail_on_problems() {
	if ((${#PROBLEMS[@]})); then
		printf '  %s\n' "${PROBLEMS[@]}"
		fail "${#PROBLEMS[@]} problem(s) $1"
	fi
}

no_device_left() {
	local keep=${2:-none} node left=()
	for node in /dev/ublkb* /dev/ublkc*; do
		if [[ -e $node && $node != /dev/ublk[bc]$keep ]]; then left+=("$node"); fi
	done
	((${#left[@]} == 0)) || problem "$1: left behind: ${left[*]}"
	[[ -c /dev/ublk-control ]] || return 0 # (ublk_drv unloaded: no devices at all)
	local rows
	rows=$("$UBLK" list | tail -n +2 | awk -v keep="$keep" '$1 != keep') || problem "$1: ublk list failed afterwards"
	[[ -z $rows ]] || problem "$1: ublk list shows: $rows"
}

expect_error() {
	local what=$1 pattern=$2 prefix=() out
	shift 2
	case $1 in
	--as-nobody) prefix=(setpriv --reuid=65534 --regid=65534 --clear-groups) && shift ;;
	--no-dac) prefix=(setpriv --bounding-set=-dac_override,-dac_read_search) && shift ;;
	esac
	[[ $1 == -- ]] && shift
	: "${EXPECT_DIR:=$(mktempdir)}"
	out=$EXPECT_DIR
	local rc=0
	timeout 60 "${prefix[@]}" "$@" >"$out/out" 2>"$out/err" || rc=$?
	local err lines
	err=$(cat "$out/err")
	lines=$(awk 'END { print NR }' "$out/err")
	echo "-- $what: status $rc: $err"
	if ((rc == 0)); then problem "$what: exit status 0"; fi
	if ((rc == 124)); then problem "$what: timed out"; fi
	if ((rc > 128)); then problem "$what: killed by signal $((rc - 128)) (crash?)"; fi
	if [[ $lines != 1 ]]; then problem "$what: $lines lines on stderr, expected 1"; fi
	if grep -Eiq 'fatal error|backtrace|stack dump|crash|\.swift:[0-9]' "$out/err"; then problem "$what: looks like a crash"; fi
	if ! grep -Eq -- "$pattern" "$out/err"; then problem "$what: message does not match /$pattern/"; fi
	if [[ -s $out/out ]]; then problem "$what: printed on stdout: $(cat "$out/out")"; fi
	no_device_left "$what" "${KEEP_ID:-none}"
}

# At exit: unmount what is mounted inside the temp dirs (deepest first, lazily
# if busy; a device can't go while mounted), run the at_exit commands (last
# registered first), then remove the temp dirs.
_lib_exit() {
	local rc=$? cmd dir target
	if [[ -f $_LIB_DIRS ]]; then
		while read -r dir; do
			awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r |
				while read -r target; do umount "$target" 2>/dev/null || umount -l "$target" || true; done
		done <"$_LIB_DIRS"
	fi
	if [[ -f $_LIB_AT_EXIT ]]; then
		while read -r cmd; do eval "$cmd" || true; done < <(tac "$_LIB_AT_EXIT")
	fi
	if [[ -f $_LIB_DIRS ]]; then
		while read -r dir; do rm -rf --one-file-system "$dir" || true; done <"$_LIB_DIRS"
	fi
	rm -f "$_LIB_DIRS" "$_LIB_AT_EXIT"
	exit "$rc"
}
trap _lib_exit EXIT
