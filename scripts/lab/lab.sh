#!/usr/bin/env bash
# scripts/lab/lab.sh — a NAT lab from network namespaces, veth pairs and nftables, for the
# scenarios of the reference ("Media and NAT", "NAT Detection", "Private to Private
# Communication", "Media Relay", STUN, TURN, "Internal TURN Server").
#
# Every namespace of one lab is called PREFIX-NAME, so labs with different prefixes (the tests
# put their pid in it) never collide; interfaces live only inside their namespaces (veth pairs
# are created directly there), so nothing is added to the host's own network.
#
# Address plan (nothing here is ever routed on a real network):
#   198.18.0.0/24   "the internet" (RFC 2544 benchmarking range): one bridge in PREFIX-inet.
#                   Portico's box 198.18.0.10 (RFC 5780 alternate .11), the provider's media
#                   gateway .20, public clients .30-.99, NAT routers' public sides .100-.199.
#   10.0.N.0/24     private LANs behind router N: the router is 10.0.N.1, hosts .2 and up.
# Hosts on the internet have no default route: a packet to a private address is unroutable
# there, as on the real internet (the sender gets "Network unreachable", nothing arrives).
#
# Usage (as root; `ip` from iproute2 and `nft` from nftables):
#   lab.sh net    PREFIX                          the internet: PREFIX-inet with bridge inet0
#   lab.sh public PREFIX NAME IP[,IP...]          a host on the internet (IPs in 198.18.0.0/24)
#   lab.sh router PREFIX NAME WAN_IP LAN TYPE     a router: public side WAN_IP, LAN 10.0.N
#                                                 (router 10.0.N.1/24), TYPE below
#   lab.sh host   PREFIX NAME ROUTER IP           a host in ROUTER's LAN, default route via it
#   lab.sh forward PREFIX ROUTER PROTO PORT IP[:PORT]  a static NAT map (DNAT) on ROUTER
#   lab.sh block-udp PREFIX ROUTER                a firewall: no UDP out of ROUTER's LAN
#   lab.sh exec   PREFIX NAME CMD...              run CMD inside PREFIX-NAME
#   lab.sh list   PREFIX                          the namespaces of a lab
#   lab.sh down   PREFIX                          kill what runs inside, delete every namespace
#   lab.sh up     PREFIX TOPOLOGY [TYPES]         a whole topology of the reference (cmd_up)
#   lab.sh demo   [TYPE_A [TYPE_C]]               the branch case without, then with Portico's
#                                                 media relay (needs a built portico)
#
# Router TYPEs (the classic names; RFC 4787 mapping/filtering behaviour in brackets):
#   full-cone        [endpoint-independent mapping, endpoint-independent filtering]
#   restricted       [endpoint-independent mapping, address-dependent filtering]
#   port-restricted  [endpoint-independent mapping, address-and-port-dependent filtering]
#   symmetric        [address-and-port-dependent mapping and filtering]
#   none             no forwarding at all: a box with a public and a private side (Portico's
#                    box in front of a PBX LAN); only Portico can connect the two
#
# How the types are made with nftables (see nat_rules below for the rules themselves):
# * Mapping. Linux source NAT (`masquerade`) keeps the internal source port whenever the
#   resulting connection tuple is unique, and the tuple includes the remote address and
#   port; so one internal ip:port keeps the same public port towards every destination:
#   endpoint-independent mapping. `masquerade random` picks a new random port for every new
#   connection (every new remote ip:port): address-and-port-dependent mapping, a symmetric
#   NAT. (`persistent` only matters with a pool of several public addresses: it gives one
#   client the same public address every time. With one WAN address it changes nothing, so
#   it is not used; `random-fully` behaves like `random` on current kernels.)
# * Filtering. Conntrack lets in only replies of a known connection, i.e. from exactly the
#   remote ip:port the inside host sent to: address-and-port-dependent filtering, which is
#   port-restricted and symmetric as they are. Looser filtering needs more: every UDP packet
#   going out records in a dynamic nftables map who it went to, and a DNAT rule in
#   prerouting lets a new inbound packet in when the map knows it:
#     full cone:  map fc { public port -> inside host }: anyone may send to a port in use;
#     restricted: map rc { remote ip . public port -> inside host }: any port of an address
#                 the inside host has sent to.
#   Entries expire 120 s after the last outbound packet (like a NAT binding). The DNAT keeps
#   the port, which is the public port because masquerade kept it; the LANs of the lab have
#   few hosts, so two of them never compete for a port.
# * Unsolicited inbound UDP that no rule lets in is dropped in the router's input chain.
#   (Otherwise the router would answer ICMP port unreachable, and worse, the packet's
#   conntrack entry for the router's own port would make the next outbound connection from
#   that port pick another public port, breaking endpoint-independent mapping.)
set -euo pipefail

