#!/bin/bash
# 80-crypt-cryptsetup — the encrypting loop target writes exactly dm-crypt's plain
# mode (cryptsetup open --type plain --cipher aes-xts-plain64): for block size 512
# and 4096 (cryptsetup --sector-size) and key sizes 512 and 256 bits, an ext4 written
# through `ublk add --encryption aes-xts-plain64 --key-file K` mounts through losetup +
# cryptsetup with the same key, passes e2fsck and its files read back identical; and
# the other way round. The backing files never contain the plaintext (a marker string
# that the decrypted view does contain), and the key never shows in `ublk list --json`,
# the device records or the server's command line. And LUKS2 (cryptsetup luksFormat) on
# a plain ublk device works, as the README shows.
# timeout: 900
. "$(dirname "$0")/../lib.sh"
need_ublk

# The guest kernel cannot load modules on demand: load what aes-xts-plain64 needs.
for module in dm_mod dm_crypt xts; do
	modprobe "$module" || fail "modprobe $module failed: the VM kernel needs it for dm-crypt"
done
modprobe ecb 2>/dev/null || true # xts(aes) is built on ecb(aes); built in on some kernels
modprobe aesni_intel 2>/dev/null || modprobe aes_generic ||
	fail "no AES for dm-crypt: neither aesni_intel nor aes_generic loads"
# No udev in the test VM: libdevmapper (under cryptsetup) makes the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

dir=$(mktempdir)
mkdir "$dir/mnt"
marker="UBLK-CRYPT-PLAINTEXT-MARKER-$$-$RANDOM"

# make_key FILE BITS: a random raw key whose two halves differ (XTS forbids equal ones).
make_key() {
	local bytes=$(($2 / 8))
	head -c "$bytes" /dev/urandom >"$1"
	! cmp -s <(head -c $((bytes / 2)) "$1") <(tail -c $((bytes / 2)) "$1") || fail "random key with equal halves"
}

# fill MOUNTPOINT TAG: random files and the marker file; their checksums go to $dir/TAG.sha.
fill() {
	local i
	for i in 1 2 3; do head -c $((i << 20)) /dev/urandom >"$1/file$i"; done
	mkdir "$1/sub" && head -c 12345 /dev/urandom >"$1/sub/odd"
	for i in $(seq 2000); do echo "$marker line $i"; done >"$1/marker.txt"
	(cd "$1" && sha256sum file1 file2 file3 sub/odd marker.txt) >"$dir/$2.sha"
}

# check MOUNTPOINT TAG WHAT: the files of fill MOUNTPOINT TAG read back identical.
check() {
	(cd "$1" && sha256sum -c --quiet "$dir/$2.sha") || fail "$3: files differ from what was written"
}

# no_plaintext IMAGE PLAIN-VIEW WHAT: the marker is in the decrypted view, not in the backing.
no_plaintext() {
	grep -qaF "$marker" "$2" || fail "$3: the marker is not in the decrypted view $2 (test broken?)"
	! grep -qaF "$marker" "$1" || fail "$3: the backing file $1 contains plaintext"
}

# cryptsetup_open IMAGE NAME KEY BITS BLOCK: the image through losetup + dm-crypt plain mode
# (the reference), at /dev/mapper/NAME; cryptsetup_close NAME takes both down again.
declare -A LOOP_OF
cryptsetup_open() {
	local loop sector=()
	loop=$(losetup --find --show "$1")
	LOOP_OF[$2]=$loop
	at_exit sh -c "losetup -d $loop 2>/dev/null || true"
	if (($5 == 4096)); then sector=(--sector-size 4096); fi
	cryptsetup open --batch-mode --type plain --cipher aes-xts-plain64 --key-size "$4" --key-file "$3" \
		"${sector[@]}" "$loop" "$2" || fail "cryptsetup open of $1 failed"
	at_exit sh -c "cryptsetup close $2 2>/dev/null || true"
	wait_for_path "/dev/mapper/$2"
	expect_eq "$(blockdev --getss "/dev/mapper/$2")" "$5" "logical block size of the dm-crypt device"
}
cryptsetup_close() {
	cryptsetup close "$1"
	losetup -d "${LOOP_OF[$1]}"
}

# ublk_add IMAGE KEY BITS BLOCK: prints the device of the image through our encrypting target.
ublk_add() {
	local dev
	dev=$("$UBLK" add --file "$1" --encryption aes-xts-plain64 --key-file "$2" --key-size "$3" --block-size "$4")
	[[ $dev =~ ^/dev/ublkb[0-9]+$ ]] || fail "ublk add printed '$dev', not a device path"
	at_exit sh -c "'$UBLK' del --id ${dev#/dev/ublkb} 2>/dev/null || true"
	expect_eq "$(blockdev --getss "$dev")" "$4" "logical block size of $dev"
	echo "$dev"
}

ublk_del() {
	"$UBLK" del --id "${1#/dev/ublkb}"
	wait_gone "$1" 10
}

