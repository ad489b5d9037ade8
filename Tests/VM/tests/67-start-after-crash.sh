#!/bin/bash
# 67-start-after-crash — what a service manager's restart finds after a crash (systemd's
# Restart=on-failure runs `ublk start NAME` again):
#  * a `recovery = yes` device whose server was killed is taken over by the new
#    `ublk start NAME` (same device, its data, one device on the file), not doubled by a
#    second device on the same backing; meanwhile `ublk add` of that file is refused in
#    one line naming the waiting device (`ublk recover` would bring a second writer back);
#  * a device without recovery is removed by the new `ublk start NAME`, which makes a new
#    one: no dead device is left behind.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all --force

dir=$(mktempdir)
export UBLK_CONFIG_DIR=$dir/etc
mkdir "$UBLK_CONFIG_DIR"
truncate -s 64M "$dir/a.img" "$dir/b.img"
printf 'file = %s\nrecovery = yes\n' "$dir/a.img" >"$UBLK_CONFIG_DIR/kept.conf"
printf 'file = %s\n' "$dir/b.img" >"$UBLK_CONFIG_DIR/plain.conf"

# kill_server ID: SIGKILL the server of device ID and wait until it is gone.
kill_server() {
	local pid
	pid=$(list_field "$1" pid)
	kill -KILL "$pid"
	wait_exit "$pid" 10
}
devices_on() { "$UBLK" list --json | python3 -c 'import json, sys; print(sum(d["backing"] == sys.argv[1] for d in json.load(sys.stdin)))' "$1"; }

dev=$("$UBLK" start kept)
id=${dev#/dev/ublkb}
head -c 1M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$dev" bs=1M oflag=direct status=none
kill_server "$id"

KEEP_ID=$id
expect_error "add of a file whose device waits for a server" "waits for a new server.*ublk recover --id $id" -- \
	"$UBLK" add --file "$dir/a.img"
fail_on_problems "with a device waiting for its server"

again=$("$UBLK" start kept 2>"$dir/err")
expect_eq "$again" "$dev" "device of the restarted ublk start kept"
grep -q "recovering" "$dir/err" || fail "ublk start did not say it recovers device $id: $(cat "$dir/err")"
expect_eq "$(list_field "$id" state)" live "state after the restart"
cmp <(dd if="$dev" bs=1M count=1 iflag=direct status=none) "$dir/pattern" || fail "the data written before the crash differs"
expect_eq "$(devices_on "$dir/a.img")" 1 "devices on a.img"
echo "ok: the restarted ublk start took $dev over ($(cat "$dir/err")); its data is there, one device on the file"

plain=$("$UBLK" start plain)
kill_server "${plain#/dev/ublkb}"
new=$("$UBLK" start plain 2>"$dir/err")
grep -q "removed" "$dir/err" || fail "ublk start did not say it removed the dead device: $(cat "$dir/err")"
[[ $new == "$plain" || ! -e /dev/ublkc${plain#/dev/ublkb} ]] || fail "the dead device ${plain#/dev/ublkb} is still there"
expect_eq "$(devices_on "$dir/b.img")" 1 "devices on b.img"
expect_eq "$(list_field "${new#/dev/ublkb}" state)" live "state of the new plain device"
echo "ok: without recovery the dead device went and $new serves b.img ($(cat "$dir/err"))"