LAB_NET=198.18.0
SELF=$(readlink -f "${BASH_SOURCE[0]}")

die() {
    echo "lab.sh: $*" >&2
    exit 2
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, veth, nftables)"
    command -v ip >/dev/null || die "\`ip\` is missing (Debian package iproute2)"
    command -v nft >/dev/null || die "\`nft\` is missing (Debian package nftables)"
}

ns() { echo "$1-$2"; }

# Interface names are limited to 15 bytes; node names to 10 so "to-NAME" fits.
check_name() {
    [[ $1 =~ ^[a-z][a-z0-9]{0,9}$ ]] || die "node name '$1': 1-10 of [a-z0-9], starting with a letter"
}

in_ns() {
    local n=$1
    shift
    ip netns exec "$n" "$@"
}

new_ns() {
    local n=$1
    ip netns add "$n" || die "cannot create network namespace $n"
    ip -n "$n" link set lo up
    # The lab's own hosts: no IPv6 autoconfiguration noise, no duplicate address detection.
    in_ns "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
}

# A veth from interface IF in namespace NS to port PORT of bridge BR in namespace BRNS.
wire() {
    local n=$1 ifname=$2 brns=$3 br=$4 port=$5
    ip link add "$ifname" netns "$n" type veth peer name "$port" netns "$brns"
    ip -n "$brns" link set "$port" master "$br" up
    ip -n "$n" link set "$ifname" up
}

cmd_net() {
    local p=$1 inet
    inet=$(ns "$p" inet)
    new_ns "$inet"
    ip -n "$inet" link add inet0 type bridge
    ip -n "$inet" link set inet0 up
}

cmd_public() {
    local p=$1 name=$2 ips=$3 n
    check_name "$name"
    n=$(ns "$p" "$name")
    new_ns "$n"
    wire "$n" wan0 "$(ns "$p" inet)" inet0 "to-$name"
    local ip
    for ip in ${ips//,/ }; do
        ip -n "$n" addr add "$ip/24" dev wan0
    done
}

# The nftables ruleset of a NAT router of TYPE (see the header for why each rule is there).
nat_rules() {
    local type=$1
    local masq="masquerade" fc="" rc="" record=""
    case $type in
    full-cone)
        record='iifname "lan0" update @fc { udp sport timeout 120s : ip saddr }'
        fc='iifname "wan0" dnat to udp dport map @fc'
        ;;
    restricted)
        record='iifname "lan0" update @rc { ip daddr . udp sport timeout 120s : ip saddr }'
        rc='iifname "wan0" dnat to ip saddr . udp dport map @rc'
        ;;
    port-restricted) ;;
    symmetric) masq="masquerade random" ;;
    *) die "unknown NAT type '$type' (full-cone, restricted, port-restricted, symmetric, none)" ;;
    esac
    cat <<EOF
table ip lab {
    # full cone: public port -> inside host, learnt from outbound UDP
    map fc { type inet_service : ipv4_addr; flags timeout; timeout 120s; }
    # restricted cone: remote address . public port -> inside host
    map rc { type ipv4_addr . inet_service : ipv4_addr; flags timeout; timeout 120s; }
    chain forward_lab {
        type filter hook forward priority filter; policy accept;
        $record
    }
    chain input_lab {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state new meta l4proto udp drop
    }
    chain prerouting_lab {
        type nat hook prerouting priority dstnat; policy accept;
        $fc
        $rc
    }
    chain postrouting_lab {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" $masq
    }
}
EOF
}

