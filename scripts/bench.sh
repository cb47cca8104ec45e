#!/usr/bin/env bash
# scripts/bench.sh [stun|turn|turn-tcp|fastpath|media-fastpath|proxy|fraud|register|media|profile|scale|all]   (default: stun)
#
# Side-by-side benchmarks on the machine this runs on, written into perf/RESULTS.md (one
# section per scenario; running one scenario replaces only its own section):
#
#   stun     STUN Binding: Portico io_uring, Portico epoll, coturn --stun-only, and
#            `portico-perf echo-server` (the generator's ceiling), fixed rate and flat out.
#   turn     TURN relay: Portico (io_uring, 2 workers) vs coturn (2 relay threads), loaded by
#            `portico-perf turn` (and `echo-server --turn`, a do-nothing relay, for the
#            generator's ceiling): (a) ramp of streams until loss > 0.1%, flat out,
#            (b) 1000 streams × 50 pkt/s for 60 s, (c) allocation churn, (d) coturn's own
#            turnutils_uclient + turnutils_peer at one fixed load. Charts in perf/charts/.
#   turn-tcp TURN over TCP and over TLS: Portico vs coturn, the same generator
#            (`portico-perf turn --transport tcp|tls`, a connection per client from its own
#            loopback address), TURN_TCP_STREAMS (1000) streams × 50 pkt/s for
#            TURN_TCP_DURATION (20) s, TURN_TCP_ROUNDS (2) rounds, servers interleaved; plus
#            Portico's one port 443 (`proxy.turn_on_https`) with and without ALPN stun.turn.
#            TURN_TCP_SERVERS ("portico coturn") may add `portico-epoll`: Portico with
#            `turn.io = "epoll"`, whose TCP thread then writes without io_uring (a system
#            call per write), and `portico-uncoalesced`: Portico with
#            `turn.tcp_coalesce_us = 0` (no interrupt coalescing), for A/Bs within the same rounds.
#   fastpath TURN relay with the kernel fast path (`turn.fast_path = "on"`) vs Portico's
#            user-space relay vs coturn (`portico-perf turn`), 1000 streams × 50 pkt/s and
#            flat out, in network namespaces this script creates and deletes (the TC program
#            is attached only to their interfaces, never to the host's). FP_TOPOLOGY=veth
#            (default): servers in one namespace, generator (clients from 10.78.0.0/16, peers
#            on 10.77.0.2) in another, joined by a veth pair; with 2+ cores the generator is
#            pinned to CPU 0 and the servers to CPU 1, and each veth end's receive work
#            steered to its side's CPU (RPS), so CPU 1's busy time is the servers' side,
#            softirq included. FP_TOPOLOGY=lo: everything on one namespace's `lo`.
#            Machine-wide CPU per million relayed packets from /proc/stat, with and without
#            the generator's own CPU (scripts/fastpath_report.py writes the section).
#   media-fastpath
#            media relay sessions with the kernel fast path vs Portico's user-space media
#            relay vs rtpengine (userspace; its kernel module needs a DKMS build for this
#            kernel), in fastpath's veth topology: `portico-perf media` in the generator
#            namespace (endpoints on 10.77.0.2) creates MFP_SESSIONS (1000) sessions through
#            Portico's API or rtpengine's ng protocol on 10.77.0.1 and sends RTP at 50 pkt/s
#            each way for MFP_SECONDS (20) s, MFP_ROUNDS (2) rounds, servers interleaved;
#            machine-wide CPU per million relayed packets, minus the generator, and the
#            pinned servers' CPU (scripts/media_fastpath_report.py writes the section).
#   proxy    scripts/bench-proxy.sh (Portico vs HAProxy, HTTP/HTTPS/TLS handshakes), merged.
#   fraud    brute-force reaction: the fraud tests' brute forces (TURN over UDP, HTTP Basic,
#            SIP digest, LDAP bind; thresholds 5 and 20), built with --release and run
#            FRAUD_ROUNDS times one test at a time; attempts answered before the cut.
#   register H.323 registrations (pycrate's RRQ from controlplane/tests/proxy/seeds.txt, RAS
#            per H.460.17) beside SIP REGISTER through the reverse proxy, over TCP and TLS,
#            to a fake PBX inside `portico-perf register` that answers RCF / 200 OK: a new
#            connection per registration (fixed rate and flat out) and kept connections;
#            registrations/s, latency, Portico's CPU per registration. Runs alternate h323,
#            sip, h323, sip ...; one Portico per round; `-direct` runs skip the proxy.
#   profile  where Portico's relay spends CPU: `perf record -e cpu-clock` of Portico and of
#            coturn under the same TURN load, and callgrind of Portico's dataplane; written
#            to perf/profile/ (linked from the TURN section).
#   scale    allocations held: `portico-perf turn-scale` grows Portico with relay_mode =
#            "shared" (no descriptor per relay), Portico with a socket per relay, then coturn, through
#            10k, 50k and 100k allocations (one loopback source address per client), each
#            with a light keep-alive (Refresh, ChannelBind, a ChannelData packet every few
#            seconds); per level RSS, kernel Slab/SUnreclaim and UDP socket memory, CPU,
#            Allocate p99 while holding, failed refreshes; churn at 50k; CPU while all
#            expire. Levels the descriptor limit cannot hold (RLIMIT_NOFILE hard limit,
#            raised first when this shell may) are replaced by the largest that fits, and
#            the section says so. About 5 minutes per server (coturn: 15, as it grants at
#            least its 600 s default lifetime). Then `portico-perf sk-lookup-probe`: a
#            relay port range steered to one socket by eBPF sk_lookup (feasibility).
#   all      stun (3 rounds), turn, proxy (about 18 minutes of runs with the defaults).
#
# Servers run on 127.0.0.1 on ports picked at run time, each with its own temporary state
# dir, started fresh for each run (a ramp round shares one server across its steps) and
# stopped after it; whatever this script started is stopped on exit, however it exits. Runs
# alternate between servers (A B A B ...). Every run is bounded in time.
#
# Environment (defaults in brackets):
#   STUN:  BENCH_ROUNDS [5; 3 under `all`], BENCH_DURATION s [5], BENCH_RATE req/s [20000],
#          BENCH_SOCKETS [16], BENCH_WINDOW [64]
#   TURN:  TURN_ROUNDS [3], TURN_SCENARIOS ["ramp flat sustained churn uclient"],
#          TURN_RAMP_STEPS streams ["100 300 600 1000 1500 2000"], TURN_RAMP_DURATION s [3],
#          TURN_RATE pkt/s per stream [50], TURN_FLAT_CLIENTS [100], TURN_FLAT_WINDOW [8],
#          TURN_FLAT_DURATION s [5], TURN_STREAMS [1000], TURN_DURATION s [60],
#          TURN_CHURN_CLIENTS [32], TURN_CHURN_DURATION s [10], TURN_UCLIENT_CLIENTS [100],
#          TURN_UCLIENT_MESSAGES per client [400]
#   fastpath: FP_ROUNDS [3], FP_STREAMS [1000], FP_RATE pkt/s per stream [50],
#          FP_DURATION s [60], FP_SERVERS ["portico-fastpath portico coturn"], FP_TOPOLOGY
#          [veth; or lo], FP_FLAT_CLIENTS [100], FP_FLAT_WINDOW [8], FP_FLAT_DURATION s [10]
#          (FP_FLAT_DURATION=0: no flat-out runs), FP_PIN_SERVERS [1; 0: servers on any CPU,
#          the generator still on CPU 0]
#   proxy: PROXY_DURATION s per measurement [10], PROXY_CONNS [50]
#   fraud: FRAUD_ROUNDS [3]
#   register: REGISTER_ROUNDS [3], REGISTER_DURATION s per run [4], REGISTER_RATE reg/s [500],
#          REGISTER_CONNS connections at a time [8], REGISTER_POINTS ["rate flat kept"],
#          REGISTER_TRANSPORTS ["tcp tls direct"]
#   profile: PROFILE_DURATION s of sampling [15], PROFILE_STREAMS [1000]
#   scale: SCALE_LEVELS ["10000 50000 100000"], SCALE_HOLD s per level [30], SCALE_LIFETIME s
#          [60], SCALE_REFRESH s [30], SCALE_DATA s between packets [5], SCALE_CHURN_LEVEL
#          [50000], SCALE_CHURN_DURATION s [20], SCALE_SERVERS ["portico-shared portico coturn"],
#          SCALE_EXPIRY_MAX s [700] (coturn grants at least its 600 s default lifetime)
#   BENCH_OUT [perf/RESULTS.md]; KEEP_WORK=1 keeps the temporary directory (per-run JSON and
#   text reports, server logs). A quick TURN run: TURN_ROUNDS=1 TURN_DURATION=10
#   TURN_RAMP_STEPS="100 1000" TURN_SCENARIOS="ramp sustained" scripts/bench.sh turn
set -euo pipefail

usage() {
    echo "usage: $0 [stun|turn|turn-tcp|fastpath|media-fastpath|proxy|fraud|register|media|profile|scale|all]" >&2
    exit 2
}
(($# <= 1)) || usage
scenario=${1:-stun}
case $scenario in
stun | turn | turn-tcp | fastpath | media-fastpath | proxy | fraud | register | media | profile | scale | all) ;;
*) usage ;;
esac

cd "$(dirname "$0")/.."
root=$PWD
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
out=${BENCH_OUT:-perf/RESULTS.md}
workers=2

die() {
    echo "bench.sh: $*" >&2
    exit 1
}
say() { echo "== $*" >&2; }

# Processes of the server currently under test (and its helpers), stopped in this order.
stop_pids=()
# `ip netns exec NS` when servers and generator run in a namespace (fastpath), else empty.
in_ns=()
# Namespaces this script created (deleted on exit).
bench_ns=""
# The generator's prefix (namespace, CPU) and extra `portico-perf turn` arguments, and the
# servers' CPU prefix; the TURN servers' address and the peers' network. Loopback unless the
# fastpath scenario's veth topology sets them.
gen_ns=()
gen_args=()
srv_pin=()
turn_ip=127.0.0.1
turn_peers=127.0.0.0/8
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
    local ns
    for ns in $bench_ns; do
        ip netns del "$ns" 2>/dev/null || true
    done
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

# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"
tools="coturn:turnserver coturn:turnutils_uclient coturn:turnutils_peer"
case $scenario in
proxy | all) tools="$tools nginx:nginx haproxy:haproxy wrk:wrk openssl:openssl python3:python3" ;;
esac
[[ $scenario == profile ]] && tools="$tools valgrind:valgrind linux-perf:perf"
[[ $scenario == turn-tcp ]] && tools="$tools openssl:openssl"
[[ $scenario == media-fastpath ]] && tools="$tools rtpengine-daemon:rtpengine curl:curl"
# Installs without starting services (coturn's would take port 3478): see lib/install.sh.
install_missing_tools "$tools" >&2 || die "could not install the tools this benchmark needs"

say "building (release)"
cargo build --release --workspace
bin=$root/target/release
perf=$bin/portico-perf
[[ -x $bin/portico && -x $bin/portico-dataplane && -x $perf ]] ||
    die "release binaries missing in $bin"

strip_ansi() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

# Facts every section's setup table carries.
common_facts() {
    local dirty="" virt=""
    git diff --quiet HEAD 2>/dev/null || dirty=" + uncommitted changes"
    grep -qw hypervisor /proc/cpuinfo && virt=", virtual machine (hypervisor flag set)"
    facts=(
        --fact "machine=$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)$virt"
        --fact "kernel=$(uname -r) ($(. /etc/os-release && echo "$PRETTY_NAME"))"
        --fact "source=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$dirty"
    )
}

# The command line that reproduces a section (the scenario this script was started with, so
# `all` says `all`), with the variables that were set.
command_line() {
    local cmd="scripts/bench.sh $scenario" v
    shift
    for v in "$@"; do
        [[ -z ${!v:-} ]] && continue
        if [[ ${!v} == *" "* ]]; then
            cmd="$v=\"${!v}\" $cmd"
        else
            cmd="$v=${!v} $cmd"
        fi
    done
    echo "$cmd"
}

# ---------------------------------------------------------------------------------------
# STUN
# ---------------------------------------------------------------------------------------

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

# Starts `portico run` with the config in "$dir/portico.toml"; sets stop_pids, measure_pids.
launch_portico() {
    local dir=$1 io=$2 main dp driver i
    NO_COLOR=1 "${srv_pin[@]}" "${in_ns[@]}" "$bin/portico" run --config "$dir/portico.toml" >"$dir/log" 2>&1 &
    main=$!
    stop_pids=("$main")
    dp=""
    for i in $(seq 100); do
        dp=$(pgrep -P "$main" | head -1) || true
        [[ -n $dp ]] && strip_ansi "$dir/log" | grep -q 'driver=' && break
        kill -0 "$main" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $dp ]] || die "portico (io=$io): no dataplane child process: $(tail -5 "$dir/log")"
    stop_pids+=("$dp")
    measure_pids=("$main" "$dp")
    # The driver actually running, not just the one asked for: `auto` fallbacks must not
    # silently turn an io_uring measurement into an epoll one.
    driver=$(strip_ansi "$dir/log" | grep -o 'driver="[a-z_]*"' | head -1 | cut -d'"' -f2)
    [[ $driver == "$io" ]] || die "portico asked for io=$io but runs driver '$driver'"
    strip_ansi "$dir/log" | grep -q "workers=$workers" ||
        die "portico (io=$io) did not start $workers workers: $(strip_ansi "$dir/log" | head -3)"
}

# Each start_* sets: target (ip:port), measure_pids (charged for CPU/RSS), stop_pids.
start_portico_stun() {
    local io=$1 tag=$2 port api dir
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
    target=127.0.0.1:$port
    launch_portico "$dir" "$io"
    wait_stun "$target" "${stop_pids[0]}" ||
        die "portico (io=$io) does not answer STUN: $(tail -5 "$dir/log")"
}

coturn_stun_flags=(-n --listening-ip 127.0.0.1 --relay-threads "$workers" --stun-only --no-cli
    --no-tls --no-dtls --no-rfc5780 --simple-log)
start_coturn_stun() {
    local tag=$1 port dir pid
    port=$("$perf" free-port)
    dir=$work/coturn-$tag
    mkdir -p "$dir"
    turnserver "${coturn_stun_flags[@]}" --listening-port "$port" --log-file "$dir/turn.log" \
        --pidfile "$dir/turnserver.pid" --userdb "$dir/turndb" >"$dir/stdout" 2>&1 &
    pid=$!
    stop_pids=("$pid")
    measure_pids=("$pid")
    target=127.0.0.1:$port
    wait_stun "$target" "$pid" || die "coturn does not answer STUN: $(tail -5 "$dir/stdout")"
}

start_echo() {
    local tag=$1 secs=$2 port dir pid
    shift 2
    port=$("$perf" free-port)
    dir=$work/echo-$tag
    mkdir -p "$dir"
    "${in_ns[@]}" "$perf" echo-server --listen "127.0.0.1:$port" --threads "$workers" \
        --duration "$secs" "$@" >"$dir/log" 2>&1 &
    pid=$!
    stop_pids=("$pid")
    measure_pids=("$pid")
    target=127.0.0.1:$port
    wait_stun "$target" "$pid" || die "echo-server does not answer: $(tail -5 "$dir/log")"
}

run_stun() {
    local rounds=${BENCH_ROUNDS:-$1} duration=${BENCH_DURATION:-5} rate=${BENCH_RATE:-20000}
    local sockets=${BENCH_SOCKETS:-16} window=${BENCH_WINDOW:-64}
    local results=$work/stun-results round point server name rc load p t0=$SECONDS
    local servers=(portico-io_uring portico-epoll coturn echo-server)
    local points=("rate$rate" flat)
    local load_before started_at
    mkdir -p "$results"
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    say "STUN: $rounds rounds × ${#points[@]} load points × ${#servers[@]} servers, $duration s each"
    for round in $(seq "$rounds"); do
        for point in "${points[@]}"; do
            for server in "${servers[@]}"; do
                name=${server}__${point}__r${round}
                case $server in
                portico-io_uring) start_portico_stun io_uring "$name" ;;
                portico-epoll) start_portico_stun epoll "$name" ;;
                coturn) start_coturn_stun "$name" ;;
                echo-server) start_echo "$name" $((duration * 2 + 30)) ;;
                esac
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
                printf '[%3ds] round %s %-9s %-17s %s | %s\n' $((SECONDS - t0)) "$round" \
                    "$point" "$server" "$(grep -o '([0-9]* tx/s)' "$work/$name.txt")" \
                    "$(grep -o 'server CPU .*µs/tx)' "$work/$name.txt")" >&2
            done
        done
    done
    say "writing the STUN section of $out"
    common_facts
    "$perf" bench-report --kind stun --dir "$results" --out "$out" \
        --command "$(command_line stun BENCH_ROUNDS BENCH_DURATION BENCH_RATE BENCH_SOCKETS BENCH_WINDOW)" \
        --fact "date=$started_at, $((SECONDS - t0)) s of runs" "${facts[@]}" \
        --fact "load average (1/5/15 min)=before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)" \
        --fact "portico-io_uring, portico-epoll=\`portico run\`, $workers workers, \`turn.io\` = io_uring / epoll (driver verified in the log), listen 127.0.0.1 only; CPU and RSS = controlplane + dataplane" \
        --fact "coturn=$(turnserver --version 2>/dev/null | head -1) \`turnserver ${coturn_stun_flags[*]}\`" \
        --fact "echo-server=\`portico-perf echo-server --threads $workers\`: answers Binding with XOR-MAPPED-ADDRESS + FINGERPRINT, nothing else" \
        --fact "generator=\`portico-perf stun\`, 1 thread, $sockets connected UDP sockets, Binding + FINGERPRINT, every response parsed and its XOR-MAPPED-ADDRESS checked, 1 s timeout" \
        --server portico-io_uring --server portico-epoll --server coturn --server echo-server \
        --ratio portico-io_uring/portico-epoll --ratio portico-io_uring/coturn \
        --ratio portico-epoll/coturn --reference echo-server
}

# ---------------------------------------------------------------------------------------
# TURN
# ---------------------------------------------------------------------------------------

turn_user=bench
turn_password=bench-secret
turn_realm=bench
relay_ports=16384-32767

# Waits until `target` relays: one allocation with a short burst of data (or `pid` dies).
wait_turn() {
    local target=$1 pid=$2 i
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 1
        if "${gen_ns[@]}" "$perf" turn --quiet --server "$target" --user "$turn_user" \
            --password "$turn_password" "${gen_args[@]}" --clients 1 --rate 20 --duration 0.2 \
            --timeout-ms 200 --setup-timeout 2 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

start_portico_turn() {
    local tag=$1 port api dir
    port=$("$perf" free-port)
    api=$("$perf" free-port)
    dir=$work/portico-$tag
    mkdir -p "$dir"
    cat >"$dir/portico.toml" <<EOF
state_dir = "$dir/state"
log_level = "info"

[turn]
listen = ["$turn_ip:$port"]
relay_ip = ["$turn_ip"]
workers = $workers
io = "io_uring"
fast_path = "${turn_fast_path:-off}"
realm = "$turn_realm"
users = [{ name = "$turn_user", password = "$turn_password" }]
allow_peers = ["$turn_peers"]
relay_ports = "$relay_ports"
max_allocations = 8192
max_allocations_per_user = 100000

[api]
listen = "127.0.0.1:$api"
EOF
    target=$turn_ip:$port
    launch_portico "$dir" io_uring
    wait_turn "$target" "${stop_pids[0]}" ||
        die "portico does not relay TURN: $(strip_ansi "$dir/log" | tail -5)"
}

coturn_turn_flags=(-n --relay-threads "$workers"
    --lt-cred-mech --user "$turn_user:$turn_password" --realm "$turn_realm"
    --allow-loopback-peers --no-cli --no-tls --no-dtls --simple-log
    --min-port "${relay_ports%-*}" --max-port "${relay_ports#*-}")
start_coturn_turn() {
    local tag=$1 port dir pid
    port=$("$perf" free-port)
    dir=$work/coturn-$tag
    mkdir -p "$dir"
    "${srv_pin[@]}" "${in_ns[@]}" turnserver "${coturn_turn_flags[@]}" \
        --listening-ip "$turn_ip" --relay-ip "$turn_ip" --listening-port "$port" \
        --log-file "$dir/turn.log" --pidfile "$dir/turnserver.pid" --userdb "$dir/turndb" \
        >"$dir/stdout" 2>&1 &
    pid=$!
    stop_pids=("$pid")
    measure_pids=("$pid")
    target=$turn_ip:$port
    wait_turn "$target" "$pid" || die "coturn does not relay TURN: $(tail -5 "$dir/stdout")"
}

start_turn_stub() {
    start_echo "$1" 3600 --turn
    wait_turn "$target" "${stop_pids[0]}" || die "echo-server --turn does not relay"
}

start_turn_server() {
    case $1 in
    portico) start_portico_turn "$2" ;;
    portico-fastpath)
        turn_fast_path=on start_portico_turn "$2"
        strip_ansi "$work/portico-$2/log" | grep -q 'kernel fast path loaded' ||
            die "the fast path did not load: $(strip_ansi "$work/portico-$2/log" | grep -i 'fast' | head -3)"
        ;;
    coturn) start_coturn_turn "$2" ;;
    turn-stub) start_turn_stub "$2" ;;
    *) die "unknown server $1" ;;
    esac
}

