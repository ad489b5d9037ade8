#!/bin/bash
# 82-crypt-fio — an encrypted device with 2 queues at depth 32: fio random
# read/write with crc32c verification passes, for block size 512 (mixed request
# sizes, many 512-byte units per request) and 4096. The data survives ublk del and
# add with the same key (fio verifies it again), and with another key it does not
# read back (the key really is used). A key on standard input (`--key-file -`) reaches
# the background server, and `ublk recover` of an encrypted --recovery device whose
# server was killed asks for the key again, refuses another key of the same size (the
# record keeps a check value of the key, never the key), and serves the same data with it. Where the
# kernel has PER_IO_DAEMON, the cipher threads share the queues' tags (1 + N threads per
# queue, per-request commands); elsewhere, or with --batch-io on, they are workers.
# timeout: 600
. "$(dirname "$0")/../lib.sh"
need_ublk

dir=$(mktempdir)
head -c 64 /dev/urandom >"$dir/key"
head -c 64 /dev/urandom >"$dir/other-key"

# add IMAGE KEY BLOCK [CIPHER-THREADS]: prints the device of IMAGE through the encrypting target.
add() {
	local dev threads=()
	if (($# > 3)); then threads=(--cipher-threads "$4"); fi
	dev=$("$UBLK" add --file "$1" --encryption aes-xts-plain64 --key-file "$2" --block-size "$3" \
		--queues 2 --depth 32 "${threads[@]}")
	at_exit sh -c "'$UBLK' del --id ${dev#/dev/ublkb} 2>/dev/null || true"
	echo "$dev"
}

del() {
	"$UBLK" del --id "${1#/dev/ublkb}"
	wait_gone "$1" 10
}

# verify DEVICE BLOCK WRITE|CHECK: fio writes (and verifies) or only verifies the
# same pattern (same seed, same job layout) on DEVICE.
verify() {
	local mode=() sizes
	if [[ $3 == CHECK ]]; then mode=(--verify_only=1); fi
	if (($2 == 512)); then sizes=(--bsrange=512-64k --blockalign=512); else sizes=(--bsrange=4k-128k --blockalign=4k); fi
	fio --name=crypt --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite "${sizes[@]}" \
		--iodepth=32 --numjobs=2 --size=48M --offset_increment=48M --randseed=4242 --verify=crc32c \
		--verify_fatal=1 --do_verify=1 --verify_state_save=0 --group_reporting --output-format=terse \
		"${mode[@]}" >"$dir/fio.out" 2>&1
}

# server_threads DEVICE: a line per thread of the device's server, its name and the CPU
# ticks it used (utime + stime).
server_threads() {
	local pid task comm stat fields
	pid=$(list_field "${1#/dev/ublkb}" pid)
	for task in /proc/"$pid"/task/*; do
		# io_uring's idle workers (iou-wrk-*) may exit while we look.
		comm=$(cat "$task/comm" 2>/dev/null) && stat=$(cat "$task/stat" 2>/dev/null) || continue
		stat=${stat##*) }
		read -r -a fields <<<"$stat"
		echo "$comm $((fields[11] + fields[12]))"
	done
}

# cipher_ticks DEVICE: the count of the server's cipher threads besides the queue
# threads' own, and the CPU ticks they used. They are cipher workers (ublk-crypt*), or
# where the kernel lets several threads serve a queue (PER_IO_DAEMON) the queue's further
# threads, each serving its share of the tags (ublk-qQ.N, N >= 1).
cipher_ticks() {
	server_threads "$1" | awk '$1 ~ /^ublk-crypt/ || $1 ~ /^ublk-q[0-9]+\.[1-9]/ { count++; ticks += $2 }
		END { print count + 0, ticks + 0 }'
}

# queue_threads DEVICE: the names of the server's queue threads, sorted, on one line.
queue_threads() {
	server_threads "$1" | awk '$1 ~ /^ublk-q/ { print $1 }' | sort | xargs
}

# Where the kernel lets each tag have a thread of its own (PER_IO_DAEMON), the cipher
# threads share the queues' tags with the queue threads (and batched commands, which
# ADD_DEV grants only without PER_IO_DAEMON, stay off unless asked for); elsewhere, and
# with --batch-io on, they are cipher workers.
truncate -s 16M "$dir/threads.img"
dev=$(add "$dir/threads.img" "$dir/key" 512 2)
if has_feature PER_IO_DAEMON; then
	expect_eq "$(queue_threads "$dev")" "ublk-q0.0 ublk-q0.1 ublk-q0.2 ublk-q1.0 ublk-q1.1 ublk-q1.2" \
		"queue threads of 2 queues with --cipher-threads 2 (PER_IO_DAEMON)"
	expect_eq "$(list_field "${dev#/dev/ublkb}" commands)" per-request "commands of a device whose queues are shared"
	del "$dev"
	if has_feature BATCH_IO; then
		dev=$("$UBLK" add --file "$dir/threads.img" --encryption aes-xts-plain64 --key-file "$dir/key" \
			--queues 2 --cipher-threads 2 --batch-io on)
		expect_eq "$(queue_threads "$dev")" "ublk-q0 ublk-q1" "queue threads with --batch-io on"
		expect_eq "$(cipher_ticks "$dev" | cut -d' ' -f1)" 4 "cipher workers with --batch-io on"
		del "$dev"
	fi
	echo "ok: PER_IO_DAEMON: 3 threads share each queue's tags; with --batch-io on, 1 queue thread and 2 workers"
else
	expect_eq "$(queue_threads "$dev")" "ublk-q0 ublk-q1" "queue threads without PER_IO_DAEMON"
	del "$dev"
	echo "ok: no PER_IO_DAEMON: one thread per queue, cipher workers beside it"
fi

for block in 512 4096; do
	img=$dir/disk-$block.img
	truncate -s 128M "$img"
	# Written with two cipher threads per queue (they must do some of the AES), read
	# back with none (all on the queue threads): both make the same ciphertext.
	dev=$(add "$img" "$dir/key" "$block" 2)
	expect_eq "$(ls "/sys/block/${dev#/dev/}/mq" | wc -l)" 2 "hardware queues"
	expect_eq "$(blockdev --getss "$dev")" "$block" "logical block size"
	verify "$dev" "$block" WRITE || { cat "$dir/fio.out"; fail "block $block: fio randwrite+verify failed"; }
	read -r threads ticks < <(cipher_ticks "$dev")
	expect_eq "$threads" 4 "cipher threads (2 queues x --cipher-threads 2)"
	((ticks > 0)) || fail "block $block: the cipher workers did no work at depth 32"
	del "$dev"

	dev=$(add "$img" "$dir/key" "$block" 0)
	expect_eq "$(cipher_ticks "$dev")" "0 0" "cipher worker threads with --cipher-threads 0"
	verify "$dev" "$block" CHECK || { cat "$dir/fio.out"; fail "block $block: the data did not verify after del and add"; }
	del "$dev"

	dev=$(add "$img" "$dir/other-key" "$block")
	if verify "$dev" "$block" CHECK; then fail "block $block: the data verified with another key"; fi
	del "$dev"
	echo "ok: block $block: fio crc32c verify at depth 32 on 2 queues with cipher workers ($ticks ticks), read back with none; data kept across del/add; wrong key reads garbage"
done

# --- --key-file - and ublk recover of an encrypted device ----------------------------
img=$dir/rec.img
truncate -s 64M "$img"
dev=$("$UBLK" add --file "$img" --encryption aes-xts-plain64 --key-file - --recovery <"$dir/key") ||
	fail "ublk add with the key on standard input failed"
id=${dev#/dev/ublkb}
at_exit sh -c "'$UBLK' del --id $id 2>/dev/null || true"
expect_eq "$(list_field "$id" target)" "loop+crypt" "ublk list target of an encrypted device"
head -c 8M /dev/urandom >"$dir/pattern"
dd if="$dir/pattern" of="$dev" bs=1M seek=8 oflag=direct conv=fsync status=none
pid=$(list_field "$id" pid)
tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--key-fd 4" ||
	fail "the background server did not get the key on an inherited descriptor: $(tr '\0' ' ' <"/proc/$pid/cmdline")"
# The server's memory is locked (OpenSSL's key schedules are on its heap), more than the
# key's own page: VmLck in kB.
locked=$(awk '/^VmLck:/ { print $2 }' "/proc/$pid/status")
((locked > 1024)) || fail "the encrypted device's server has only ${locked} kB locked"
kill -KILL "$pid"
wait_exit "$pid" 10
KEEP_ID=$id expect_error "recover of an encrypted device without its key" "encrypted.*give its key again with --key-file" -- \
	"$UBLK" recover --id "$id"
# Another key of the right size: plain mode has no header, so only the record's check value
# tells it from the device's; the device stays for the right key.
head -c 64 /dev/urandom >"$dir/other-key"
KEEP_ID=$id expect_error "recover of an encrypted device with another key" "not the key device $id was added with" -- \
	"$UBLK" recover --id "$id" --key-file "$dir/other-key"
fail_on_problems "with ublk recover of an encrypted device"
"$UBLK" recover --id "$id" --key-file - <"$dir/key" >/dev/null || fail "ublk recover --key-file - failed"
cmp <(dd if="$dev" bs=1M skip=8 count=8 iflag=direct status=none) "$dir/pattern" ||
	fail "the data written before the crash does not read back after ublk recover with the key"
! grep -rqiF "$(od -An -tx1 -v "$dir/key" | tr -d ' \n')" /run/ublk 2>/dev/null || fail "a device record holds the key"
del "$dev"
echo "ok: --key-file - reaches the background server (its memory locked: ${locked} kB); ublk recover asks for the key, refuses another one, and serves the same data"
