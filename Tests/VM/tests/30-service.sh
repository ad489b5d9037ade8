#!/bin/bash
# 30-service — what the systemd unit relies on: with NOTIFY_SOCKET set, the server
# sends READY=1 only once /dev/ublkbN exists and reads, and on SIGTERM sends
# STOPPING=1 and removes the device (exit 0). `ublk start NAME` serves a config
# file (whose relative `file` is found from the file's directory, run from /); `ublk list` in another shell shows it, and marks it dead once the server
# was killed instead of lying.
# timeout: 200
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
export UBLK_CONFIG_DIR=$dir/etc
mkdir "$UBLK_CONFIG_DIR"
truncate -s 64M "$UBLK_CONFIG_DIR/disk.img"
# A relative file is the config file's neighbour, whatever the working directory (/ here, as under systemd).
cd /
cat >"$UBLK_CONFIG_DIR/data.conf" <<CONF
# a test device
file = disk.img
queues = 1
depth = 32
direct-io = off   # buffered
block-size = 4096
read-only = no
CONF

# A notify listener: logs each datagram, and at READY=1 checks the device reads.
cat >"$dir/listen.py" <<'PY'
import os, socket, sys
path, log = sys.argv[1], open(sys.argv[2], "w", buffering=1)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
while True:
    message = s.recv(4096).decode()
    for line in message.splitlines():
        log.write(line + "\n")
        if line == "READY=1":
            status = [l for l in message.splitlines() if l.startswith("STATUS=")]
            dev = status[0].split()[1] if status else "?"
            try:
                with open(dev, "rb") as f:
                    ok = len(f.read(4096)) == 4096
            except OSError as e:
                ok = False
            log.write("ready-device-readable=%s %s\n" % (ok, dev))
        if line == "STOPPING=1":
            log.write("stopping-seen\n")
PY
python3 "$dir/listen.py" "$dir/notify.sock" "$dir/notify.log" &
listener=$!
at_exit kill "$listener"
wait_for_path "$dir/notify.sock" 5

NOTIFY_SOCKET=$dir/notify.sock "$UBLK" start --foreground data >"$dir/out" 2>"$dir/err" &
server=$!
for _ in $(seq 100); do grep -q "ready-device-readable" "$dir/notify.log" 2>/dev/null && break; sleep 0.1; done
cat "$dir/notify.log"
grep -q "^ready-device-readable=True /dev/ublkb" "$dir/notify.log" || fail "READY=1 came before the device was readable (or never)"
grep -q "^STATUS=Serving /dev/ublkb.* (loop, $UBLK_CONFIG_DIR/disk.img)" "$dir/notify.log" || fail "STATUS does not name the device"
dev=$(awk '/^ready-device-readable/ { print $2 }' "$dir/notify.log")
expect_eq "$(blockdev --getss "$dev")" 4096 "block size from the config file"

# Another shell sees it, with the config's name in the JSON.
list=$(bash -c "'$UBLK' list --json")
python3 -c "import json,sys; r=[d for d in json.loads(sys.argv[1]) if d['id']==int(sys.argv[2])][0]; assert r['name']=='data' and r['serverAlive'] and r['depth']==32, r" "$list" "${dev#/dev/ublkb}" ||
	fail "ublk list does not show the started device: $list"

kill -TERM "$server"
wait "$server" && status=0 || status=$?
expect_eq "$status" 0 "server exit status after SIGTERM"
grep -q "^STOPPING=1" "$dir/notify.log" || fail "no STOPPING=1 after SIGTERM"
[[ ! -e $dev ]] || fail "$dev still exists after SIGTERM"
[[ -z $("$UBLK" list | tail -n +2) ]] || fail "a device is still listed after SIGTERM"
echo "ok: READY=1 after the device read, STOPPING=1 and removal on SIGTERM"

# Background start, then a killed server: list says so.
dev=$("$UBLK" start data)
pid=$(list_field "${dev#/dev/ublkb}" pid)
# Started twice: the second says it is running, in one line.
if "$UBLK" start data 2>"$dir/err"; then fail "a second ublk start data was accepted"; fi
grep -qF "data is already started: $dev, served by pid $pid" "$dir/err" || fail "a second start: $(cat "$dir/err")"
expect_eq "$(wc -l <"$dir/err")" 1 "lines of a second start"
kill -KILL "$pid"
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
"$UBLK" list
"$UBLK" list | awk -v id="${dev#/dev/ublkb}" '$1 == id' | grep -q "server-dead" || fail "ublk list does not mark the killed server's device dead"
"$UBLK" del --id "${dev#/dev/ublkb}"
wait_gone "$dev" 10
echo "ok: ublk start NAME, list from another shell, dead server reported"

# A config with a mistake is refused with the file and line.
echo "depth = lots" >>"$UBLK_CONFIG_DIR/data.conf"
if "$UBLK" start data 2>"$dir/err"; then fail "a bad config was accepted"; fi
cat "$dir/err"
grep -q "data.conf" "$dir/err" || fail "the error does not name the config file"