cmd_router() {
    local p=$1 name=$2 wan=$3 lan=$4 type=$5 n
    check_name "$name"
    [[ $lan =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "LAN '$lan': give the first three octets, 10.X.Y"
    n=$(ns "$p" "$name")
    new_ns "$n"
    wire "$n" wan0 "$(ns "$p" inet)" inet0 "to-$name"
    ip -n "$n" addr add "$wan/24" dev wan0
    ip -n "$n" link add lan0 type bridge
    ip -n "$n" addr add "$lan.1/24" dev lan0
    ip -n "$n" link set lan0 up
    if [[ $type == none ]]; then
        in_ns "$n" sysctl -qw net.ipv4.ip_forward=0
    else
        nat_rules "$type" | in_ns "$n" nft -f - || die "nft refused the rules of $type"
        in_ns "$n" sysctl -qw net.ipv4.ip_forward=1
    fi
}

cmd_host() {
    local p=$1 name=$2 router=$3 ip=$4 n rns gw
    check_name "$name"
    n=$(ns "$p" "$name")
    rns=$(ns "$p" "$router")
    [[ -e /run/netns/$rns ]] || die "no router $rns"
    new_ns "$n"
    wire "$n" lan0 "$rns" lan0 "to-$name"
    ip -n "$n" addr add "$ip/24" dev lan0
    gw=$(ip -n "$rns" -4 -o addr show dev lan0 | awk '{print $4}' | cut -d/ -f1)
    ip -n "$n" route add default via "$gw"
}

# A static NAT map on ROUTER: PROTO PORT on its public address to IP[:PORT] inside (the
# reference's "static NAT map in your internet router that points towards your TURN server").
cmd_forward() {
    local p=$1 router=$2 proto=$3 port=$4 target=$5 n
    n=$(ns "$p" "$router")
    [[ $proto == tcp || $proto == udp ]] || die "protocol '$proto': tcp or udp"
    in_ns "$n" nft add rule ip lab prerouting_lab iifname "wan0" "$proto" dport "$port" dnat to "$target"
}

# A corporate firewall on ROUTER: no UDP leaves its LAN (so no STUN, no TURN over UDP, no
# RTP), TCP does (the reference: "TURN works with UDP and TCP by design").
cmd_block_udp() {
    local p=$1 router=$2
    in_ns "$(ns "$p" "$router")" nft add rule ip lab forward_lab iifname "lan0" meta l4proto udp drop
}

cmd_list() {
    local p=$1
    ip netns list | awk '{print $1}' | grep -E "^$p-[a-z0-9]+$" || true
}

cmd_down() {
    local p=$1 n pid
    [[ -n $p ]] || die "down: which prefix?"
    for n in $(cmd_list "$p"); do
        # Processes inside keep a namespace alive after `ip netns del`: stop them first, by
        # pid (SIGTERM, then SIGKILL what is left).
        for pid in $(ip netns pids "$n" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local left=""
        for n in $(cmd_list "$p"); do left+=$(ip netns pids "$n" 2>/dev/null); done
        [[ -z $left ]] && break
        sleep 0.2
    done
    for n in $(cmd_list "$p"); do
        for pid in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$n" 2>/dev/null || true
    done
}

# The reference's topologies in one command; they stay up until `lab.sh down PREFIX`.
#   provider [TYPE]          phonea behind router ra (TYPE, default port-restricted); the
#                            provider's media gateway 198.18.0.20; Portico's box 198.18.0.10
#   branch [TYPE_A [TYPE_C]] two branches: phonea behind ra, phonec behind rc; the box
#   zoo                      one phone behind a router of each type (phone1..phone4 behind
#                            r1..r4: full-cone, restricted, port-restricted, symmetric); the box
#                            with its RFC 5780 alternate address 198.18.0.11
#   internal-turn            the box in a LAN (10.0.5.10) behind a port-restricted router r5
#                            with one map, 3478/tcp to the box; a LAN peer 10.0.5.20; a client
#                            on the internet 198.18.0.30
#   dmz                      the box with a public (198.18.0.10) and a private side (10.0.9.1,
#                            no forwarding) and an internal host gw 10.0.9.2; a caller
#                            198.18.0.30
cmd_up() {
    local p=$1 topology=$2
    shift 2
    cmd_net "$p"
    case $topology in
    provider)
        cmd_public "$p" box "$LAB_NET.10"
        cmd_public "$p" provider "$LAB_NET.20"
        cmd_router "$p" ra "$LAB_NET.101" 10.0.1 "${1:-port-restricted}"
        cmd_host "$p" phonea ra 10.0.1.2
        ;;
    branch)
        cmd_public "$p" box "$LAB_NET.10"
        cmd_router "$p" ra "$LAB_NET.101" 10.0.1 "${1:-symmetric}"
        cmd_host "$p" phonea ra 10.0.1.2
        cmd_router "$p" rc "$LAB_NET.103" 10.0.3 "${2:-${1:-port-restricted}}"
        cmd_host "$p" phonec rc 10.0.3.2
        ;;
    zoo)
        cmd_public "$p" box "$LAB_NET.10,$LAB_NET.11"
        local n=1 type
        for type in full-cone restricted port-restricted symmetric; do
            cmd_router "$p" "r$n" "$LAB_NET.10$n" "10.0.$n" "$type"
            cmd_host "$p" "phone$n" "r$n" "10.0.$n.2"
            n=$((n + 1))
        done
        ;;
    internal-turn)
        cmd_router "$p" r5 "$LAB_NET.105" 10.0.5 port-restricted
        cmd_host "$p" box r5 10.0.5.10
        cmd_host "$p" peer r5 10.0.5.20
        cmd_public "$p" client "$LAB_NET.30"
        cmd_forward "$p" r5 tcp 3478 10.0.5.10:3478
        ;;
    dmz)
        cmd_router "$p" box "$LAB_NET.10" 10.0.9 none
        cmd_host "$p" gw box 10.0.9.2
        cmd_public "$p" caller "$LAB_NET.30"
        ;;
    *)
        cmd_down "$p"
        die "unknown topology '$topology' (provider, branch, zoo, internal-turn, dmz)"
        ;;
    esac
    echo "lab $p ($topology) is up:"
    local n
    for n in $(cmd_list "$p"); do
        printf '  %-24s %s\n' "$n" "$(ip -n "$n" -4 -o addr show | awk '$2 != "lo" {print $4}' | tr '\n' ' ')"
    done
    echo "run things inside with: $SELF exec $p NODE CMD...; remove with: $SELF down $p"
}