# turn_run NAME ARGS...: one `portico-perf turn` run against $target, charged to
# $measure_pids; the JSON goes to $turn_results/NAME.json. Prints a one-line summary.
turn_run() {
    local name=$1 rc=0 p pid_args=()
    shift
    for p in "${measure_pids[@]}"; do
        pid_args+=(--server-pid "$p")
    done
    "${gen_ns[@]}" "$perf" turn --quiet --server "$target" --user "$turn_user" \
        --password "$turn_password" "${gen_args[@]}" "${pid_args[@]}" --json "$turn_results/$name.json" "$@" >"$work/$name.txt" 2>&1 || rc=$?
    ((rc == 0)) || die "$name: portico-perf turn exited $rc: $(cat "$work/$name.txt")"
    printf '[%4ds] %-28s %s | %s | %s\n' $((SECONDS - turn_t0)) "$name" \
        "$(grep -o 'relayed .*loss [0-9.]*%' "$work/$name.txt" || grep -o 'churn .*allocations/s' "$work/$name.txt")" \
        "$(grep -o '([0-9.]* CPU-s per million[^)]*)\|([0-9.]* µs per churn cycle)' "$work/$name.txt")" \
        "$(grep -o 'per 1000 allocations [0-9.]* MiB' "$work/$name.txt" || true)" >&2
}

# Round-trip loss of a run, from its JSON report.
run_loss() {
    grep -o '"round_trip_loss_ratio": [0-9.e+-]*' "$1" | awk '{print $2}' || echo 1
}

run_turn() {
    local rounds=${TURN_ROUNDS:-3} rate=${TURN_RATE:-50}
    local steps=${TURN_RAMP_STEPS:-"100 300 600 1000 1500 2000"} ramp_s=${TURN_RAMP_DURATION:-3}
    local flat_clients=${TURN_FLAT_CLIENTS:-100} flat_window=${TURN_FLAT_WINDOW:-8}
    local flat_s=${TURN_FLAT_DURATION:-5} streams=${TURN_STREAMS:-1000} sustained_s=${TURN_DURATION:-60}
    local churn_clients=${TURN_CHURN_CLIENTS:-32} churn_s=${TURN_CHURN_DURATION:-10}
    local uc_clients=${TURN_UCLIENT_CLIENTS:-100} uc_messages=${TURN_UCLIENT_MESSAGES:-400}
    local scenarios=${TURN_SCENARIOS:-"ramp flat sustained churn uclient"}
    local round server n name loss peer_port peer_pid uc rc load_before started_at
    turn_results=$work/turn-results
    mkdir -p "$turn_results"
    turn_t0=$SECONDS
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    say "TURN: scenarios '$scenarios', $rounds rounds"
    uc=(turnutils_uclient -c -m "$uc_clients" -n "$uc_messages" -l 172 -u "$turn_user"
        -w "$turn_password")
    for round in $(seq "$rounds"); do
        if [[ " $scenarios " == *" ramp "* ]]; then
            # The do-nothing relay shows the generator's own line; one round is enough.
            local ramp_servers=(portico coturn)
            ((round > 1)) || ramp_servers+=(turn-stub)
            for server in "${ramp_servers[@]}"; do
                start_turn_server "$server" "$server-ramp-r$round"
                for n in $steps; do
                    name=${server}__ramp${n}__r${round}
                    turn_run "$name" --clients "$n" --rate "$rate" --duration "$ramp_s"
                    loss=$(run_loss "$turn_results/$name.json")
                    if awk -v l="$loss" 'BEGIN { exit !(l > 0.001) }'; then
                        echo "         $server saturated at $n streams (loss $loss)" >&2
                        break
                    fi
                done
                stop_servers
            done
        fi
        if [[ " $scenarios " == *" flat "* ]]; then
            for server in portico coturn turn-stub; do
                name=${server}__flat__r${round}
                start_turn_server "$server" "$name"
                turn_run "$name" --clients "$flat_clients" --flat-out --window "$flat_window" \
                    --duration "$flat_s"
                stop_servers
            done
        fi
        if [[ " $scenarios " == *" sustained "* ]]; then
            for server in portico coturn; do
                name=${server}__sustained__r${round}
                start_turn_server "$server" "$name"
                turn_run "$name" --clients "$streams" --rate "$rate" --duration "$sustained_s"
                stop_servers
            done
        fi
        if [[ " $scenarios " == *" churn "* ]]; then
            for server in portico coturn; do
                name=${server}__churn__r${round}
                start_turn_server "$server" "$name"
                turn_run "$name" --mode churn --clients "$churn_clients" --duration "$churn_s"
                stop_servers
            done
        fi
        if [[ " $scenarios " == *" uclient "* ]]; then
            for server in portico coturn; do
                name=${server}__uclient__r${round}
                start_turn_server "$server" "$name"
                peer_port=$("$perf" free-port)
                turnutils_peer -L 127.0.0.1 -p "$peer_port" >"$work/$name.peer" 2>&1 &
                peer_pid=$!
                stop_pids+=("$peer_pid")
                sleep 0.2
                pid_args=()
                for p in "${measure_pids[@]}"; do
                    pid_args+=(--server-pid "$p")
                done
                rc=0
                "$perf" uclient "${pid_args[@]}" --helper-pid "$peer_pid" \
                    --log "$work/$name.log" --json "$turn_results/$name.json" --timeout 240 -- \
                    "${uc[@]}" -p "${target#*:}" -e 127.0.0.1 -r "$peer_port" 127.0.0.1 \
                    >"$work/$name.txt" 2>&1 || rc=$?
                stop_servers
                ((rc == 0)) || die "$name: $(cat "$work/$name.txt")"
                printf '[%4ds] %-28s %s\n' $((SECONDS - turn_t0)) "$name" \
                    "$(sed -n '2,3p' "$work/$name.txt" | xargs)" >&2
            done
        fi
    done
    say "writing the TURN section of $out"
    common_facts
    "$perf" bench-report --kind turn --dir "$turn_results" --out "$out" \
        --command "$(command_line turn TURN_ROUNDS TURN_SCENARIOS TURN_RAMP_STEPS TURN_RAMP_DURATION TURN_RATE TURN_FLAT_CLIENTS TURN_FLAT_WINDOW TURN_FLAT_DURATION TURN_STREAMS TURN_DURATION TURN_CHURN_CLIENTS TURN_CHURN_DURATION TURN_UCLIENT_CLIENTS TURN_UCLIENT_MESSAGES)" \
        --fact "date=$started_at, $((SECONDS - turn_t0)) s of runs" "${facts[@]}" \
        --fact "load average (1/5/15 min)=before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)" \
        --fact "portico=\`portico run\`, $workers workers, \`turn.io = \"io_uring\"\` (verified in the log), listen 127.0.0.1, \`[turn] users\` (one user), realm \`$turn_realm\`, \`allow_peers = [\"127.0.0.0/8\"]\`, relay ports $relay_ports, allocation quotas raised to 100000; log level info; CPU and RSS = controlplane + dataplane" \
        --fact "coturn=$(turnserver --version 2>/dev/null | head -1) \`turnserver ${coturn_turn_flags[*]} --listening-ip 127.0.0.1 --relay-ip 127.0.0.1\` (lt-cred-mech, same user and realm, loopback only)" \
        --fact "turn-stub=\`portico-perf echo-server --turn --threads $workers\`: answers every TURN request with success, forwards ChannelData/Send to the peer and back, nothing else (the generator's ceiling)" \
        --fact "generator=\`portico-perf turn\`: 1 client thread, 1 peer thread; every client its own loopback source address (distinct 5-tuples), batched recvmmsg/sendmmsg; 401 round trip per client, CreatePermission + ChannelBind, 172-byte payload with sequence number and send stamp; $rate pkt/s per stream each way; the peer echoes" \
        --fact "load points=ramp: $steps streams × $ramp_s s, one server per round across its steps, stopped after the first step with loss > 0.1%; flat out: $flat_clients streams × $flat_window in flight, $flat_s s; sustained: $streams streams × $sustained_s s; churn: $churn_clients clients × $churn_s s; uclient: \`${uc[*]}\`" \
        --server portico --server coturn --server turn-stub \
        --ratio portico/coturn --reference turn-stub
}

# ---------------------------------------------------------------------------------------
# TURN over TCP and TLS
# ---------------------------------------------------------------------------------------

# One ECDSA P-256 pair for both servers' TLS.
make_bench_cert() {
    bench_cert=$work/bench-cert.pem
    bench_key=$work/bench-key.pem
    [[ -s $bench_cert ]] && return 0
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=portico.bench -keyout "$bench_key" -out "$bench_cert" >/dev/null 2>&1 ||
        die "openssl could not make the benchmark certificate"
}