# The key must not leak into what ublk shows or stores.
no_key_shown() {
	local hex pid
	hex=$(od -An -tx1 -v "$1" | tr -d ' \n')
	! "$UBLK" list --json | grep -qiF "$hex" || fail "ublk list --json shows the key"
	! grep -rqiF "$hex" /run/ublk 2>/dev/null || fail "a device record under /run/ublk holds the key in hex"
	# Its key check value stays root's: no offline guessing of a weak key by other users.
	expect_eq "$(stat -c %a "/run/ublk/ublkb${2#/dev/ublkb}.json")" 600 "mode of the encrypted device's record"
	pid=$(list_field "${2#/dev/ublkb}" pid)
	! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qiF "$hex" || fail "the server's command line holds the key"
}

# round_trip BLOCK BITS
round_trip() {
	local block=$1 bits=$2 tag="bs$1-k$2" key img dev
	key=$dir/key-$tag
	make_key "$key" "$bits"

	# 1. Written through ublk, read through dm-crypt.
	img=$dir/ours-$tag.img
	truncate -s 64M "$img"
	dev=$(ublk_add "$img" "$key" "$bits" "$block")
	no_key_shown "$key" "$dev"
	mkfs.ext4 -q -F -b 4096 "$dev"
	mount "$dev" "$dir/mnt"
	fill "$dir/mnt" "ours-$tag"
	umount "$dir/mnt"
	ublk_del "$dev"
	cryptsetup_open "$img" "ref-$tag" "$key" "$bits" "$block"
	e2fsck -fn "/dev/mapper/ref-$tag" || fail "$tag: e2fsck through dm-crypt found errors in what ublk wrote"
	mount -o ro "/dev/mapper/ref-$tag" "$dir/mnt"
	check "$dir/mnt" "ours-$tag" "$tag: written by ublk, read by dm-crypt"
	umount "$dir/mnt"
	no_plaintext "$img" "/dev/mapper/ref-$tag" "$tag: written by ublk"
	cryptsetup_close "ref-$tag"

	# 2. Written through dm-crypt, read through ublk.
	img=$dir/dm-$tag.img
	truncate -s 64M "$img"
	cryptsetup_open "$img" "w-$tag" "$key" "$bits" "$block"
	mkfs.ext4 -q -F -b 4096 "/dev/mapper/w-$tag"
	mount "/dev/mapper/w-$tag" "$dir/mnt"
	fill "$dir/mnt" "dm-$tag"
	umount "$dir/mnt"
	cryptsetup_close "w-$tag"
	dev=$(ublk_add "$img" "$key" "$bits" "$block")
	e2fsck -fn "$dev" || fail "$tag: e2fsck through ublk found errors in what dm-crypt wrote"
	mount -o ro "$dev" "$dir/mnt"
	check "$dir/mnt" "dm-$tag" "$tag: written by dm-crypt, read by ublk"
	umount "$dir/mnt"
	no_plaintext "$img" "$dev" "$tag: written by dm-crypt"
	ublk_del "$dev"
	echo "ok: $tag: ublk -> dm-crypt and dm-crypt -> ublk, identical files, clean e2fsck, no plaintext on disk"
}

# luks_on_top: LUKS2 made by cryptsetup on a plain ublk device (no --encryption), as the
# README shows: format, open, a file system written and read back after del and add.
luks_on_top() {
	local img=$dir/luks.img dev
	truncate -s 64M "$img"
	head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/passphrase"
	dev=$("$UBLK" add --file "$img")
	at_exit sh -c "'$UBLK' del --id ${dev#/dev/ublkb} 2>/dev/null || true"
	# pbkdf2 with few iterations: the default argon2 costs minutes under TCG.
	cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
		--key-file "$dir/passphrase" "$dev" || fail "cryptsetup luksFormat of $dev failed"
	cryptsetup open --key-file "$dir/passphrase" "$dev" luks-top || fail "cryptsetup open of LUKS2 on $dev failed"
	at_exit sh -c "cryptsetup close luks-top 2>/dev/null || true"
	wait_for_path /dev/mapper/luks-top
	mkfs.ext4 -q -F /dev/mapper/luks-top
	mount /dev/mapper/luks-top "$dir/mnt"
	fill "$dir/mnt" luks
	umount "$dir/mnt"
	cryptsetup close luks-top
	ublk_del "$dev"
	dev=$("$UBLK" add --file "$img")
	cryptsetup open --key-file "$dir/passphrase" "$dev" luks-top || fail "LUKS2 did not open again after ublk del and add"
	wait_for_path /dev/mapper/luks-top
	e2fsck -fn /dev/mapper/luks-top >/dev/null || fail "LUKS2 on ublk: e2fsck found errors"
	mount -o ro /dev/mapper/luks-top "$dir/mnt"
	check "$dir/mnt" luks "LUKS2 on ublk"
	umount "$dir/mnt"
	no_plaintext "$img" /dev/mapper/luks-top "LUKS2 on ublk"
	cryptsetup close luks-top
	ublk_del "$dev"
	echo "ok: LUKS2 (cryptsetup luksFormat) on a plain ublk device: files read back after del and add, none in the clear"
}

round_trip 512 512
round_trip 4096 512
round_trip 512 256
round_trip 4096 256
echo "ok: the encrypting target's format is dm-crypt plain aes-xts-plain64 (block 512/4096, key 512/256 bits)"
luks_on_top
