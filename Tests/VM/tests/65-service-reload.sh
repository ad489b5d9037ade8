#!/bin/bash
# 65-service-reload — what `systemctl reload ublk@NAME` (ExecReload=ublk upgrade --name
# NAME) relies on, with a notify listener in place of systemd: a device started from a
# config with `recovery = yes` is upgraded by name; the new server announces MAINPID=
# (and READY=1) while the old one still runs, the old one then exits with status 0, the
# device stays live with its data. Kernels without QUIESCE: one line, nothing changes.
# timeout: 200
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
truncate -s 64M "$dir/disk.img"
export UBLK_CONFIG_DIR=$dir/etc
mkdir "$UBLK_CONFIG_DIR"
printf 'file = %s\nrecovery = yes\n' "$dir/disk.img" >"$UBLK_CONFIG_DIR/data.conf"

# Logs each notification; a MAINPID= line also says whether the old server still ran.
cat >"$dir/listen.py" <<'PY'
import os, socket, sys
path, log, oldfile = sys.argv[1], open(sys.argv[2], "w", buffering=1), sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
while True:
    for line in s.recv(4096).decode().splitlines():
        log.write(line + "\n")
        if line.startswith("MAINPID=") and os.path.exists(oldfile):
            old = int(open(oldfile).read())
            alive = os.path.exists("/proc/%d" % old) and open("/proc/%d/stat" % old).read().rsplit(")", 1)[1].split()[0] != "Z"
            log.write("old-alive=%s\n" % alive)
PY
python3 "$dir/listen.py" "$dir/notify.sock" "$dir/notify.log" "$dir/old.pid" &
at_exit kill $!
wait_for_path "$dir/notify.sock" 5
export NOTIFY_SOCKET=$dir/notify.sock

"$UBLK" start --foreground data >"$dir/out" 2>"$dir/err" &
old=$!
echo "$old" >"$dir/old.pid"
for _ in $(seq 100); do grep -q "^READY=1" "$dir/notify.log" 2>/dev/null && break; sleep 0.1; done
dev=$(cat "$dir/out")
id=${dev#/dev/ublkb}
[[ -b $dev ]] || fail "ublk start did not serve a device: $(cat "$dir/err")"
head -c 4M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$dev" bs=1M oflag=direct status=none

if ! has_feature QUIESCE; then
	rc=0
	"$UBLK" upgrade --name data >/dev/null 2>"$dir/err" || rc=$?
	((rc != 0)) || fail "ublk upgrade succeeded without QUIESCE"
	expect_eq "$(wc -l <"$dir/err")" 1 "lines of the refusal ($(cat "$dir/err"))"
	grep -q QUIESCE "$dir/err" || fail "the refusal does not name QUIESCE: $(cat "$dir/err")"
	expect_eq "$(list_field "$id" pid)/$(list_field "$id" state)" "$old/live" "server and state after the refusal"
	echo "ok: no QUIESCE here: $(cat "$dir/err")"
	exit 0
fi

seen=$(wc -l <"$dir/notify.log")
timeout 90 "$UBLK" upgrade --name data >"$dir/up.out" 2>"$dir/err" || fail "ublk upgrade --name data failed: $(cat "$dir/err")"
new=$(list_field "$id" pid)
sleep 0.5
tail -n +$((seen + 1)) "$dir/notify.log" >"$dir/upgrade.log"
cat "$dir/upgrade.log"
expect_eq "$(head -n 2 "$dir/upgrade.log" | tr '\n' ' ')" "MAINPID=$new old-alive=True " "first notification of the upgrade"
grep -qx "READY=1" "$dir/upgrade.log" || fail "no READY=1 from the new server"
rc=0
wait "$old" || rc=$?
expect_eq "$rc" 0 "exit status of the old server"
expect_eq "$(list_field "$id" state)" live "state after the upgrade"
cmp <(dd if="$dev" bs=1M count=4 iflag=direct status=none) "$dir/pattern" || fail "data reads back wrong after the upgrade"
echo "ok: upgraded by name: $(cat "$dir/up.out"); MAINPID came while the old server ran; it exited 0"