# Portico with TURN on TCP (turn.listen), TLS (turn.listen_tls) and the proxy's HTTPS port
# with proxy.turn_on_https; sets tcp_port, tls_port, https_port.
start_portico_turn_tcp() {
    local tag=$1 port api dir
    port=$("$perf" free-port)
    api=$("$perf" free-port)
    tls_port=$("$perf" free-port)
    https_port=$("$perf" free-port)
    dir=$work/portico-$tag
    mkdir -p "$dir"
    cat >"$dir/portico.toml" <<EOF
state_dir = "$dir/state"
log_level = "info"

[turn]
listen = ["127.0.0.1:$port"]
listen_tls = ["127.0.0.1:$tls_port"]
workers = $workers
io = "${portico_io:-io_uring}"
realm = "$turn_realm"
users = [{ name = "$turn_user", password = "$turn_password" }]
allow_peers = ["127.0.0.0/8"]
relay_ports = "$relay_ports"
max_allocations = 8192
max_allocations_per_user = 100000
tcp_coalesce_us = ${portico_coalesce:-500}

[api]
listen = "127.0.0.1:$api"

[proxy]
turn_on_https = true

[proxy.listen]
https = "127.0.0.1:$https_port"

[proxy.tls]
cert = "$bench_cert"
key = "$bench_key"

[proxy.limits]
max_connections = 8192
max_connections_per_ip = 8192
EOF
    target=127.0.0.1:$port
    tcp_port=$port
    launch_portico "$dir" "${portico_io:-io_uring}"
    wait_turn "$target" "${stop_pids[0]}" ||
        die "portico does not relay TURN: $(strip_ansi "$dir/log" | tail -5)"
}

coturn_tcp_flags=(-n --listening-ip 127.0.0.1 --relay-ip 127.0.0.1 --relay-threads "$workers"
    --lt-cred-mech --user "$turn_user:$turn_password" --realm "$turn_realm"
    --allow-loopback-peers --no-cli --no-dtls --simple-log
    --min-port "${relay_ports%-*}" --max-port "${relay_ports#*-}")
start_coturn_turn_tcp() {
    local tag=$1 port dir pid
    port=$("$perf" free-port)
    tls_port=$("$perf" free-port)
    dir=$work/coturn-$tag
    mkdir -p "$dir"
    turnserver "${coturn_tcp_flags[@]}" --listening-port "$port" --tls-listening-port "$tls_port" \
        --cert "$bench_cert" --pkey "$bench_key" --log-file "$dir/turn.log" \
        --pidfile "$dir/turnserver.pid" --userdb "$dir/turndb" >"$dir/stdout" 2>&1 &
    pid=$!
    stop_pids=("$pid")
    measure_pids=("$pid")
    target=127.0.0.1:$port
    tcp_port=$port
    wait_turn "$target" "$pid" || die "coturn does not relay TURN: $(tail -5 "$dir/stdout")"
}

run_turn_tcp() {
    local rounds=${TURN_TCP_ROUNDS:-2} rate=50 streams=${TURN_TCP_STREAMS:-1000}
    local secs=${TURN_TCP_DURATION:-20} threads=${TURN_TCP_THREADS:-2}
    local points=${TURN_TCP_POINTS:-"tcp tls tls-443-alpn tls-443-plain"}
    local round point server name started_at load_before port transport extra
    turn_results=$work/turn-tcp-results
    mkdir -p "$turn_results"
    turn_t0=$SECONDS
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    make_bench_cert
    say "TURN over TCP/TLS: points '$points', $rounds rounds, $streams streams × $rate pkt/s × $secs s"
    for round in $(seq "$rounds"); do
        for point in $points; do
            for server in ${TURN_TCP_SERVERS:-portico coturn}; do
                # The one-port-443 points exist only for Portico.
                [[ $point == tls-443-* && $server != portico ]] && continue
                name=${server}__${point}__r${round}
                case $server in
                portico) start_portico_turn_tcp "$name" ;;
                portico-epoll) portico_io=epoll start_portico_turn_tcp "$name" ;;
                portico-uncoalesced) portico_coalesce=0 start_portico_turn_tcp "$name" ;;
                coturn) start_coturn_turn_tcp "$name" ;;
                *) die "TURN_TCP_SERVERS: unknown server $server" ;;
                esac
                extra=()
                case $point in
                tcp) port=$tcp_port transport=tcp ;;
                tls) port=$tls_port transport=tls ;;
                tls-443-alpn) port=$https_port transport=tls extra=(--alpn) ;;
                tls-443-plain) port=$https_port transport=tls ;;
                *) die "unknown point $point" ;;
                esac
                target=127.0.0.1:$port
                turn_run "$name" --transport "$transport" "${extra[@]}" --clients "$streams" \
                    --rate "$rate" --duration "$secs" --threads "$threads" --setup-window 256
                stop_servers
            done
        done
    done
    say "writing the TURN over TCP/TLS section of $out"
    common_facts
    local epoll_fact=()
    [[ " ${TURN_TCP_SERVERS:-} " == *" portico-epoll "* ]] &&
        epoll_fact=(--fact "portico-epoll=the same with \`turn.io = \"epoll\"\`: the TCP/TLS thread makes a system call per write instead of submitting a loop turn's writes through io_uring (the A/B of docs/DESIGN.md, \"Writes through io_uring\")")
    [[ " ${TURN_TCP_SERVERS:-} " == *" portico-uncoalesced "* ]] &&
        epoll_fact+=(--fact "portico-uncoalesced=the same with \`turn.tcp_coalesce_us = 0\`: the TCP/TLS thread polls again as soon as a turn ends instead of letting 500 µs pass between turns while busy (the A/B of docs/DESIGN.md, \"Interrupt coalescing\")")
    "$perf" bench-report --kind turn-tcp --dir "$turn_results" --out "$out" \
        --command "$(command_line turn-tcp TURN_TCP_ROUNDS TURN_TCP_STREAMS TURN_TCP_DURATION TURN_TCP_THREADS TURN_TCP_POINTS TURN_TCP_SERVERS)" \
        --fact "date=$started_at, $((SECONDS - turn_t0)) s of runs" "${facts[@]}" \
        --fact "load average (1/5/15 min)=before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)" \
        --fact "portico=\`portico run\`, $workers UDP workers + the one TCP/TLS thread, \`turn.listen\` (TCP), \`turn.listen_tls\`, and the proxy's https listener with \`proxy.turn_on_https = true\`; ECDSA P-256 certificate; CPU and RSS = controlplane + dataplane" \
        --fact "coturn=$(turnserver --version 2>/dev/null | head -1) \`turnserver ${coturn_tcp_flags[*]} --tls-listening-port … --cert … --pkey …\` (same certificate)" \
        "${epoll_fact[@]}" \
        --fact "generator=\`portico-perf turn --transport tcp|tls\`, $threads client threads (mio), 1 peer thread; a TCP connection per client from its own loopback address, TLS without certificate check (rustls; the handshake signature is still verified); 401 round trip, CreatePermission + ChannelBind, 172-byte payload, ChannelData padded to 4 bytes; $rate pkt/s per stream each way, the UDP peer echoes" \
        --fact "points=tcp: TURN over TCP on the TURN port; tls: TURN over TLS on turn.listen_tls / coturn's tls-listening-port; tls-443-alpn: Portico's proxy https port, ClientHello with ALPN stun.turn (the socket is handed to the dataplane); tls-443-plain: the same port without ALPN (TLS ends in the control plane, plaintext relayed to the dataplane over a unix socket)" \
        --fact "RSS per 1000 allocations=(server RSS after setup − RSS idle) ÷ ready allocations × 1000, i.e. with their TCP/TLS connections" \
        --server portico --server coturn --ratio portico/coturn
}

# ---------------------------------------------------------------------------------------
# TURN kernel fast path
# ---------------------------------------------------------------------------------------

# FP_TOPOLOGY=lo: servers and generator inside one network namespace this script creates,
# on its `lo` (the fast path's TC program is attached to that `lo` only).
fastpath_lo() {
    bench_ns=portico-bench-fp-$$
    ip netns add "$bench_ns" || die "cannot create a network namespace (needs root)"
    ip -n "$bench_ns" link set lo up
    in_ns=(ip netns exec "$bench_ns")
    gen_ns=("${in_ns[@]}")
    fp_topology="servers and \`portico-perf turn\` in one network namespace created for the run, on its \`lo\`; the fast path's TC program attached to that \`lo\` only"
}

# FP_TOPOLOGY=veth: the servers in one namespace on 10.77.0.1 (listen and relay address; the
# TC program is attached to that veth), the generator in another joined by a veth pair: its
# clients' source addresses from 10.78.0.0/16 (a `local` route there, a route back in the
# servers' namespace), its peers on 10.77.0.2. With 2+ cores the generator runs on CPU 0 and
# the servers on CPU 1, and each veth end's receive processing is steered (RPS) to its own
# side's CPU, as two machines' NICs would: the fast path's work (softirq, charged to no
# process) lands on CPU 1, and CPU 1's busy time is the servers' side of the relay.
fastpath_veth() {
    local srv=portico-bench-fps-$$ gen=portico-bench-fpg-$$ vs=fpbs$$ vg=fpbg$$ dev ns
    ip netns add "$srv" || die "cannot create a network namespace (needs root)"
    bench_ns=$srv
    ip netns add "$gen" || die "cannot create a second network namespace"
    bench_ns="$srv $gen"
    ip link add "$vs" netns "$srv" type veth peer name "$vg" netns "$gen" ||
        die "cannot create a veth pair"
    ip -n "$srv" addr add 10.77.0.1/24 dev "$vs"
    ip -n "$gen" addr add 10.77.0.2/24 dev "$vg"
    for ns in "$srv" "$gen"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$srv" link set "$vs" up
    ip -n "$gen" link set "$vg" up
    ip -n "$gen" route add local 10.78.0.0/16 dev lo
    ip -n "$srv" route add 10.78.0.0/16 via 10.77.0.2
    in_ns=(ip netns exec "$srv")
    gen_ns=(ip netns exec "$gen")
    gen_args=(--client-net 10.78.0.0/16 --peer-ip 10.77.0.2)
    turn_ip=10.77.0.1
    turn_peers=10.77.0.0/24
    fp_topology="servers in one network namespace on 10.77.0.1, \`portico-perf turn\` in another (clients from 10.78.0.0/16, peers on 10.77.0.2), joined by a veth pair created for the run; the fast path's TC program attached to the servers' veth only"
    if (($(nproc) >= 2)); then
        for dev in "$srv:$vs:2" "$gen:$vg:1"; do
            IFS=: read -r ns dev mask <<<"$dev"
            ip netns exec "$ns" sh -c "echo $mask > /sys/class/net/$dev/queues/rx-0/rps_cpus" ||
                die "cannot steer $dev's receive work (RPS)"
        done
        gen_ns=(taskset -c 0 "${gen_ns[@]}")
        if [[ ${FP_PIN_SERVERS:-1} == 1 ]]; then
            srv_pin=(taskset -c 1)
            gen_args+=(--server-cpus 1)
            fp_topology="$fp_topology; generator pinned to CPU 0, servers to CPU 1, each veth end's receive work steered to its side's CPU (RPS), so CPU 1's busy time is the servers' side, softirq included"
        else
            fp_topology="$fp_topology; generator pinned to CPU 0, servers on any CPU (FP_PIN_SERVERS=0), the servers' veth receive work steered to CPU 1 and the generator's to CPU 0 (RPS)"
        fi
    fi
}

