#!/usr/bin/env bash
# scripts/fuzz.sh [TARGET|all] [EXECUTIONS]   (defaults: all, 10000000)
#
# Runs the libFuzzer targets of fuzz/ (cargo-fuzz) one after another, each for EXECUTIONS
# inputs (`-runs`), and prints per target the executions done, executions per second, the
# corpus growth and the findings. Not part of CI: it takes hours for all targets.
#
#   stun_parse     STUN parser, attribute decoders, integrity checks     (max_len 1500)
#   server_handle  datagrams into the protocol core, listen+relay sockets (max_len 4096)
#   turn_auth      TURN requests built from the input and signed with valid credentials,
#                  ChannelData, peer data, timers                       (max_len 4096)
#   config_load    configuration loader and round trip                  (max_len 12288)
#   http_sniff     proxy: HTTP/1 request/response heads, body framing    (max_len 4096)
#   sip_sniff      proxy: SIP first-message sniffer, refusals, monitor   (max_len 4096)
#   ldap_sniff     proxy: LDAP first-message sniffer, refusals, monitor  (max_len 4096)
#   h323_sniff     proxy: H.323 first-message sniffer, guard, monitor    (max_len 4096)
#   tls_hello      proxy port 443: ClientHello ALPN stun.turn peek and the
#                  first decrypted bytes, peeks of any length, against rustls (max_len 4096)
#   handoff_header the fd hand-off header proxy -> dataplane, round trip  (max_len 64)
#   tcp_framing    TURN over TCP/TLS: STUN/ChannelData framing of a stream read
#                  in chunks of any size, frames into the core (RFC 6062) (max_len 4096)
#   media_srtp     media relay: SRTP/SRTCP tag check before latching, legs  (max_len 4096)
#   (sip, ldap and h323 also run the per-message guard on the stream, and
#   check that reads of any size give the same answers as the whole stream)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). On a stable toolchain the nightly
# flags cargo-fuzz passes are allowed with RUSTC_BOOTSTRAP=1, which this script sets.
# Runs under `nice`. Seeds come from fuzz/corpus/TARGET (committed, never written to); what
# the fuzzer adds goes to fuzz/target/corpus/TARGET and is reused by later runs. A crash,
# timeout or out-of-memory input is written to fuzz/artifacts/TARGET/: reproduce it with
# `fuzz/target/x86_64-unknown-linux-gnu/release/TARGET FILE`, fix the code, then copy the
# file to fuzz/regressions/TARGET/ so `cargo test` replays it for good
# (dataplane/tests/fuzz_regressions.rs, controlplane/tests/proxy/fuzz_regressions.rs).
#
# Builds are optimised, with debug assertions and overflow checks on. Environment:
#   FUZZ_SANITIZER [none]  address adds AddressSanitizer (for unsafe code and the C of
#                          aws-lc) at a fraction of the speed
#   FUZZ_RSS_MB [2048]     -rss_limit_mb and -malloc_limit_mb
#   FUZZ_TIMEOUT s [10]    -timeout, per input
# Exit status 1 when any target found something.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ALL="stun_parse server_handle turn_auth config_load http_sniff sip_sniff ldap_sniff h323_sniff"
ALL="$ALL tls_hello handoff_header tcp_framing media_srtp"
TARGET=${1:-all}
RUNS=${2:-10000000}
SANITIZER=${FUZZ_SANITIZER:-none}
RSS_MB=${FUZZ_RSS_MB:-2048}
TIMEOUT=${FUZZ_TIMEOUT:-10}

max_len() {
    case $1 in
        stun_parse) echo 1500 ;;
        config_load) echo 12288 ;;
        handoff_header) echo 64 ;;
        *) echo 4096 ;;
    esac
}

if [ "$TARGET" = all ]; then
    TARGETS=$ALL
elif [[ " $ALL " == *" $TARGET "* ]]; then
    TARGETS=$TARGET
else
    echo "unknown target '$TARGET'; targets: $ALL" >&2
    exit 2
fi
if ! [[ "$RUNS" =~ ^[0-9]+$ ]]; then
    echo "EXECUTIONS must be a number, not '$RUNS'" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
echo "building the fuzz targets (sanitizer: $SANITIZER)"
# `cargo fuzz build` takes one target or none (= all).
BUILD=$TARGET
[ "$BUILD" = all ] && BUILD=
# shellcheck disable=SC2086
if ! nice cargo fuzz build -s "$SANITIZER" $BUILD; then
    echo "building the fuzz targets failed" >&2
    exit 1
fi
BIN=$ROOT/fuzz/target/x86_64-unknown-linux-gnu/release

declare -a SUMMARY=()
FOUND=0
for t in $TARGETS; do
    work=$ROOT/fuzz/target/corpus/$t
    artifacts=$ROOT/fuzz/artifacts/$t
    mkdir -p "$work" "$artifacts" "$ROOT/fuzz/corpus/$t"
    log=$ROOT/fuzz/target/fuzz-$t.log
    marker=$(mktemp)
    echo
    echo "==== $t: $RUNS executions, max_len $(max_len "$t") ===="
    t0=$(date +%s)
    # The first corpus directory receives new inputs; the committed seeds are only read.
    nice -n 10 "$BIN/$t" "$work" "$ROOT/fuzz/corpus/$t" \
        -runs="$RUNS" -max_len="$(max_len "$t")" -rss_limit_mb="$RSS_MB" \
        -malloc_limit_mb="$RSS_MB" -timeout="$TIMEOUT" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1
    status=$?
    secs=$(( $(date +%s) - t0 ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    added=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
    # Without final stats (crash), the last status line has the count.
    if [ -z "$execs" ]; then
        execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
        rate=$(grep -o 'exec/s: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    fi
    new=$(find "$artifacts" -type f -newer "$marker")
    rm -f "$marker"
    findings=$(printf '%s' "$new" | grep -c . || true)
    if [ "$status" -ne 0 ] || [ "$findings" -ne 0 ]; then
        FOUND=1
        grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY)' "$log" | head -8
        printf 'finding: %s\n' $new
        echo "full log: $log"
    fi
    line=$(printf '%-14s %12s execs %8s exec/s %6s s  +%s units  corpus %s  findings %s (exit %s)' \
        "$t" "${execs:-?}" "${rate:-?}" "$secs" "${added:-?}" \
        "$(find "$work" -type f | wc -l)" "$findings" "$status")
    echo "$line"
    SUMMARY+=("$line")
done

echo
echo "==== summary ===="
printf '%s\n' "${SUMMARY[@]}"
[ "$FOUND" -eq 0 ] || echo "inputs that failed are in fuzz/artifacts/TARGET/"
exit "$FOUND"
