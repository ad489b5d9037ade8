#!/bin/bash
# 40-legacy-opcodes — the path of the first ublk kernels (bare command numbers,
# no GET_FEATURES), forced on this kernel: the mount test passes with it.
# timeout: 300
. "$(dirname "$0")/../lib.sh"
need_ublk
export UBLK_FORCE_LEGACY_OPCODES=1
"$UBLK" features | tee /dev/stderr | grep -q "^opcodes: legacy" || fail "ublk features does not report the legacy opcodes"
"$UBLK" features | grep -q "features: unknown" || fail "GET_FEATURES was used although legacy opcodes were forced"
bash "$(dirname "$0")/10-loop-mount.sh"
unset UBLK_FORCE_LEGACY_OPCODES
"$UBLK" features | grep -q "^opcodes: ioctl" || fail "without the override this kernel should use ioctl opcodes"