# Undoes fastpath_veth / fastpath_lo: the namespaces go, later scenarios run on loopback.
fastpath_teardown() {
    local ns
    in_ns=()
    gen_ns=()
    gen_args=()
    srv_pin=()
    turn_ip=127.0.0.1
    turn_peers=127.0.0.0/8
    for ns in $bench_ns; do
        ip netns del "$ns" || true
    done
    bench_ns=""
}

run_fastpath() {
    local rounds=${FP_ROUNDS:-3} streams=${FP_STREAMS:-1000} rate=${FP_RATE:-50}
    local duration=${FP_DURATION:-60} servers=${FP_SERVERS:-"portico-fastpath portico coturn"}
    local topology=${FP_TOPOLOGY:-veth} flat_clients=${FP_FLAT_CLIENTS:-100}
    local flat_window=${FP_FLAT_WINDOW:-8} flat_s=${FP_FLAT_DURATION:-10}
    local results=$work/fastpath-results round server name started_at load_before t0=$SECONDS
    local api kind
    mkdir -p "$results"
    case $topology in
    lo) fastpath_lo ;;
    veth) fastpath_veth ;;
    *) die "FP_TOPOLOGY must be veth or lo" ;;
    esac
    turn_results=$results
    turn_t0=$SECONDS
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    say "TURN fast path ($topology): $servers, $rounds rounds of $streams streams × $rate pkt/s × $duration s, flat out $flat_clients × window $flat_window × $flat_s s"
    for round in $(seq "$rounds"); do
        for kind in sustained flat; do
            [[ $kind == flat && $flat_s == 0 ]] && continue
            for server in $servers; do
                if [[ $kind == sustained ]]; then
                    name=${server}__fp${streams}__r${round}
                else
                    name=${server}__flat__r${round}
                fi
                start_turn_server "$server" "$name"
                if [[ $kind == sustained ]]; then
                    turn_run "$name" --clients "$streams" --rate "$rate" --duration "$duration"
                else
                    turn_run "$name" --clients "$flat_clients" --flat-out --window "$flat_window" \
                        --duration "$flat_s"
                fi
                if [[ $server == portico-fastpath ]]; then
                    # The kernel's share, from the server's own counters.
                    api=$(grep -o '127.0.0.1:[0-9]*' "$work/portico-$name/portico.toml" | tail -1)
                    "${in_ns[@]}" curl -s "http://$api/metrics" >"$results/$name.metrics" \
                        2>/dev/null || true
                fi
                stop_servers
            done
        done
    done
    fastpath_teardown
    say "writing the fast-path section of $out"
    common_facts
    FP_CMD=$(command_line fastpath FP_ROUNDS FP_STREAMS FP_RATE FP_DURATION FP_SERVERS \
        FP_TOPOLOGY FP_FLAT_CLIENTS FP_FLAT_WINDOW FP_FLAT_DURATION FP_PIN_SERVERS) \
        FP_FACTS="date=$started_at, $((SECONDS - t0)) s of runs; load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)" \
        FP_MACHINE="$(nproc) cores, $(uname -r)" FP_TOPO="$fp_topology" \
        FP_LOADS="sustained: $streams streams × $rate pkt/s each way for $duration s; flat out: $flat_clients streams, $flat_window packets in flight each, for $flat_s s" \
        python3 "$root/scripts/fastpath_report.py" "$results" "$out"
}

# ---------------------------------------------------------------------------------------
# Reverse proxy
# ---------------------------------------------------------------------------------------

run_proxy() {
    local md=$work/proxy.md rc=0 cmd
    say "reverse proxy: scripts/bench-proxy.sh"
    DURATION=${PROXY_DURATION:-10} CONNS=${PROXY_CONNS:-50} OUT=$md \
        "$root/scripts/bench-proxy.sh" >"$work/proxy.log" 2>&1 || rc=$?
    ((rc == 0)) || die "bench-proxy.sh failed: $(tail -20 "$work/proxy.log")"
    common_facts
    cmd=$(command_line proxy PROXY_DURATION PROXY_CONNS)
    "$perf" bench-report --kind proxy --markdown "$md" --out "$out" --command "$cmd" \
        --fact "runs=\`DURATION=${PROXY_DURATION:-10} CONNS=${PROXY_CONNS:-50} scripts/bench-proxy.sh\` (the reverse-proxy engineer's script); its tables below as it wrote them" \
        --fact "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${facts[@]}" \
        --fact "load average (1/5/15 min) after=$(cut -d' ' -f1-3 /proc/loadavg)"
    say "reverse proxy section written"
}

# ---------------------------------------------------------------------------------------
# Fraud detection reaction
# ---------------------------------------------------------------------------------------

run_fraud() {
    local rounds=${FRAUD_ROUNDS:-3} r cmd txt=$work/fraud.txt t0=$SECONDS
    : >"$txt"
    for ((r = 1; r <= rounds; r++)); do
        say "fraud reaction: round $r of $rounds"
        timeout 600 cargo test --release -q -p portico \
            --test fraud brute_force -- --skip proxy::a_brute_force_client \
            --nocapture --test-threads=1 >>"$txt" 2>&1 ||
            die "the brute-force tests failed: $(tail -30 "$txt")"
    done
    common_facts
    cmd=$(command_line fraud FRAUD_ROUNDS)
    "$perf" bench-report --kind fraud --markdown "$txt" --out "$out" --command "$cmd" \
        --fact "runs=\`cargo test --release -p portico --test fraud brute_force -- --skip proxy::a_brute_force_client --nocapture --test-threads=1\`, $rounds rounds, $((SECONDS - t0)) s" \
        --fact "targets=Portico's own TURN users (UDP); nginx auth_basic behind the proxy (HTTP, a connection per guess); Kamailio digest auth behind the proxy (SIP, one connection and a connection per guess); slapd behind the proxy (LDAP simple bind, one connection and \`ldapsearch\` per guess)" \
        --fact "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${facts[@]}" \
        --fact "load average (1/5/15 min) after=$(cut -d' ' -f1-3 /proc/loadavg)"
    say "fraud reaction section written"
}

# ---------------------------------------------------------------------------------------
# Registrations through the reverse proxy (H.323 beside SIP)
# ---------------------------------------------------------------------------------------

h323_seeds=controlplane/tests/proxy/seeds.txt
h323_rrq_label="rrq hq@example.com/branch alice email:alice@example.com url:h323:alice@example.com 12345"
seed_hex() {
    awk -v l="$1" -F'|' '$1 == l { print $2 }' "$h323_seeds"
}

# Starts Portico as a proxy only (`[turn] listen = []`) with the H.323, H.323/TLS, SIP and
# SIPS listeners; sets reg_port[h323-tcp|h323-tls|sip-tcp|sip-tls], reg_target[h323|sip]
# (where the fake PBX listens during a run), stop_pids and measure_pids.
declare -A reg_port reg_target
start_portico_register() {
    local tag=$1 api dir main dp="" i k
    dir=$work/portico-$tag
    mkdir -p "$dir"
    api=$("$perf" free-port)
    # Outside the ephemeral range: the fake PBX binds its port again for every run, and
    # thousands of connections a second would otherwise take it meanwhile (TIME_WAIT).
    for k in h323-tcp h323-tls sip-tcp sip-tls; do
        reg_port[$k]=$("$perf" free-port --not-ephemeral)
    done
    for k in h323 sip; do reg_target[$k]=$("$perf" free-port --not-ephemeral); done
    cat >"$dir/portico.toml" <<TOML
state_dir = "$dir/state"
log_level = "info"

[turn]
listen = []

[api]
listen = "127.0.0.1:$api"

[proxy.listen]
h323 = "127.0.0.1:${reg_port[h323-tcp]}"
h323_tls = "127.0.0.1:${reg_port[h323-tls]}"
sip = "127.0.0.1:${reg_port[sip-tcp]}"
sips = "127.0.0.1:${reg_port[sip-tls]}"

[[proxy.services]]
name = "example.com/branch"
host = "127.0.0.1"
h323 = ${reg_target[h323]}

[[proxy.services]]
name = "example.com"
host = "127.0.0.1"
sip = ${reg_target[sip]}
TOML
    NO_COLOR=1 "$bin/portico" run --config "$dir/portico.toml" >"$dir/log" 2>&1 &
    main=$!
    stop_pids=("$main")
    for i in $(seq 100); do
        dp=$(pgrep -P "$main" | head -1) || true
        [[ -n $dp ]] && break
        kill -0 "$main" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $dp ]] || die "portico: no dataplane child process: $(strip_ansi "$dir/log" | tail -5)"
    stop_pids+=("$dp")
    measure_pids=("$main" "$dp")
    # Ready when every listener gets a registration through.
    for k in h323-tcp h323-tls sip-tcp sip-tls; do
        for i in $(seq 50); do
            register_load "$k" --connections 1 --duration 0.2 >/dev/null 2>&1 && break
            kill -0 "$main" 2>/dev/null || i=50
            ((i < 50)) || die "portico does not route $k registrations: $(strip_ansi "$dir/log" | tail -5)"
            sleep 0.1
        done
    done
}