# One RTP call of 50 packets each way between phone A and phone C of demo lab $1: A sends
# from $2 to $3, C from $4 to $5; prints both reports.
demo_call() {
    local p=$1 rtp start
    rtp="$(dirname "$SELF")/rtp.py"
    start=$(python3 -c 'import time; print(time.time() + 1)')
    in_ns "$(ns "$p" phonea)" python3 "$rtp" --bind "$2" --to "$3" --count 50 --expect 50 \
        --start-at "$start" --label "phone A" >"$DEMO_OUT/a" &
    local a=$!
    in_ns "$(ns "$p" phonec)" python3 "$rtp" --bind "$4" --to "$5" --count 50 --expect 50 \
        --start-at "$start" --label "phone C" >"$DEMO_OUT/c"
    wait "$a"
    sed 's/^/   /' "$DEMO_OUT/a" "$DEMO_OUT/c"
}

# "A C": how many distinct packets phone A and phone C received in the last demo_call.
demo_received() {
    python3 -c 'import json,sys; print(" ".join(str(json.load(open(f))["unique"]) for f in sys.argv[1:]))' \
        "$DEMO_OUT/a" "$DEMO_OUT/c"
}

# A guided tour for an operator: the reference's branch case, two phones behind NAT routers
# of TYPE_A and TYPE_C, first without help (nothing arrives), then, with a portico binary
# (PORTICO, else target/release or target/debug of this checkout), through a media relay
# session on Portico's box on the internet. Everything is removed on exit (trap), Ctrl-C
# included.
cmd_demo() {
    local type_a=${1:-symmetric} type_c=${2:-${1:-port-restricted}} p="labdemo$$"
    local root bin=""
    root=$(cd "$(dirname "$SELF")/../.." && pwd)
    DEMO_OUT=$(mktemp -d)
    # Ctrl-C or kill: exit, and the EXIT trap removes everything.
    trap 'cmd_down '"$p"'; rm -rf "$DEMO_OUT"' EXIT
    trap 'exit 130' INT TERM
    cmd_up "$p" branch "$type_a" "$type_c" | grep -v '^run things'
    echo
    echo "1. Phone A (behind $type_a) signals 10.0.1.2:5004, phone C (behind $type_c) 10.0.3.2:5004;"
    echo "   each sends RTP to the address the other signalled (private to private):"
    demo_call "$p" 10.0.1.2:5004 10.0.3.2:5004 10.0.3.2:5004 10.0.1.2:5004
    if [[ $(demo_received) == "0 0" ]]; then
        echo "   nothing arrived either way (\"received\": 0): the reference's 'Private to Private"
        echo "   Communication'."
    else
        echo "   packets arrived ($(demo_received)): not what the reference describes; look at the routers."
    fi
    if [[ -n ${PORTICO:-} ]]; then
        bin=$PORTICO
    elif [[ -x $root/target/release/portico ]]; then
        bin=$root/target/release/portico
    elif [[ -x $root/target/debug/portico ]]; then
        bin=$root/target/debug/portico
    fi
    if [[ -z $bin ]]; then
        echo "No portico binary (cargo build, or PORTICO=/path/to/portico): the demo stops here."
        return 0
    fi
    command -v curl >/dev/null || die "\`curl\` is missing (Debian package curl)"
    echo
    echo "2. The same call through a media relay session on Portico ($bin) at $LAB_NET.10:"
    printf '%s\n' \
        "state_dir = \"$DEMO_OUT/state\"" \
        "[turn]" \
        "listen = [\"$LAB_NET.10:3478\"]" \
        "relay_ip = \"$LAB_NET.10\"" \
        "allow_peers = [\"$LAB_NET.0/24\"]" \
        "workers = 1" \
        "[media]" \
        "ports = \"40000-40099\"" \
        "[api]" \
        "listen = \"127.0.0.1:8088\"" >"$DEMO_OUT/portico.toml"
    in_ns "$(ns "$p" box)" env PORTICO_DATAPLANE="$bin" "$bin" run --config "$DEMO_OUT/portico.toml" \
        >"$DEMO_OUT/portico.log" 2>&1 &
    local i
    for i in $(seq 100); do
        in_ns "$(ns "$p" box)" curl -sf http://127.0.0.1:8088/healthz >/dev/null 2>&1 && break
        sleep 0.2
    done
    local session l0 l1
    # The phones' SDP carries only private addresses: no leg gets an address; Portico latches
    # onto the source of each phone's first packet (NAT detection).
    session=$(in_ns "$(ns "$p" box)" curl -sf -H "Authorization: Bearer $(cat "$DEMO_OUT/state/admin.token")" \
        -H 'Content-Type: application/json' -d '{"legs":[{},{}],"label":"demo"}' \
        http://127.0.0.1:8088/api/v1/media/sessions) || {
        cat "$DEMO_OUT/portico.log"
        die "could not create a media session"
    }
    echo "   POST /api/v1/media/sessions -> $session"
    l0=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["legs"][0]["local"])' <<<"$session")
    l1=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["legs"][1]["local"])' <<<"$session")
    echo "   phone A is told to send to $l0, phone C to $l1 (the SBC rewrites the SDP)."
    # Each phone's first packet latches its leg (a phone starts sending when the call is
    # answered); then the call.
    in_ns "$(ns "$p" phonea)" python3 "$(dirname "$SELF")/rtp.py" --bind 10.0.1.2:5004 --to "$l0" \
        --count 1 --linger 0 >/dev/null
    in_ns "$(ns "$p" phonec)" python3 "$(dirname "$SELF")/rtp.py" --bind 10.0.3.2:5004 --to "$l1" \
        --count 1 --linger 0 >/dev/null
    demo_call "$p" 10.0.1.2:5004 "$l0" 10.0.3.2:5004 "$l1"
    if [[ $(demo_received) == "50 50" ]]; then
        echo "   every packet arrived both ways (50 of 50), from the box's leg addresses: the"
        echo "   reference's 'Media Relay'."
    else
        echo "   packets were lost (received: $(demo_received) of 50 each); Portico's log:"
        sed 's/^/     /' "$DEMO_OUT/portico.log"
        return 1
    fi
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
    net) need_root; [[ $# -eq 1 ]] || die "usage: net PREFIX"; cmd_net "$@" ;;
    public) need_root; [[ $# -eq 3 ]] || die "usage: public PREFIX NAME IP[,IP]"; cmd_public "$@" ;;
    router) need_root; [[ $# -eq 5 ]] || die "usage: router PREFIX NAME WAN_IP 10.X.Y TYPE"; cmd_router "$@" ;;
    host) need_root; [[ $# -eq 4 ]] || die "usage: host PREFIX NAME ROUTER IP"; cmd_host "$@" ;;
    block-udp) need_root; [[ $# -eq 2 ]] || die "usage: block-udp PREFIX ROUTER"; cmd_block_udp "$@" ;;
    forward) need_root; [[ $# -eq 5 ]] || die "usage: forward PREFIX ROUTER tcp|udp PORT IP[:PORT]"; cmd_forward "$@" ;;
    exec) need_root; [[ $# -ge 3 ]] || die "usage: exec PREFIX NAME CMD..."; local n; n=$(ns "$1" "$2"); shift 2; in_ns "$n" "$@" ;;
    list) [[ $# -eq 1 ]] || die "usage: list PREFIX"; cmd_list "$@" ;;
    down) need_root; [[ $# -eq 1 ]] || die "usage: down PREFIX"; cmd_down "$@" ;;
    up) need_root; [[ $# -ge 2 ]] || die "usage: up PREFIX provider|branch|zoo|internal-turn|dmz [TYPES]"; cmd_up "$@" ;;
    demo) need_root; cmd_demo "$@" ;;
    *) sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; [[ -z $cmd ]] || exit 2 ;;
    esac
}

main "$@"
