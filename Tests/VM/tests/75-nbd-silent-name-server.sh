#!/bin/bash
# 75-nbd-silent-name-server — a name server that never answers (and a resolver told to
# wait 30 s for it, 3 times) holds neither `ublk add` past its 10 s connect timeout,
# nor the removal of a device whose queue reconnects, by name, to an NBD server that is
# down: each lookup is given up with the connect it is part of.
# timeout: 240
. "$(dirname "$0")/../lib.sh"
need_ublk
need_loopback

dir=$(mktempdir)
truncate -s 64M "$dir/export.img"
cp /etc/hosts "$dir/hosts"
cp /etc/resolv.conf "$dir/resolv.conf" 2>/dev/null || : >"$dir/resolv.conf"
at_exit cp "$dir/hosts" /etc/hosts
at_exit cp "$dir/resolv.conf" /etc/resolv.conf
# Reads every query, answers none.
python3 -c 'import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
time.sleep(900)' &
echo $! >"$dir/dns.pid"
at_exit bash -c 'kill $(cat '"$dir"'/dns.pid) 2>/dev/null'
sleep 1
printf 'nameserver 127.0.0.1\noptions timeout:30 attempts:3\n' >/etc/resolv.conf

start=$SECONDS
expect_error "add by a name the name server does not answer for" "cannot resolve disk.example.test: no answer from the name server" -- \
	"$UBLK" add --target nbd --uri nbd://disk.example.test/disk
fail_on_problems "with a silent name server"
((SECONDS - start < 25)) || fail "ublk add took $((SECONDS - start)) s to give up on the name server"
echo "ok: ublk add gave up on the silent name server after $((SECONDS - start)) s: $(cat "$EXPECT_DIR/err")"

# The name resolves (from /etc/hosts) while the device is added; then only the silent
# name server knows it, and the NBD server goes: the queue's reconnects look it up.
echo "127.0.0.1 nbdhost.example.test" >>/etc/hosts
start_nbdkit "$dir/export.img"
dev=$("$UBLK" add --target nbd --uri nbd://nbdhost.example.test/disk --reconnect-timeout 60)
id=${dev#/dev/ublkb}
pid=$(list_field "$id" pid)
at_exit "$UBLK" del --all --force
cp "$dir/hosts" /etc/hosts
read_waiting_for_server "$dev" "$dir/dd.err"
sleep 2
start=$SECONDS
"$UBLK" del --force --id "$id" || fail "ublk del --force failed"
wait_gone "$dev" 20
wait_exit "$pid" 20
wait "$reader" && fail "the read succeeded with the server gone"
((SECONDS - start < 15)) || fail "ublk del --force took $((SECONDS - start)) s while the queue looked the name up"
echo "ok: with the name server silent, ublk del --force took $((SECONDS - start)) s while the queue reconnected by name"
