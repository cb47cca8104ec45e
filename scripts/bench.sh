#!/usr/bin/env bash
# scripts/bench.sh [stun]
#
# STUN Binding benchmark: Portico with its io_uring driver, Portico with its epoll driver,
# coturn's turnserver (STUN-only), and `portico-perf echo-server` (a trivial responder that
# shows the load generator's own ceiling), each loaded by `portico-perf stun` at a fixed
# offered rate and flat out, in interleaved rounds (A B C D, A B C D, ...). Writes
# perf/RESULTS.md (medians, min–max spreads, ratios).
#
# Every server listens on 127.0.0.1 on a port picked at run time, with its own temporary
# state dir, is started fresh for each run and stopped after it; whatever this script started
# is stopped on exit, however it exits. Every run is bounded (--duration, 1 s timeout).
#
# Environment (defaults in brackets): BENCH_ROUNDS [5], BENCH_DURATION seconds per run [5],
# BENCH_RATE requests/s for the fixed-rate point [20000], BENCH_SOCKETS [16],
# BENCH_WINDOW outstanding requests per socket flat out [64], BENCH_OUT [perf/RESULTS.md],
# KEEP_WORK=1 keeps the temporary directory (per-run JSON and text reports, server logs).
set -euo pipefail

usage() {
    echo "usage: $0 [stun]" >&2
    exit 2
}
(($# <= 1)) || usage
scenario=${1:-stun}
[[ $scenario == stun ]] || usage

cd "$(dirname "$0")/.."
root=$PWD
rounds=${BENCH_ROUNDS:-5}
duration=${BENCH_DURATION:-5}
rate=${BENCH_RATE:-20000}
sockets=${BENCH_SOCKETS:-16}
window=${BENCH_WINDOW:-64}
out=${BENCH_OUT:-perf/RESULTS.md}
workers=2

die() {
    echo "bench.sh: $*" >&2
    exit 1
}
say() { echo "== $*" >&2; }

# Processes of the server currently under test, stopped in this order.
stop_pids=()
work=$(mktemp -d "${TMPDIR:-/tmp}/portico-bench.XXXXXX")

stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
stop_servers() {
    local pid
    for pid in "${stop_pids[@]}"; do
        stop_pid "$pid"
    done
    stop_pids=()
}
cleanup() {
    local rc=$?
    stop_servers
    if [[ -n ${KEEP_WORK:-} ]]; then
        echo "bench.sh: kept $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "building (release)"
cargo build --release --workspace
bin=$root/target/release
perf=$bin/portico-perf
[[ -x $bin/portico && -x $perf ]] || die "release binaries missing in $bin"

if ! command -v turnserver >/dev/null; then
    say "installing coturn"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y coturn || { apt-get update && apt-get install -y coturn; }
fi
command -v turnserver >/dev/null || die "turnserver (coturn) is not available"

# Waits until `target` answers STUN Binding (or the server process `pid` dies).
wait_stun() {
    local target=$1 pid=$2 i
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 1
        if "$perf" stun --quiet --target "$target" --sockets 1 --requests 3 \
            --timeout-ms 200 --duration 1 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

strip_ansi() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

# Each start_* sets: target (ip:port), measure_pids (charged for CPU/RSS), stop_pids.
start_portico() {
    local io=$1 tag=$2 port api dir main dp driver
    port=$("$perf" free-port)
    api=$("$perf" free-port)
    dir=$work/portico-$io-$tag
    mkdir -p "$dir"
    cat >"$dir/portico.toml" <<EOF
state_dir = "$dir/state"
log_level = "info"

[turn]
listen = ["127.0.0.1:$port"]
workers = $workers
io = "$io"

[api]
listen = "127.0.0.1:$api"
EOF
    NO_COLOR=1 "$bin/portico" run --config "$dir/portico.toml" >"$dir/log" 2>&1 &
    main=$!
    stop_pids=("$main")
    target=127.0.0.1:$port
    wait_stun "$target" "$main" || die "portico (io=$io) does not answer STUN: $(tail -5 "$dir/log")"
    dp=$(pgrep -P "$main" | head -1) || true
    [[ -n $dp ]] || die "portico (io=$io): no dataplane child process"
    stop_pids+=("$dp")
    measure_pids=("$main" "$dp")
    # The driver actually running, not just the one asked for: `auto` fallbacks must not
    # silently turn an io_uring measurement into an epoll one.
    driver=$(strip_ansi "$dir/log" | grep -o 'driver="[a-z_]*"' | head -1 | cut -d'"' -f2)
    [[ $driver == "$io" ]] || die "portico asked for io=$io but runs driver '$driver'"
    strip_ansi "$dir/log" | grep -q "workers=$workers" ||
        die "portico (io=$io) did not start $workers workers: $(strip_ansi "$dir/log" | head -3)"
}

coturn_flags=(-n --listening-ip 127.0.0.1 --relay-threads "$workers" --stun-only --no-cli
    --no-tls --no-dtls --no-rfc5780 --simple-log)
start_coturn() {
    local tag=$1 port dir pid
    port=$("$perf" free-port)
    dir=$work/coturn-$tag
    mkdir -p "$dir"
    turnserver "${coturn_flags[@]}" --listening-port "$port" --log-file "$dir/turn.log" \
        --pidfile "$dir/turnserver.pid" --userdb "$dir/turndb" >"$dir/stdout" 2>&1 &
    pid=$!
    stop_pids=("$pid")
    measure_pids=("$pid")
    target=127.0.0.1:$port
    wait_stun "$target" "$pid" || die "coturn does not answer STUN: $(tail -5 "$dir/stdout")"
}

start_echo() {
    local tag=$1 port dir pid
    port=$("$perf" free-port)
    dir=$work/echo-$tag
    mkdir -p "$dir"
    "$perf" echo-server --listen "127.0.0.1:$port" --threads "$workers" \
        --duration $((duration * 2 + 30)) >"$dir/log" 2>&1 &
    pid=$!
    stop_pids=("$pid")
    measure_pids=("$pid")
    target=127.0.0.1:$port
    wait_stun "$target" "$pid" || die "echo-server does not answer: $(tail -5 "$dir/log")"
}

start_server() {
    case $1 in
    portico-io_uring) start_portico io_uring "$2" ;;
    portico-epoll) start_portico epoll "$2" ;;
    coturn) start_coturn "$2" ;;
    echo-server) start_echo "$2" ;;
    *) die "unknown server $1" ;;
    esac
}

