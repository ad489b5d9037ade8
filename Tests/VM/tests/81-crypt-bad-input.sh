#!/bin/bash
# 81-crypt-bad-input — every mistake with the encrypting target gets ONE line on
# stderr that says what to do, a non-zero exit status, no crash, and leaves no device
# behind: missing, short (for 256 and for the default 512 bits), unreadable and
# directory key files; a key whose halves are equal; an unknown cipher; an unknown
# --key-size; a block size dm-crypt does not use; --encryption without --key-file; and
# a key given on the command line (there is no such option, and the key is not echoed);
# --allow-discards without encryption; a --skip dm-crypt would refuse. An encrypted device
# offers discard only with --allow-discards.
# Every case runs, then all problems are listed.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
at_exit "$UBLK" del --all

dir=$(mktempdir)
chmod 755 "$dir"
truncate -s 64M "$dir/ok.img"
head -c 64 /dev/urandom >"$dir/key"
head -c 31 /dev/urandom >"$dir/key31"
head -c 32 /dev/urandom >"$dir/key32"
head -c 32 /dev/urandom >"$dir/half" && cat "$dir/half" "$dir/half" >"$dir/equal"
cp "$dir/key" "$dir/secret-key" && chmod 000 "$dir/secret-key"
mkdir "$dir/keydir"
add=("$UBLK" add --file "$dir/ok.img" --encryption aes-xts-plain64)

expect_error "missing key file" "does not exist.*head -c 64 /dev/urandom" -- "${add[@]}" --key-file "$dir/nope"
expect_error "31-byte key file, --key-size 256" "31 bytes.*needs 32.*head -c 32 /dev/urandom" -- \
	"${add[@]}" --key-file "$dir/key31" --key-size 256
# Perhaps a 256-bit key given without --key-size: never the advice to overwrite it.
expect_error "32-byte key file, default key size" "32 bytes.*needs 64: if it is a 256-bit key, give --key-size 256" -- \
	"${add[@]}" --key-file "$dir/key32"
expect_error "key with equal halves" "equal halves.*head -c 64 /dev/urandom" -- "${add[@]}" --key-file "$dir/equal"
expect_error "unreadable key file (root without DAC override)" "key file.*permission" --no-dac -- \
	"${add[@]}" --key-file "$dir/secret-key"
expect_error "directory as key file" "cannot read.*key file" -- "${add[@]}" --key-file "$dir/keydir"
expect_error "unknown cipher" "aes-xts-plain64" -- \
	"$UBLK" add --file "$dir/ok.img" --encryption aes-cbc-essiv:sha256 --key-file "$dir/key"
expect_error "--key-size 384" "--key-size 512.*--key-size 256" -- "${add[@]}" --key-file "$dir/key" --key-size 384
expect_error "--block-size 1024 with encryption" "512 or 4096" -- \
	"${add[@]}" --key-file "$dir/key" --block-size 1024
expect_error "--encryption without --key-file" "--key-file" -- "${add[@]}"
expect_error "--cipher-threads 65" "--cipher-threads 65 is out of range: give 0 to 64" -- \
	"${add[@]}" --key-file "$dir/key" --cipher-threads 65
expect_error "--cipher-threads without --encryption" "--cipher-threads and --allow-discards need --encryption" -- \
	"$UBLK" add --file "$dir/ok.img" --cipher-threads 1
expect_error "--key-file without --encryption" "--encryption" -- "$UBLK" add --file "$dir/ok.img" --key-file "$dir/key"
expect_error "--allow-discards without --encryption" "--allow-discards need --encryption" -- \
	"$UBLK" add --file "$dir/ok.img" --allow-discards
# dm-crypt refuses an IV offset that is not whole 4096-byte sectors: the image would open nowhere else.
expect_error "--skip 3 with 4096-byte sectors" "--skip 3 is not a multiple of 8" -- \
	"${add[@]}" --key-file "$dir/key" --block-size 4096 --skip 3

# A key on the command line: no such option, the line says where a key goes, and the key
# is not repeated anywhere.
hex=$(od -An -tx1 -v "$dir/key" | tr -d ' \n')
expect_error "key on the command line" "never goes on the command line.*--key-file" -- "${add[@]}" --key "$hex"
if grep -qiF "$hex" "$EXPECT_DIR/err" "$EXPECT_DIR/out"; then problem "key on the command line: the key is echoed"; fi
expect_error "key on the command line besides a key file" "never goes on the command line.*--key-file" -- \
	"${add[@]}" --key-file "$dir/key" --key="$hex"
if grep -qiF "$hex" "$EXPECT_DIR/err" "$EXPECT_DIR/out"; then problem "key on the command line: the key is echoed"; fi

# And after all that, a good add still works; it offers no discard (as dm-crypt), unless
# --allow-discards asks for it.
dev=$("${add[@]}" --key-file "$dir/key") || fail "a valid encrypted ublk add failed after the bad ones"
expect_eq "$(cat "/sys/block/${dev#/dev/}/queue/discard_max_bytes")" 0 "discard_max_bytes of an encrypted device"
"$UBLK" del --id "${dev#/dev/ublkb}"
dev=$("${add[@]}" --key-file "$dir/key" --allow-discards) || fail "ublk add --allow-discards failed"
(($(cat "/sys/block/${dev#/dev/}/queue/discard_max_bytes") > 0)) || fail "--allow-discards: the device offers no discard"
blkdiscard "$dev" || fail "blkdiscard of an encrypted device with --allow-discards failed"
"$UBLK" del --id "${dev#/dev/ublkb}"

# A server with a key locks all its memory: a large depth is said to lock much (not the default).
"${add[@]}" --key-file "$dir/key" 2>"$dir/note" >/dev/null && "$UBLK" del --all || fail "ublk add of an encrypted device"
grep -q "locks" "$dir/note" && fail "an encrypted device at the default depth is said to lock much: $(cat "$dir/note")"
dev=$("${add[@]}" --key-file "$dir/key" --queues 1 --depth 2048 2>"$dir/note") || fail "ublk add --depth 2048 of an encrypted device"
grep -q "may lock up to 1280 MiB of memory.*--depth" "$dir/note" || fail "a depth of 2048 was not said to lock much: $(cat "$dir/note")"
"$UBLK" del --id "${dev#/dev/ublkb}"

fail_on_problems "with bad encryption input"
echo "ok: every bad encryption input got one line, a non-zero status and left no device"
