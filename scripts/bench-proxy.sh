#!/usr/bin/env bash
# Reverse-proxy benchmark: Portico against HAProxy (Debian package), both routing by Host to
# the same nginx target on loopback, measured with the same load tool in one run.
#
#   scripts/bench-proxy.sh            # 10 s per measurement
#   DURATION=5 CONNS=50 scripts/bench-proxy.sh
#
# Reports, per proxy: HTTP and HTTPS keep-alive requests/s and p99 latency (wrk -t1 -cCONNS),
# proxy CPU seconds per 100k requests, and full TLS handshakes/s (openssl s_time -new, one
# client) with proxy CPU seconds per 1000 handshakes. nginx answered directly is the
# baseline. Both proxies use one thread (Portico's proxy runs on the control plane's
# current-thread runtime; HAProxy with nbthread 1) and the same ECDSA P-256 certificate.
# Everything listens on free 127.0.0.1 ports; every process started here is stopped at exit.
# Needs: nginx, haproxy, wrk, openssl, python3 (free ports), and a release build of portico
# (built here if missing).
set -euo pipefail

DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/target/bench-proxy.md}
WORK=$(mktemp -d /tmp/portico-bench-proxy.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

for tool in nginx haproxy wrk openssl python3; do
    command -v "$tool" >/dev/null || { echo "bench-proxy: $tool is missing (apt-get install nginx haproxy wrk openssl)" >&2; exit 1; }
done

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "bench-proxy: nothing listens on 127.0.0.1:$1" >&2
    return 1
}

# CPU seconds (user+system) a process has used so far.
cpu_of() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"
}

if [ ! -x "$ROOT/target/release/portico" ] || [ ! -x "$ROOT/target/release/portico-dataplane" ]; then
    (cd "$ROOT" && cargo build --release -p portico -p portico-dataplane)
fi

# One ECDSA P-256 certificate for both proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=alpha.test" -addext "subjectAltName=DNS:alpha.test" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/haproxy.pem"

NGINX=$(free_port)
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 60s;
  client_body_temp_path $WORK/nginx/body; proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fcgi; uwsgi_temp_path $WORK/nginx/uwsgi; scgi_temp_path $WORK/nginx/scgi;
  server { listen 127.0.0.1:$NGINX; location / { return 200 "hello from the target\n"; } }
}
EOF
nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" &
PIDS+=($!)
wait_port "$NGINX"

HA_HTTP=$(free_port); HA_HTTPS=$(free_port)
cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
  tune.ssl.default-dh-param 2048
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend web
  bind 127.0.0.1:$HA_HTTP
  bind 127.0.0.1:$HA_HTTPS ssl crt $WORK/haproxy.pem alpn http/1.1
  http-request set-var(txn.host) req.hdr(host),field(1,:),lower
  option forwardfor
  use_backend alpha if { var(txn.host) -m str alpha.test }
  default_backend none
backend alpha
  http-reuse safe
  server nginx 127.0.0.1:$NGINX
backend none
  http-request deny deny_status 421
EOF
haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
HA_PID=$!
PIDS+=($HA_PID)
wait_port "$HA_HTTP"