servers=(portico-io_uring portico-epoll coturn echo-server)
points=("rate$rate" flat)
results=$work/results
mkdir -p "$results"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
t0=$SECONDS

for round in $(seq "$rounds"); do
    for point in "${points[@]}"; do
        for server in "${servers[@]}"; do
            name=${server}__${point}__r${round}
            start_server "$server" "$name"
            load=(--window "$window")
            [[ $point == flat ]] || load=(--rate "$rate")
            pid_args=()
            for p in "${measure_pids[@]}"; do
                pid_args+=(--server-pid "$p")
            done
            rc=0
            "$perf" stun --quiet --target "$target" --sockets "$sockets" "${load[@]}" \
                --duration "$duration" --timeout-ms 1000 "${pid_args[@]}" \
                --json "$results/$name.json" >"$work/$name.txt" || rc=$?
            stop_servers
            ((rc == 0)) || die "$name: portico-perf exited $rc: $(cat "$work/$name.txt")"
            printf '[%3ds] round %s %-9s %-17s %s | %s\n' $((SECONDS - t0)) "$round" "$point" \
                "$server" "$(grep -o '([0-9]* tx/s)' "$work/$name.txt")" \
                "$(grep -o 'server CPU .*µs/tx)' "$work/$name.txt")" >&2
        done
    done
done

say "writing $out"
dirty=""
git diff --quiet HEAD 2>/dev/null || dirty=" + uncommitted changes"
virt=""
grep -qw hypervisor /proc/cpuinfo && virt=", virtual machine (hypervisor flag set)"
cmdline="scripts/bench.sh $scenario"
for v in BENCH_ROUNDS BENCH_DURATION BENCH_RATE BENCH_SOCKETS BENCH_WINDOW; do
    [[ -z ${!v:-} ]] || cmdline="$v=${!v} $cmdline"
done
"$perf" bench-report --dir "$results" --out "$out" --command "$cmdline" \
    --fact "date=$started_at, $((SECONDS - t0)) s of runs" \
    --fact "machine=$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)$virt" \
    --fact "kernel=$(uname -r) ($(. /etc/os-release && echo "$PRETTY_NAME"))" \
    --fact "load average (1/5/15 min)=before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)" \
    --fact "source=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$dirty" \
    --fact "portico-io_uring, portico-epoll=\`portico run\`, $workers workers, \`turn.io\` = io_uring / epoll (driver verified in the log), listen 127.0.0.1 only; CPU and RSS = controlplane + dataplane" \
    --fact "coturn=$(turnserver --version 2>/dev/null | head -1) \`turnserver ${coturn_flags[*]}\`" \
    --fact "echo-server=\`portico-perf echo-server --threads $workers\`: answers Binding with XOR-MAPPED-ADDRESS + FINGERPRINT, nothing else" \
    --fact "generator=\`portico-perf stun\`, 1 thread, $sockets connected UDP sockets, Binding + FINGERPRINT, every response parsed and its XOR-MAPPED-ADDRESS checked, 1 s timeout" \
    --server portico-io_uring --server portico-epoll --server coturn --server echo-server \
    --ratio portico-io_uring/portico-epoll --ratio portico-io_uring/coturn \
    --ratio portico-epoll/coturn --reference echo-server
say "done in $((SECONDS - t0)) s: $out"