# register_load CLIENT ARGS...: `portico-perf register` for CLIENT (h323-tcp, sip-tls,
# h323-direct, ...), with the fake PBX listening where Portico's service points.
register_load() {
    local client=$1 proto=${1%-*} transport=${1#*-} a
    shift
    a=(--proto "$proto" --quiet --target-listen "127.0.0.1:${reg_target[$proto]}")
    [[ $proto == h323 ]] && a+=(--request-hex "$reg_rrq" --answer-hex "$reg_rcf")
    case $transport in
    tcp) a+=(--proxy "127.0.0.1:${reg_port[$client]}") ;;
    tls) a+=(--proxy "127.0.0.1:${reg_port[$client]}" --tls) ;;
    direct) a+=(--proxy "127.0.0.1:${reg_target[$proto]}") ;;
    *) die "unknown transport in $client" ;;
    esac
    "$perf" register "${a[@]}" "$@"
}

run_register() {
    local rounds=${REGISTER_ROUNDS:-3} duration=${REGISTER_DURATION:-4}
    local rate=${REGISTER_RATE:-500} conns=${REGISTER_CONNS:-8}
    local points=${REGISTER_POINTS:-"rate flat kept"} transports=${REGISTER_TRANSPORTS:-"tcp tls direct"}
    local results=$work/register-results round point transport proto client name rc p
    local load pid_args load_before started_at t0=$SECONDS
    mkdir -p "$results"
    reg_rrq=$(seed_hex "$h323_rrq_label")
    reg_rcf=$(seed_hex rcf)
    [[ -n $reg_rrq && -n $reg_rcf ]] || die "no RRQ or RCF in $h323_seeds"
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    say "registrations: $rounds rounds × '$points' × '$transports' × h323, sip; $duration s each"
    for round in $(seq "$rounds"); do
        start_portico_register "r$round"
        for point in $points; do
            case $point in
            rate) load=(--mode new --rate "$rate") ;;
            flat) load=(--mode new) ;;
            kept) load=(--mode kept) ;;
            *) die "REGISTER_POINTS: unknown point '$point' (rate, flat, kept)" ;;
            esac
            [[ $point == rate ]] && point=rate$rate
            for transport in $transports; do
                for proto in h323 sip; do
                    client=$proto-$transport
                    name=${client}__${point}__r${round}
                    pid_args=()
                    if [[ $transport != direct ]]; then
                        for p in "${measure_pids[@]}"; do
                            pid_args+=(--server-pid "$p")
                        done
                    fi
                    rc=0
                    register_load "$client" "${load[@]}" --connections "$conns" \
                        --duration "$duration" --timeout-ms 2000 "${pid_args[@]}" \
                        --json "$results/$name.json" >"$work/$name.txt" 2>&1 || rc=$?
                    ((rc == 0)) || die "$name: portico-perf exited $rc: $(cat "$work/$name.txt")"
                    printf '[%3ds] %-26s %s | %s\n' $((SECONDS - t0)) "$name" \
                        "$(grep -o '([0-9]* reg/s)' "$work/$name.txt")" \
                        "$(grep -o 'server CPU .*µs/reg)' "$work/$name.txt")" >&2
                done
            done
        done
        stop_servers
    done
    say "writing the registrations section of $out"
    common_facts
    "$perf" bench-report --kind register --dir "$results" --out "$out" \
        --command "$(command_line register REGISTER_ROUNDS REGISTER_DURATION REGISTER_RATE REGISTER_CONNS REGISTER_POINTS REGISTER_TRANSPORTS)" \
        --fact "date=$started_at, $((SECONDS - t0)) s of runs" "${facts[@]}" \
        --fact "load average (1/5/15 min)=before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)" \
        --fact "portico=\`portico run\` as a proxy only (\`[turn] listen = []\`), a fresh one per round, listeners \`h323\`, \`h323_tls\`, \`sip\`, \`sips\` on 127.0.0.1 (TLS with its generated certificate), services \`example.com/branch\` (h323) and \`example.com\` (sip) pointing at plain TCP ports of the fake PBX, default limits, log level info; CPU = control plane (where the proxy runs) + the idle dataplane" \
        --fact "fake PBX=inside \`portico-perf register\` (its CPU counts as the generator's): $((conns + 4)) threads accepting; answers each RRQ with pycrate's RCF (\`rcf\` in seeds.txt) after checking the RRQ arrived byte for byte, each REGISTER with 200 OK built from its headers" \
        --fact "generator=\`portico-perf register\`, $conns connections at a time (a thread each), blocking sockets, TCP_NODELAY; TLS: rustls, no session resumption (a full handshake per new connection, as at a phone's start), close_notify before closing; H.323: a $((${#reg_rrq} / 2))-byte RRQ, SIP: a REGISTER of about 380 bytes with a fresh Call-ID each time" \
        --fact "load points=rate: $rate registrations/s offered on a fixed schedule, a new connection each; flat: each connection's next registration as soon as the last is answered, a new connection each; kept: likewise over $conns connections kept open; $duration s per run, 2 s timeout per connect, read and write" \
        --server h323-tcp --server sip-tcp --server h323-tls --server sip-tls \
        --server h323-direct --server sip-direct
}

# ---------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------

# profile_perf SERVER: samples the server's processes with `perf record -e cpu-clock` while
# it relays PROFILE_STREAMS streams; writes perf/profile/turn-perf-SERVER.md.
profile_perf() {
    local server=$1 secs=${PROFILE_DURATION:-15} streams=${PROFILE_STREAMS:-1000}
    local data md load_pid pids
    data=$work/perf-$server.data
    md=perf/profile/turn-perf-$server.md
    start_turn_server "$server" "profile-$server"
    pids=$(
        IFS=,
        echo "${measure_pids[*]}"
    )
    "$perf" turn --quiet --server "$target" --user "$turn_user" --password "$turn_password" \
        --clients "$streams" --duration $((secs + 6)) >"$work/profile-$server.txt" 2>&1 &
    load_pid=$!
    sleep 3
    perf record -e cpu-clock -F 999 -g -p "$pids" -o "$data" -- sleep "$secs" \
        >"$work/perf-record-$server.log" 2>&1 || die "perf record failed: $(cat "$work/perf-record-$server.log")"
    wait "$load_pid" || die "load for the $server profile failed: $(cat "$work/profile-$server.txt")"
    stop_servers
    {
        echo "# Where $server spends CPU relaying TURN (perf record -e cpu-clock)"
        echo
        echo "Generated by \`scripts/bench.sh profile\` on $(date -u +%Y-%m-%d); hand edits are overwritten."
        echo "Load: \`portico-perf turn --clients $streams\` (ChannelData, 50 pkt/s per stream each way,"
        echo "172-byte payloads); sampled for $secs s of the data phase at 999 Hz with call graphs"
        echo "(\`perf record -e cpu-clock -F 999 -g -p PIDS\`): hardware counters are not available in"
        echo "this virtual machine (\`perf stat -e instructions\` says \"not supported\"), so this is"
        echo "timer sampling, kernel included. The load run's own report:"
        echo
        echo '```'
        cat "$work/profile-$server.txt"
        echo '```'
        echo
        echo "## Shares by DSO (kernel vs user space)"
        echo
        echo '```'
        perf report -i "$data" --stdio --no-children --sort dso -g none 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -12 || true
        echo '```'
        echo
        echo "## Top symbols (self time)"
        echo
        echo '```'
        perf report -i "$data" --stdio --no-children --sort dso,symbol -g none 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -45 || true
        echo '```'
    } >"$md"
    say "wrote $md"
}

# Callgrind of Portico's dataplane (user-space instructions by function) under a light load:
# valgrind slows it ~50×, so 100 streams for 10 s.
profile_callgrind() {
    local io=$1 dir wrapper md=perf/profile/turn-callgrind-portico.md out_file
    dir=$work/callgrind-$io
    mkdir -p "$dir"
    wrapper=$dir/portico-dataplane
    cat >"$wrapper" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$dir/callgrind.out --dump-instr=no $bin/portico-dataplane "\$@"
EOF
    chmod +x "$wrapper"
    local port api
    port=$("$perf" free-port)
    api=$("$perf" free-port)
    cat >"$dir/portico.toml" <<EOF
state_dir = "$dir/state"
log_level = "warn"
[turn]
listen = ["127.0.0.1:$port"]
workers = $workers
io = "$io"
realm = "$turn_realm"
users = [{ name = "$turn_user", password = "$turn_password" }]
allow_peers = ["127.0.0.0/8"]
max_allocations_per_user = 100000
[api]
listen = "127.0.0.1:$api"
EOF
    PORTICO_DATAPLANE=$wrapper NO_COLOR=1 "$bin/portico" run --config "$dir/portico.toml" \
        >"$dir/log" 2>&1 &
    stop_pids=("$!")
    target=127.0.0.1:$port
    local i ok=""
    for i in $(seq 60); do
        if "$perf" turn --quiet --server "$target" --user "$turn_user" --password "$turn_password" \
            --clients 1 --rate 20 --duration 0.2 --setup-timeout 5 >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 1
    done
    [[ -n $ok ]] || {
        stop_servers
        return 1
    }
    "$perf" turn --quiet --server "$target" --user "$turn_user" --password "$turn_password" \
        --clients 100 --duration 10 --rto-ms 1000 >"$dir/load.txt" 2>&1 || true
    stop_servers
    out_file=$dir/callgrind.out
    [[ -s $out_file ]] || return 1
    {
        echo "# Portico's dataplane under callgrind (user-space instructions by function)"
        echo
        echo "Generated by \`scripts/bench.sh profile\` on $(date -u +%Y-%m-%d); hand edits are overwritten."
        [[ $io == io_uring ]] || echo "(The io_uring driver stalls under valgrind: the supervisor kills it for a missing heartbeat, so this profile uses epoll; the TURN code above the driver is the same.)"
        echo "Dataplane ($io driver, $workers workers) started through \`PORTICO_DATAPLANE\` under"
        echo "\`valgrind --tool=callgrind\`; load \`portico-perf turn --clients 100 --duration 10\`"
        echo "(ChannelData, 50 pkt/s per stream each way), which valgrind slows down, so the"
        echo "load run's own figures below are not performance figures. Callgrind counts only"
        echo "user-space instructions: the kernel's share is in turn-perf-portico.md."
        echo
        echo '```'
        cat "$dir/load.txt"
        echo '```'
        echo
        echo "## Inclusive instructions (top 40)"
        echo
        echo '```'
        callgrind_annotate --inclusive=yes "$out_file" 2>/dev/null | sed -n '1,60p' | cut -c1-160 || true
        echo '```'
        echo
        echo "## Self instructions (top 40)"
        echo
        echo '```'
        callgrind_annotate "$out_file" 2>/dev/null | sed -n '1,60p' | cut -c1-160 || true
        echo '```'
    } >"$md"
    say "wrote $md"
}

