#!/usr/bin/env bash
# The one test command: installs the third-party tools the tests run against Portico, then
# checks formatting, lints, builds, and runs every test (unit, integration, interop).
# Also what CI runs (.ci/run), as root on a fresh Debian 12 clone.
#
# Exit status is non-zero when any step fails; every step runs regardless, so one run
# shows all problems. The last line is "N passed, N failed" over all cargo test results.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# nginx, slapd and kamailio live in sbin, which a non-login root shell may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Tools the tests need, as "debian-package:command-it-provides". Add a pair per new tool
# (e.g. nginx:nginx slapd:slapd ldap-utils:ldapsearch kamailio:kamailio
# prometheus:prometheus); a package is installed when one of its commands is missing.
REQUIRED_TOOLS="
coturn:turnutils_stunclient
coturn:turnutils_natdiscovery
coturn:turnutils_uclient
coturn:turnutils_peer
stun-client:stun
iproute2:ip
prometheus:prometheus
prometheus:promtool
nginx:nginx
slapd:slapd
ldap-utils:ldapsearch
kamailio:kamailio
curl:curl
redis-server:redis-server
openssl:openssl
tshark:tshark
wireshark-common:text2pcap
python3:python3
python3-pip:pip3
nftables:nft
chromium:chromium
sip-tester:sipp
baresip:baresip
rtpengine-daemon:rtpengine
ethtool:ethtool
clang:clang
llvm:llc
libbpf-dev:/usr/include/bpf/bpf_helpers.h
"

# Upper bounds per step, so a hung test cannot use up CI's time; normal runs are far below.
FMT_LIMIT=5m
CLIPPY_LIMIT=25m
BUILD_LIMIT=25m
TEST_LIMIT=30m

# shellcheck source=lib/common.sh
source "$ROOT/scripts/lib/common.sh"
# shellcheck source=lib/install.sh
source "$ROOT/scripts/lib/install.sh"

START=$(date +%s)
declare -a FAILED_STEPS=()
declare -a SKIPPED_STEPS=()

section "Tools"
if ! install_missing_tools "$REQUIRED_TOOLS"; then
    echo "FATAL: could not install the tools the tests need (see above)." >&2
    echo "0 passed, 1 failed"
    exit 1
fi

# Python packages the tests use as independent peers: pycrate (H.225.0 in aligned PER,
# for the H.323 proxy tests) and aioice (ICE agents relaying through Portico over TURN).
# Debian 12's pip refuses system-wide installs without --break-system-packages; pycrate has no
# dependencies and aioice only pure-Python ones (dnspython, ifaddr), so nothing of Debian's is
# replaced.
if ! python3 -c 'import pycrate_asn1dir.H225' 2>/dev/null; then
    python3 -m pip install --quiet --break-system-packages 'pycrate==0.8.1' ||
        echo "warning: pip could not install pycrate; the H.323 proxy tests will fail" >&2
fi
if ! python3 -c 'import aioice' 2>/dev/null; then
    python3 -m pip install --quiet --break-system-packages 'aioice==0.13.0' ||
        echo "warning: pip could not install aioice; the aioice interop tests will fail" >&2
fi
# cryptography: AES-CTR for the media test's independent SRTP tag computation.
if ! python3 -c 'import cryptography.hazmat.primitives.ciphers' 2>/dev/null; then
    python3 -m pip install --quiet --break-system-packages 'cryptography>=3.1' ||
        echo "warning: pip could not install cryptography; the media SRTP test will fail" >&2
fi

section "Environment"
uname -srm
cargo --version
rustc --version
for c in $(tool_commands "$REQUIRED_TOOLS"); do
    printf '  %-24s %s\n' "$c" "$(command -v "$c" || { [ -e "$c" ] && echo present; } || true)"
done
if ! ip -6 addr show dev lo 2>/dev/null | grep -q '::1/128'; then
    echo "warning: ::1 is not configured on lo; the IPv6 tests will fail" >&2
fi
# Failed integration tests keep their temp dirs for the post-mortem; drop old ones.
find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'portico-it-*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true

section "cargo fmt --all -- --check"
step fmt "$FMT_LIMIT" cargo fmt --all -- --check

section "cargo clippy --workspace --all-targets -- -D warnings"
step clippy "$CLIPPY_LIMIT" cargo clippy --workspace --all-targets -- -D warnings

section "MSRV: cargo +RUST_VERSION check --workspace --all-targets --locked"
# The rust-version every crate declares, checked with that toolchain (rustup installs it on
# first use). Where it cannot be installed the step says so loudly and is listed as skipped.
MSRV=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ -n "$MSRV" ] && rustup toolchain install "$MSRV" --profile minimal >/dev/null 2>&1; then
    step msrv "$BUILD_LIMIT" env CARGO_TARGET_DIR="$ROOT/target/msrv" \
        cargo "+$MSRV" check --workspace --all-targets --locked
else
    echo "WARNING: the declared rust-version ($MSRV) toolchain could not be installed; MSRV check SKIPPED" >&2
    SKIPPED_STEPS+=("msrv")
fi

section "cargo build --workspace"
# Builds portico-dataplane beside portico, which the integration tests start.
step build "$BUILD_LIMIT" cargo build --workspace

section "cargo test --workspace"
TEST_LOG=$(mktemp "${TMPDIR:-/tmp}/portico-test-log.XXXXXX")
# RUST_BACKTRACE=0: a failing assertion message is what matters, and it stays readable.
RUST_BACKTRACE=0 timeout --kill-after=30s "$TEST_LIMIT" \
    cargo test --workspace --no-fail-fast 2>&1 | tee "$TEST_LOG"
TEST_STATUS=${PIPESTATUS[0]}
if [ "$TEST_STATUS" -eq 124 ]; then
    echo "cargo test did not finish within $TEST_LIMIT" >&2
fi
[ "$TEST_STATUS" -eq 0 ] || FAILED_STEPS+=("test")

read -r PASSED FAILED < <(sum_test_results "$TEST_LOG")
rm -f "$TEST_LOG"
if [ "$TEST_STATUS" -ne 0 ] && [ "$FAILED" -eq 0 ]; then
    # cargo test failed without a failing test: it did not build, or it was killed.
    FAILED=1
fi

section "Summary"
echo "took $(( $(date +%s) - START )) s"
if [ "${#SKIPPED_STEPS[@]}" -gt 0 ]; then
    echo "SKIPPED steps: ${SKIPPED_STEPS[*]}"
fi
if [ "${#FAILED_STEPS[@]}" -eq 0 ]; then
    echo "all steps passed: fmt clippy msrv build test"
    STATUS=0
else
    echo "FAILED steps: ${FAILED_STEPS[*]}"
    STATUS=1
fi
echo "$PASSED passed, $FAILED failed"
exit "$STATUS"
