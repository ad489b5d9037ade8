#!/bin/bash
# 73-nbd-bad-input — the nbd target's mistakes get one line and leave no device:
# nothing listening, an unresolvable host, an unreachable network, an unknown export
# (qemu-nbd), malformed URIs, nbds:// (no TLS), and options that do not fit the target.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
need_loopback
at_exit "$UBLK" del --all

dir=$(mktempdir)
truncate -s 16M "$dir/export.img"
qemu-nbd -t -f raw -b 127.0.0.1 -p 10810 -x disk "$dir/export.img" 2>"$dir/qemu-nbd.log" &
at_exit kill $!
wait_port 10810 10 "$dir/qemu-nbd.log"

expect_error "nothing listens" "cannot connect.*is the NBD server running" -- "$UBLK" add --target nbd --uri nbd://127.0.0.1:1/disk
expect_error "nothing listens, --foreground" "cannot connect.*is the NBD server running" -- "$UBLK" add --target nbd --uri nbd://127.0.0.1:1/disk --foreground
expect_error "unresolvable host" "cannot resolve.*check the host" -- "$UBLK" add --target nbd --uri nbd://no-such-host.invalid/disk
expect_error "unreachable network" "cannot connect" -- "$UBLK" add --target nbd --uri nbd://192.0.2.1/disk
expect_error "unknown export" "export nope not found.*check the name" -- "$UBLK" add --target nbd --uri nbd://127.0.0.1:10810/nope
expect_error "bad port" "bad NBD URI.*expected nbd://" -- "$UBLK" add --target nbd --uri nbd://127.0.0.1:99999/disk
expect_error "no scheme" "bad NBD URI.*expected nbd://" -- "$UBLK" add --uri 127.0.0.1/disk
expect_error "unix socket without a path" "bad NBD URI.*socket=PATH" -- "$UBLK" add --target nbd --uri nbd+unix:///disk
expect_error "nbds://" "TLS is not supported.*nbd://" -- "$UBLK" add --target nbd --uri nbds://127.0.0.1/disk
expect_error "nbd without --uri" "needs an export.*--uri" -- "$UBLK" add --target nbd
expect_error "nbd with --file" "leave out --file" -- "$UBLK" add --target nbd --uri nbd://127.0.0.1:10810/disk --file "$dir/export.img"
expect_error "--uri on the loop target" "--uri is for the nbd target" -- "$UBLK" add --target loop --file "$dir/export.img" --uri nbd://127.0.0.1/disk
expect_error "negative --reconnect-timeout" "reconnect-timeout.*0 to 86400" -- "$UBLK" add --target nbd --uri nbd://127.0.0.1:10810/disk --reconnect-timeout=-1

# And the good URI works (the server was not disturbed by the bad attempts).
dev=$("$UBLK" add --target nbd --uri nbd://127.0.0.1:10810/disk)
"$UBLK" del --id "${dev#/dev/ublkb}"
no_device_left "after the good URI"
fail_on_problems "with bad nbd input"
echo "ok: every bad nbd input got one line and left no device"