run_profile() {
    mkdir -p perf/profile
    profile_perf portico
    profile_perf coturn
    profile_callgrind io_uring || profile_callgrind epoll ||
        die "callgrind profile failed (see $work/callgrind-*)"
}

# ---------------------------------------------------------------------------------------
# Scale
# ---------------------------------------------------------------------------------------

# Largest multiple of 1000 allocations a server holds within `fds` descriptors at `per`
# descriptors per allocation, after `reserve` for everything else.
scale_fit() {
    local fds=$1 per=$2 reserve=$3
    echo $((((fds - reserve) / per) / 1000 * 1000))
}

# The levels of the list `$2` that fit under `fit` (comma-separated), plus `fit` itself
# when some did not.
scale_levels() {
    local fit=$1 l out=() dropped=0
    for l in $2; do
        if ((l <= fit)); then out+=("$l"); else dropped=1; fi
    done
    if ((dropped)) && ((${#out[@]} == 0 || out[${#out[@]} - 1] < fit)); then
        out+=("$fit")
    fi
    local IFS=,
    echo "${out[*]}"
}

run_scale() {
    local levels=${SCALE_LEVELS:-"10000 50000 100000"} hold=${SCALE_HOLD:-30}
    local lifetime=${SCALE_LIFETIME:-60} refresh=${SCALE_REFRESH:-30} data=${SCALE_DATA:-5}
    local churn_level=${SCALE_CHURN_LEVEL:-50000} churn_s=${SCALE_CHURN_DURATION:-20}
    local servers=${SCALE_SERVERS:-"portico-shared portico coturn"} relay_mode
    local max=0 l hard_before hard fit server list churn ips i relay_toml relay_flags=()
    local results=$work/scale notes=$work/scale-notes.md t0=$SECONDS started_at tcp=256
    # Allocations beyond the top level for the latency probes and the churn clients, which
    # must not find the box full.
    local headroom=200
    local port api dir pids
    started_at=$(date -u +%Y-%m-%dT%H:%MZ)
    mkdir -p "$results"
    for l in $levels; do ((l > max)) && max=$l; done
    # Servers inherit this shell's limit (Portico raises its own further when it may).
    hard_before=$(ulimit -Hn)
    ulimit -Hn $((2 * max + 4096)) 2>/dev/null || true
    hard=$(ulimit -Hn)
    ulimit -Sn "$hard"
    # Enough relay addresses for the largest level: 16384 ports each.
    ips=$((max / 14000 + 1))
    relay_toml='"127.0.0.1"'
    relay_flags=(--relay-ip 127.0.0.1)
    for ((i = 2; i <= ips; i++)); do
        relay_toml+=", \"127.0.0.$i\""
        relay_flags+=(--relay-ip "127.0.0.$i")
    done
    if ((hard > hard_before)); then
        echo "Descriptor limit: RLIMIT_NOFILE hard limit $hard_before at the start, raised to $hard for the servers." >"$notes"
    else
        echo "Descriptor limit: RLIMIT_NOFILE hard limit $hard_before, and raising it to $((2 * max + 4096)) failed (no CAP_SYS_RESOURCE here, although uid $(id -u)), so every server ran with $hard descriptors at most; the levels below were cut to fit:" >"$notes"
    fi
    echo >>"$notes"
    for server in $servers; do
        case $server in
        # One relay socket per allocation; TCP connections, the probes' and churn's
        # allocations and the rest reserved.
        portico) fit=$(scale_fit "$hard" 1 $((tcp + headroom + 600))) ;;
        # turn.relay_mode = "shared": IPv4 UDP relays hold no descriptor; only the TCP
        # clients' relays and connections count.
        portico-shared) fit=$max ;;
        # coturn, UDP clients on a UDP listener: one relay socket per allocation too
        # (checked: 1000 allocations, +1000 descriptors; the table's descriptor column).
        coturn) fit=$(scale_fit "$hard" 1 $((headroom + 600))) ;;
        *) die "SCALE_SERVERS: unknown server $server" ;;
        esac
        list=$(scale_levels "$fit" "$levels")
        churn=$churn_level
        [[ ",$list," == *",$churn,"* ]] || churn=${list##*,}
        if [[ $list != "${levels// /,}" ]]; then
            echo "- $server: levels $list instead of ${levels// /,} ($hard descriptors hold about $fit allocations); churn at $churn." >>"$notes"
        fi
        port=$("$perf" free-port)
        dir=$work/$server-scale
        mkdir -p "$dir"
        case $server in
        portico | portico-shared)
            relay_mode=socket
            [[ $server == portico-shared ]] && relay_mode=shared
            api=$("$perf" free-port)
            cat >"$dir/portico.toml" <<TOML
state_dir = "$dir/state"
log_level = "info"