P_HTTP=$(free_port); P_HTTPS=$(free_port)
cat > "$WORK/portico.toml" <<EOF
state_dir = "$WORK/portico-state"
log_level = "warn"
[turn]
listen = ["127.0.0.1:$(free_port)"]
workers = 1
[api]
listen = "127.0.0.1:$(free_port)"
[proxy.listen]
http = "127.0.0.1:$P_HTTP"
https = "127.0.0.1:$P_HTTPS"
[proxy.tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[proxy.limits]
max_connections_per_ip = 10000
[[proxy.services]]
name = "alpha.test"
host = "127.0.0.1"
http = $NGINX
EOF
"$ROOT/target/release/portico" run --config "$WORK/portico.toml" > "$WORK/portico.log" 2>&1 &
P_PID=$!
PIDS+=($P_PID)
wait_port "$P_HTTP"
wait_port "$P_HTTPS"

# wrk run: prints "req/s p99_ms cpu_s_per_100k" for the given URL and proxy pid (or "-").
measure() {
    local url=$1 pid=$2 c0 c1 out rps p99 n
    [ "$pid" = "-" ] || c0=$(cpu_of "$pid")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Host: alpha.test" "$url")
    [ "$pid" = "-" ] || c1=$(cpu_of "$pid")
    rps=$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")
    n=$(awk '/requests in/ { print $1 }' <<<"$out")
    p99=$(awk '$1 == "99%" { v=$2; if (v ~ /us$/) { sub(/us/,"",v); v=v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v) } else if (v ~ /s$/) { sub(/s/,"",v); v=v*1000 } printf "%.2f", v }' <<<"$out")
    if grep -q "Non-2xx" <<<"$out"; then echo "bench-proxy: non-2xx answers from $url" >&2; fi
    if [ "$pid" = "-" ]; then
        echo "$rps $p99 -"
    else
        awk -v a="$c0" -v b="$c1" -v n="$n" -v r="$rps" -v p="$p99" 'BEGIN { printf "%s %s %.2f\n", r, p, (b - a) * 100000 / n }'
    fi
}

# Full handshakes (no resumption) from one openssl client: "handshakes/s cpu_s_per_1000".
handshakes() {
    local port=$1 pid=$2 c0 c1 out n secs
    c0=$(cpu_of "$pid")
    out=$(openssl s_time -connect "127.0.0.1:$port" -new -time "$DURATION" 2>/dev/null || true)
    c1=$(cpu_of "$pid")
    n=$(awk '/connections in .* real seconds/ { print $1; exit }' <<<"$out")
    secs=$(awk '/connections in .* real seconds/ { print $4; exit }' <<<"$out")
    awk -v a="$c0" -v b="$c1" -v n="${n:-0}" -v s="${secs:-1}" 'BEGIN { if (n == 0) { print "0 -"; exit } printf "%.0f %.2f\n", n / s, (b - a) * 1000 / n }'
}

echo "bench-proxy: ${DURATION}s per run, wrk -t1 -c$CONNS, keep-alive; nginx target on :$NGINX" >&2
read -r N_RPS N_P99 _ < <(measure "http://127.0.0.1:$NGINX/" -)
read -r H_RPS H_P99 H_CPU < <(measure "http://127.0.0.1:$HA_HTTP/" "$HA_PID")
read -r P_RPS P_P99 P_CPU < <(measure "http://127.0.0.1:$P_HTTP/" "$P_PID")
read -r HS_RPS HS_P99 HS_CPU < <(measure "https://127.0.0.1:$HA_HTTPS/" "$HA_PID")
read -r PS_RPS PS_P99 PS_CPU < <(measure "https://127.0.0.1:$P_HTTPS/" "$P_PID")
read -r H_HS H_HSCPU < <(handshakes "$HA_HTTPS" "$HA_PID")
read -r P_HS P_HSCPU < <(handshakes "$P_HTTPS" "$P_PID")

mkdir -p "$(dirname "$OUT")"
{
    echo "## Reverse proxy: Portico vs HAProxy $(haproxy -v | awk 'NR==1 { print $3 }') (Host routing to nginx, loopback, $(nproc) cores)"
    echo
    echo "wrk -t1 -c$CONNS -d${DURATION}s keep-alive; TLS 1.3 ECDSA P-256; one proxy thread each; $(date -u +%Y-%m-%d)."
    echo
    echo "| path | req/s | p99 ms | proxy CPU-s / 100k req |"
    echo "|---|---:|---:|---:|"
    echo "| nginx direct | $N_RPS | $N_P99 | - |"
    echo "| HAProxy HTTP | $H_RPS | $H_P99 | $H_CPU |"
    echo "| Portico HTTP | $P_RPS | $P_P99 | $P_CPU |"
    echo "| HAProxy HTTPS | $HS_RPS | $HS_P99 | $HS_CPU |"
    echo "| Portico HTTPS | $PS_RPS | $PS_P99 | $PS_CPU |"
    echo
    echo "| full TLS handshakes (openssl s_time -new, 1 client) | handshakes/s | proxy CPU-s / 1000 |"
    echo "|---|---:|---:|"
    echo "| HAProxy | $H_HS | $H_HSCPU |"
    echo "| Portico | $P_HS | $P_HSCPU |"
} | tee "$OUT"