[turn]
listen = ["127.0.0.1:$port"]
workers = $workers
io = "io_uring"
realm = "$turn_realm"
users = [{ name = "$turn_user", password = "$turn_password" }]
allow_peers = ["127.0.0.0/8"]
relay_ip = [$relay_toml]
relay_ports = "16384-32767"
default_lifetime = $lifetime
max_allocations = $((${list##*,} + headroom))
max_allocations_per_user = $((${list##*,} + headroom))
tcp_max_connections = $tcp
relay_mode = "$relay_mode"

[api]
listen = "127.0.0.1:$api"
TOML
            target=127.0.0.1:$port
            # Info level for the start lines launch_portico checks (driver, workers, the
            # descriptor limit), without a line per allocation created and ended.
            RUST_LOG="info,portico_dataplane::turn=warn" launch_portico "$dir" io_uring
            wait_turn "$target" "${stop_pids[0]}" ||
                die "portico does not relay TURN: $(strip_ansi "$dir/log" | tail -5)"
            echo "- $server's start log: \`$(strip_ansi "$dir/log" | grep -o 'file descriptor limit.*' | head -1)\`" >>"$notes"
            if [[ $server == portico-shared ]]; then
                strip_ansi "$dir/log" | grep -q 'relay ports steered by sk_lookup' ||
                    die "portico-shared: relay_mode = \"shared\" did not start: $(strip_ansi "$dir/log" | grep -i 'relay_mode' | head -2)"
            fi
            ;;
        coturn)
            turnserver -n --listening-ip 127.0.0.1 "${relay_flags[@]}" --relay-threads "$workers" \
                --lt-cred-mech --user "$turn_user:$turn_password" --realm "$turn_realm" \
                --allow-loopback-peers --no-cli --no-tls --no-dtls --simple-log \
                --min-port 16384 --max-port 32767 --max-allocate-lifetime 3600 \
                --listening-port "$port" --log-file "$dir/turn.log" \
                --pidfile "$dir/turnserver.pid" --userdb "$dir/turndb" >"$dir/stdout" 2>&1 &
            stop_pids=("$!")
            measure_pids=("$!")
            target=127.0.0.1:$port
            wait_turn "$target" "${stop_pids[0]}" ||
                die "coturn does not relay TURN: $(tail -5 "$dir/stdout")"
            ;;
        esac
        say "scale: $server, levels $list, churn at $churn"
        pids=$(
            IFS=,
            echo "${measure_pids[*]}"
        )
        timeout 1800 "$perf" turn-scale --target "$target" --user "$turn_user" \
            --password "$turn_password" --levels "$list" --hold-secs "$hold" \
            --lifetime "$lifetime" --refresh-secs "$refresh" --data-secs "$data" \
            --churn-level "$churn" --churn-secs "$churn_s" --pids "$pids" --server "$server" \
            --expiry-max-secs "${SCALE_EXPIRY_MAX:-700}" --time-limit 1700 --json "$results/$server.json" | tee "$work/$server-scale.txt" >&2 ||
            die "turn-scale against $server failed"
        stop_servers
    done
    # The descriptor-free design's feasibility on this kernel (docs/DESIGN.md): a relay port
    # range steered to one socket by sk_lookup, answers from the relayed port by raw socket.
    local probe
    if probe=$(timeout 60 "$perf" sk-lookup-probe --packets 20000 2>&1); then
        {
            echo
            echo "Relays without a descriptor each (\`portico-perf sk-lookup-probe --packets 20000\`, a feasibility probe, not the dataplane): $(echo "$probe" | tr -d '\n ' | sed 's/[{}"]//g; s/,/, /g')."
        } >>"$notes"
    else
        echo "sk_lookup probe failed or not permitted here: $probe" >&2
        printf '\nRelays without a descriptor each: the sk_lookup probe could not run here: %s\n' "$(echo "$probe" | head -1)" >>"$notes"
    fi
    common_facts
    "$perf" bench-report --kind scale --dir "$results" --markdown "$notes" --out "$out" \
        --command "$(command_line "$@" SCALE_LEVELS SCALE_HOLD SCALE_LIFETIME SCALE_REFRESH SCALE_DATA SCALE_CHURN_LEVEL SCALE_CHURN_DURATION SCALE_SERVERS)" \
        "${facts[@]}" \
        --fact "date=$started_at, $((SECONDS - t0)) s of runs, one run per server; the 2 cores were shared with other agents' builds and tests during the runs" \
        --fact "portico-shared=the same as portico with \`turn.relay_mode = \"shared\"\` (IPv4 UDP relays steered by sk_lookup to one socket per worker, sent through a raw socket: no descriptor per allocation)" \
        --fact "portico=\`portico run\`, $workers workers, io_uring, listen 127.0.0.1, one user, \`allow_peers = [\"127.0.0.0/8\"]\`, relay_ip 127.0.0.1 to 127.0.0.$ips, relay ports 16384-32767 on each, default_lifetime $lifetime s, max_allocations = the top level + $headroom (probes, churn), tcp_max_connections $tcp, log level info without the per-allocation lines (RUST_LOG=info,portico_dataplane::turn=warn); CPU and RSS = controlplane + dataplane" \
        --fact "coturn=coturn $(turnserver --version 2>/dev/null | head -1), $workers relay threads, no default-lifetime option (a LIFETIME $lifetime request gets its 600 s default, RFC 8656 §7.2), so its expiry wait is longer, the same relay addresses and ports, lt-cred-mech, --max-allocate-lifetime 3600, log to a file (its default level: a few lines per allocation)" \
        --fact "generator=\`portico-perf turn-scale\`, 1 thread, one IP_PKTINFO socket, one loopback source address per client (127.128.0.0/9); per allocation Allocate (401, then with credentials, LIFETIME $lifetime), CreatePermission, ChannelBind to a peer socket of the generator; keep-alive: Refresh every $refresh s, ChannelBind every 240 s, one 64-byte ChannelData every $data s; Allocate latency = round trip of the authenticated Allocate of a fresh client every 100 ms while holding (deleted at once); churn = 16 clients cycling Allocate (401, authenticated) and Refresh 0 from fresh addresses for $churn_s s" \
        --fact "kernel memory=machine-wide /proc/meminfo and /proc/net/sockstat minus the figures with the server idle before its first allocation; other agents' work moves them too" \
        --server portico-shared --server portico --server coturn
    say "wrote $out"
}

# Media relay: MEDIA_SESSIONS sessions (1000) at 50 RTP packets/s each way per session for
# MEDIA_SECONDS (10), two endpoints per session on loopback, interleaved in MEDIA_ROUNDS (2)
# rounds of: Portico media relay, Portico TURN ChannelData (as many allocations, same rate,
# same process), rtpengine in userspace (--table=-1, sessions by ng offer/answer). Reports
# each run's relayed packets, loss, server CPU per million relayed packets and RSS per 1000
# sessions; printed and kept in $work/media-*.txt (perf/RESULTS.md "Media relay" quotes a run).
run_media() {
    local port api ng dir i round pid sessions=${MEDIA_SESSIONS:-1000} secs=${MEDIA_SECONDS:-10}
    port=$("$perf" free-port)
    api=$("$perf" free-port)
    dir=$work/portico-media
    mkdir -p "$dir"
    {
        echo "state_dir = \"$dir/state\""
        echo 'log_level = "info"'
        echo '[turn]'
        echo "listen = [\"127.0.0.1:$port\"]"
        echo "workers = $workers"
        echo 'io = "io_uring"'
        echo 'relay_ip = "127.0.0.1"'
        echo 'allow_peers = ["127.0.0.0/8"]'
        echo 'relay_ports = "20000-29999"'
        echo "realm = \"$turn_realm\""
        echo "users = [{ name = \"$turn_user\", password = \"$turn_password\" }]"
        # Within the descriptor budget the dataplane checks at start (20,000 here).
        echo 'max_allocations = 2048'
        echo 'max_allocations_per_user = 100000'
        echo 'tcp_max_connections = 256'
        echo '[api]'
        echo "listen = \"127.0.0.1:$api\""
        echo '[media]'
        echo 'ports = "30000-39999"'
        echo 'max_sessions = 1500'
    } >"$dir/portico.toml"
    for round in $(seq "${MEDIA_ROUNDS:-2}"); do
        launch_portico "$dir" io_uring
        for i in $(seq 50); do
            [[ -s $dir/state/admin.token ]] && break
            sleep 0.1
        done
        say "round $round: portico media relay"
        "$perf" media --api "127.0.0.1:$api" --token-file "$dir/state/admin.token" \
            --server-pid "${stop_pids[1]}" --sessions "$sessions" --rate 50 \
            --duration "$secs" | tee "$work/media-portico-$round.txt"
        say "round $round: portico TURN ChannelData"
        "$perf" turn --quiet --server "127.0.0.1:$port" --user "$turn_user" \
            --password "$turn_password" --server-pid "${stop_pids[1]}" --clients "$sessions" \
            --rate 50 --duration "$secs" --mode channel >"$work/media-turn-$round.txt" 2>&1 ||
            die "turn run failed: $(cat "$work/media-turn-$round.txt")"
        grep -E 'relayed|server CPU|server RSS|lost' "$work/media-turn-$round.txt"
        stop_servers
        if command -v rtpengine >/dev/null; then
            say "round $round: rtpengine (userspace)"
            ng=$("$perf" free-port)
            rtpengine --table=-1 --interface=127.0.0.1 --listen-ng="127.0.0.1:$ng" \
                --listen-cli="127.0.0.1:$("$perf" free-port)" \
                --foreground --log-stderr --log-level=4 --port-min=40000 --port-max=49999 \
                --num-threads="$workers" >"$work/rtpengine.log" 2>&1 &
            pid=$!
            stop_pids=("$pid")
            sleep 2
            "$perf" media --rtpengine "127.0.0.1:$ng" --server-pid "$pid" \
                --sessions "$sessions" --rate 50 --duration "$secs" |
                tee "$work/media-rtpengine-$round.txt"
            stop_servers
        else
            echo "bench.sh: rtpengine is not installed (Debian rtpengine-daemon): no comparison" >&2
        fi
    done
}

# ---------------------------------------------------------------------------------------
# Media relay with the kernel fast path (veth topology)
# ---------------------------------------------------------------------------------------

# start_media_server SERVER NAME: Portico (fast path on or off) or rtpengine in the servers'
# namespace; sets media_target (the generator's --api/--token-file or --rtpengine
# arguments), measure_pid and stop_pids.
media_target=()
start_media_server() {
    local server=$1 name=$2 dir=$work/$2 fp=off pid i
    mkdir -p "$dir"
    case $server in
    portico-fastpath | portico)
        [[ $server == portico-fastpath ]] && fp=on
        cat >"$dir/portico.toml" <<EOF
state_dir = "$dir/state"
log_level = "info"

[turn]
listen = ["$turn_ip:3478"]
relay_ip = ["$turn_ip"]
workers = $workers
io = "io_uring"
fast_path = "$fp"
allow_peers = ["$turn_peers"]
max_allocations = 2048
tcp_max_connections = 256

[api]
listen = "$turn_ip:8088"

[media]
ports = "50000-59999"
max_sessions = 4000
idle_timeout = "60s"
EOF
        launch_portico "$dir" io_uring
        if [[ $fp == on ]]; then
            # The dataplane logs it after its driver line.
            for i in $(seq 50); do
                strip_ansi "$dir/log" | grep -q 'kernel fast path loaded' && break
                sleep 0.1
            done
            strip_ansi "$dir/log" | grep -q 'kernel fast path loaded' ||
                die "the fast path did not load: $(strip_ansi "$dir/log" | grep -i 'fast' | head -3)"
        fi
        for i in $(seq 50); do
            [[ -s $dir/state/admin.token ]] && break
            sleep 0.1
        done
        media_target=(--api "$turn_ip:8088" --token-file "$dir/state/admin.token")
        measure_pid=${stop_pids[1]}
        ;;
    rtpengine)
        "${srv_pin[@]}" "${in_ns[@]}" rtpengine --table=-1 --interface="$turn_ip" \
            --listen-ng="$turn_ip:2223" --listen-cli="127.0.0.1:9900" --foreground \
            --log-stderr --log-level=4 --port-min=40000 --port-max=49999 \
            --num-threads="$workers" >"$dir/rtpengine.log" 2>&1 &
        pid=$!
        stop_pids=("$pid")
        measure_pid=$pid
        sleep 2
        kill -0 "$pid" 2>/dev/null || die "rtpengine did not start: $(tail -5 "$dir/rtpengine.log")"
        media_target=(--rtpengine "$turn_ip:2223")
        ;;
    *) die "unknown media server $server" ;;
    esac
}

run_media_fastpath() {
    local rounds=${MFP_ROUNDS:-2} sessions=${MFP_SESSIONS:-1000} secs=${MFP_SECONDS:-20}
    local servers=${MFP_SERVERS:-"portico-fastpath portico rtpengine"}
    local results=$work/media-fastpath-results round server name started_at load_before t0=$SECONDS
    local cpus=()
    if ! command -v rtpengine >/dev/null; then
        echo "bench.sh: rtpengine is not installed (Debian rtpengine-daemon): no comparison" >&2
        servers=${servers//rtpengine/}
    fi
    mkdir -p "$results"
    fastpath_veth
    ((${#srv_pin[@]})) && cpus=(--server-cpus 1)
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    say "media relay fast path: $servers, $rounds rounds of $sessions sessions × 50 pkt/s each way × $secs s"
    for round in $(seq "$rounds"); do
        for server in $servers; do
            name=media-${server}__r${round}
            start_media_server "$server" "$name"
            "${gen_ns[@]}" "$perf" media "${media_target[@]}" --server-pid "$measure_pid" \
                --bind 10.77.0.2 --sessions "$sessions" --rate 50 --duration "$secs" \
                "${cpus[@]}" --json "$results/$name.json" | tee "$results/$name.txt" ||
                die "the media run against $server failed"
            if [[ $server == portico* ]]; then
                "${in_ns[@]}" curl -s -H "Authorization: Bearer $(cat "$work/$name/state/admin.token")" \
                    "http://$turn_ip:8088/metrics" >"$results/$name.metrics" 2>/dev/null || true
            fi
            stop_servers
        done
    done
    fastpath_teardown
    say "writing the media fast-path section of $out"
    common_facts
    MFP_CMD=$(command_line media-fastpath MFP_ROUNDS MFP_SESSIONS MFP_SECONDS MFP_SERVERS FP_PIN_SERVERS) \
        MFP_FACTS="date=$started_at, $((SECONDS - t0)) s of runs; load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)" \
        MFP_MACHINE="$(nproc) cores, $(uname -r), source $(git rev-parse --short HEAD 2>/dev/null)" \
        MFP_TOPO="$fp_topology" MFP_WORKERS="$workers" \
        MFP_RTPENGINE="$(rtpengine --version 2>&1 | head -1)" \
        python3 "$root/scripts/media_fastpath_report.py" "$results" "$out"
}

case $scenario in
stun) run_stun 5 ;;
media) run_media ;;
turn) run_turn ;;
turn-tcp) run_turn_tcp ;;
fastpath) run_fastpath ;;
media-fastpath) run_media_fastpath ;;
proxy) run_proxy ;;
fraud) run_fraud ;;
register) run_register ;;
profile) run_profile ;;
scale) run_scale ;;
all)
    t_all=$SECONDS
    run_stun 3
    run_turn
    run_proxy
    say "all scenarios done in $((SECONDS - t_all)) s: $out"
    ;;
esac
