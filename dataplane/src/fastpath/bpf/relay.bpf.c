// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// Portico's kernel fast path: a TC (clsact) ingress program that relays the UDP packets of
// established TURN channels without waking user space.
//
//   (a) ChannelData from a client 5-tuple whose channel is installed in CHANNELS: the
//       4-byte ChannelData header (and the padding after the data) is removed and the
//       datagram leaves from the allocation's relayed address:port to the peer.
//   (b) A UDP datagram from a peer to a relayed address:port installed in PEERS: the
//       ChannelData header is put in front and the datagram leaves from the TURN listen
//       address:port to the client (no padding over UDP, RFC 8656 §12.5).
//   (c) (a) to a peer that is an address of this host (FWD_LOCAL_PEER, set by user space):
//       when that peer is another relayed address with the reverse channel installed in
//       PEERS (two clients relay-to-relay through this server, as WebRTC's relay-only
//       policy does), the datagram becomes that channel's ChannelData to the other client
//       at once; otherwise (a) sends it through loopback (the entry's ifindex), or, when it
//       is padded, user space relays it.
//   (d) A UDP datagram whose 5-tuple is installed in PEERS with FWD_PLAIN: a latched media
//       relay leg or a static NAT map binding. Only addresses and ports change: it leaves
//       from the other leg's (the binding's, the public port's) address:port to the entry's
//       destination, payload untouched.
//
// Everything else -- not IPv4, IP options, fragments, GSO aggregates, STUN messages, Send and
// Data indications, unknown tuples, bad lengths, too large for the egress MTU -- is passed to
// user space untouched (TC_ACT_OK). User space (the dataplane) is the only authority: it
// installs and removes the entries and reads the per-entry counters.
//
// The payload is moved by 4 bytes instead of popping room between the IP and UDP headers:
// that keeps the UDP header where the skb's transport header and csum_start say it is, so a
// CHECKSUM_PARTIAL packet (veth, containers) is completed correctly on the way out.
// Checksums are updated incrementally with the kernel's helpers, which know the skb's
// checksum state (PARTIAL: pseudo-header only; otherwise the full sum).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Map keys and values; the Rust side (dataplane/src/fastpath/kernel.rs) has the same layout.
// Addresses and ports are in network byte order, the channel number too.
struct chan_key {
    __u32 client_ip;
    __u32 listen_ip;
    __u16 client_port;
    __u16 listen_port;
    __u16 channel;
    __u16 pad;
};

struct peer_key {
    __u32 peer_ip;
    __u32 relay_ip;
    __u16 peer_port;
    __u16 relay_port;
};

// What a matching packet becomes, and its counters.
struct fwd {
    __u32 saddr;   // new source address
    __u32 daddr;   // new destination address
    __u16 sport;   // new source port
    __u16 dport;   // new destination port
    __u16 channel; // (b): channel number to put in front; (a): unused
    __u16 flags;   // FWD_LOCAL_PEER
    __u32 ifindex; // egress interface (bpf_redirect_neigh resolves the next hop's MAC)
    __u32 pad2;
    __u64 packets; // relayed packets
    __u64 bytes;   // relayed payload bytes (application data, as user space counts them)
};

// Sizes are set by the loader from the configuration (turn.max_allocations).
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, struct chan_key);
    __type(value, struct fwd);
} CHANNELS SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, struct peer_key);
    __type(value, struct fwd);
} PEERS SEC(".maps");

// (a): the peer is an address of this host; ifindex is the loopback interface.
#define FWD_LOCAL_PEER 1
// (d): a plain UDP forward (media leg, NAT map), no ChannelData header.
#define FWD_PLAIN 2

#define ETH_LEN 14
#define IP_OFF ETH_LEN
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_LEN_OFF (IP_OFF + 2)
#define IP_TTL_OFF (IP_OFF + 8)
#define IP_SRC_OFF (IP_OFF + 12)
#define IP_DST_OFF (IP_OFF + 16)
#define UDP_OFF (IP_OFF + 20)
#define UDP_PORTS_OFF UDP_OFF
#define UDP_LEN_OFF (UDP_OFF + 4)
#define UDP_CSUM_OFF (UDP_OFF + 6)
#define DATA_OFF (UDP_OFF + 8)
#define CHUNK 64
#define MAX_CHUNKS 24 // 1536 bytes: more than any payload under a 1500-byte MTU
#define MAX_PAYLOAD (CHUNK * MAX_CHUNKS - 4)
#define RELAY_TTL 64

// Copies one piece of `n` bytes from `src` to `dst`, telling a CHECKSUM_COMPLETE skb.
#define COPY(n, src, dst)                                                          \
    do {                                                                           \
        __u8 b[n];                                                                 \
        if (bpf_skb_load_bytes(skb, (src), b, n) < 0)                              \
            return -1;                                                             \
        if (bpf_skb_store_bytes(skb, (dst), b, n, BPF_F_RECOMPUTE_CSUM) < 0)       \
            return -1;                                                             \
    } while (0)

// Moves `len` bytes at `at + 4` down to `at` (ascending: every piece is read before the
// bytes below it are written).
static __always_inline int move_down(struct __sk_buff *skb, __u32 at, __u32 len)
{
    __u32 n = len / CHUNK;
    __u32 i;
    for (i = 0; i < MAX_CHUNKS; i++) {
        if (i >= n)
            break;
        COPY(CHUNK, at + 4 + i * CHUNK, at + i * CHUNK);
    }
    __u32 done = n * CHUNK;
    __u32 rem = len - done;
    if (rem & 32) {
        COPY(32, at + 4 + done, at + done);
        done += 32;
    }
    if (rem & 16) {
        COPY(16, at + 4 + done, at + done);
        done += 16;
    }
    if (rem & 8) {
        COPY(8, at + 4 + done, at + done);
        done += 8;
    }
    if (rem & 4) {
        COPY(4, at + 4 + done, at + done);
        done += 4;
    }
    if (rem & 2) {
        COPY(2, at + 4 + done, at + done);
        done += 2;
    }
    if (rem & 1)
        COPY(1, at + 4 + done, at + done);
    return 0;
}

// Moves `len` bytes at `at` up to `at + 4` (descending, the pieces of move_down in reverse).
static __always_inline int move_up(struct __sk_buff *skb, __u32 at, __u32 len)
{
    __u32 n = len / CHUNK;
    __u32 rem = len - n * CHUNK;
    __u32 pos = len;
    if (rem & 1) {
        pos -= 1;
        COPY(1, at + pos, at + 4 + pos);
    }
    if (rem & 2) {
        pos -= 2;
        COPY(2, at + pos, at + 4 + pos);
    }
    if (rem & 4) {
        pos -= 4;
        COPY(4, at + pos, at + 4 + pos);
    }
    if (rem & 8) {
        pos -= 8;
        COPY(8, at + pos, at + 4 + pos);
    }
    if (rem & 16) {
        pos -= 16;
        COPY(16, at + pos, at + 4 + pos);
    }
    if (rem & 32) {
        pos -= 32;
        COPY(32, at + pos, at + 4 + pos);
    }
    __u32 i;
    for (i = 0; i < MAX_CHUNKS; i++) {
        if (i >= n)
            break;
        __u32 off = (n - 1 - i) * CHUNK;
        COPY(CHUNK, at + off, at + 4 + off);
    }
    return 0;
}

// Rewrites addresses, ports, lengths and TTL of the IPv4/UDP headers, fixing both checksums
// (the UDP one through the helpers, which handle CHECKSUM_PARTIAL and a zero checksum).
static __always_inline int rewrite_headers(struct __sk_buff *skb, const struct fwd *v,
                                           struct iphdr *old_ip, struct udphdr *old_udp,
                                           __u16 new_udp_len)
{
    __u32 saddr = v->saddr, daddr = v->daddr;
    __u16 sport = v->sport, dport = v->dport;
    __u16 ip_len = bpf_htons(new_udp_len + 20);
    __u16 udp_len = bpf_htons(new_udp_len);
    // TTL shares a 16-bit checksum word with the protocol.
    __u16 old_ttl_proto = *(__u16 *)&old_ip->ttl;
    __u16 new_ttl_proto = bpf_htons((RELAY_TTL << 8) | IPPROTO_UDP);

    if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip->saddr, saddr, 4) < 0 ||
        bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip->daddr, daddr, 4) < 0 ||
        bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip->tot_len, ip_len, 2) < 0 ||
        bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ttl_proto, new_ttl_proto, 2) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, IP_SRC_OFF, &saddr, 4, 0) < 0 ||
        bpf_skb_store_bytes(skb, IP_DST_OFF, &daddr, 4, 0) < 0 ||
        bpf_skb_store_bytes(skb, IP_LEN_OFF, &ip_len, 2, 0) < 0 ||
        bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl_proto, 2, 0) < 0)
        return -1;
    __u64 pseudo = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
    if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_ip->saddr, saddr, pseudo | 4) < 0 ||
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_ip->daddr, daddr, pseudo | 4) < 0 ||
        // The UDP length is in the pseudo header and in the UDP header.
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_udp->len, udp_len, pseudo | 2) < 0 ||
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_udp->len, udp_len, BPF_F_MARK_MANGLED_0 | 2) < 0 ||
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_udp->source, sport, BPF_F_MARK_MANGLED_0 | 2) < 0 ||
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_udp->dest, dport, BPF_F_MARK_MANGLED_0 | 2) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, UDP_PORTS_OFF, &sport, 2, 0) < 0 ||
        bpf_skb_store_bytes(skb, UDP_PORTS_OFF + 2, &dport, 2, 0) < 0 ||
        bpf_skb_store_bytes(skb, UDP_LEN_OFF, &udp_len, 2, 0) < 0)
        return -1;
    return 0;
}

// Counts a relayed packet of `bytes` payload bytes in `v`.
static __always_inline void count(struct fwd *v, __u32 bytes)
{
    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, bytes);
}

// Counts the packet in `v` and sends it out of v's interface.
static __always_inline int relayed(struct fwd *v, __u32 bytes)
{
    count(v, bytes);
    return bpf_redirect_neigh(v->ifindex, 0, 0, 0);
}

// (a) ChannelData -> plain UDP to the peer. `dlen` is the UDP payload length, `clen` the
// ChannelData length field, `pad` = dlen - 4 - clen (0..3).
static __always_inline int to_peer(struct __sk_buff *skb, struct fwd *v, struct iphdr ip,
                                   struct udphdr udp, __u32 chanhdr, __u32 clen, __u32 pad)
{
    // Shrinks: no MTU question. Anything that fails after the first write is dropped (the
    // packet is half rewritten); before it, it goes to user space.
    __u32 dlen = 4 + clen + pad;
    __u32 lastword = 0, zeroed = 0;
    if (pad) {
        // The padding is the tail of the last 4-aligned word of the datagram.
        if (bpf_skb_load_bytes(skb, DATA_OFF + dlen - 4, &lastword, 4) < 0)
            return TC_ACT_OK;
        __u8 *z = (__u8 *)&zeroed, *l = (__u8 *)&lastword;
        z[0] = l[0];
        if (pad < 3)
            z[1] = l[1];
        if (pad < 2)
            z[2] = l[2];
    }
    if (move_down(skb, DATA_OFF, clen) < 0)
        return TC_ACT_SHOT;
    // The ChannelData header and the padding leave the sum: the checksum field takes
    // them back, and a CHECKSUM_COMPLETE skb is told of that field change.
    if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, chanhdr, 0, BPF_F_MARK_MANGLED_0 | 4) < 0)
        return TC_ACT_SHOT;
    if (pad && bpf_l4_csum_replace(skb, UDP_CSUM_OFF, lastword, zeroed, BPF_F_MARK_MANGLED_0 | 4) < 0)
        return TC_ACT_SHOT;
    __s64 field = bpf_csum_diff(0, 0, &chanhdr, 4, 0);
    if (field >= 0 && pad)
        field = bpf_csum_diff(&zeroed, 4, &lastword, 4, (__u32)field);
    if (field >= 0)
        bpf_csum_update(skb, (__u32)field);
    if (rewrite_headers(skb, v, &ip, &udp, 8 + clen) < 0)
        return TC_ACT_SHOT;
    if (bpf_skb_change_tail(skb, DATA_OFF + clen, 0) < 0)
        return TC_ACT_SHOT;
    return relayed(v, clen);
}

// (b) UDP from a peer -> ChannelData to the client.
static __always_inline int to_client(struct __sk_buff *skb, struct fwd *v, struct iphdr ip,
                                     struct udphdr udp, __u32 dlen)
{
    __u32 mtu_len = 0;
    if (dlen > MAX_PAYLOAD || dlen > 0xffff - 4)
        return TC_ACT_OK;
    if (bpf_check_mtu(skb, v->ifindex, &mtu_len, 4, 0) != 0)
        return TC_ACT_OK;
    if (bpf_skb_change_tail(skb, DATA_OFF + dlen + 4, 0) < 0)
        return TC_ACT_OK;
    if (move_up(skb, DATA_OFF, dlen) < 0)
        return TC_ACT_SHOT;
    __u16 hdr[2] = {v->channel, bpf_htons(dlen)};
    __u32 chanhdr = *(__u32 *)hdr;
    // A new header in the data: the checksum field makes up for it (a pair the skb's own
    // CHECKSUM_COMPLETE sum need not hear of).
    if (bpf_skb_store_bytes(skb, DATA_OFF, hdr, 4, 0) < 0 ||
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, 0, chanhdr, BPF_F_MARK_MANGLED_0 | 4) < 0)
        return TC_ACT_SHOT;
    if (rewrite_headers(skb, v, &ip, &udp, 8 + 4 + dlen) < 0)
        return TC_ACT_SHOT;
    return relayed(v, dlen);
}

// (c) ChannelData from client A to a peer that is relayed address B of this server, whose
// client has a channel to A's relayed address (`w`): only the channel number and the
// headers change. `clen + 4` is the whole UDP payload (no padding).
static __always_inline int hairpin(struct __sk_buff *skb, struct fwd *v, struct fwd *w,
                                   struct iphdr ip, struct udphdr udp, __u32 chanhdr,
                                   __u32 clen)
{
    __u16 hdr[2] = {w->channel, bpf_htons(clen)};
    __u32 newhdr = *(__u32 *)hdr;
    // As in to_client: the checksum field makes up for the new header.
    if (bpf_skb_store_bytes(skb, DATA_OFF, hdr, 4, 0) < 0 ||
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, chanhdr, newhdr, BPF_F_MARK_MANGLED_0 | 4) < 0)
        return TC_ACT_SHOT;
    if (rewrite_headers(skb, w, &ip, &udp, 8 + 4 + clen) < 0)
        return TC_ACT_SHOT;
    count(v, clen);
    return relayed(w, clen);
}

// (d) UDP in, UDP out: addresses and ports rewritten, the payload as it came.
static __always_inline int forward(struct __sk_buff *skb, struct fwd *v, struct iphdr ip,
                                   struct udphdr udp, __u32 dlen)
{
    __u32 mtu_len = 0;
    if (bpf_check_mtu(skb, v->ifindex, &mtu_len, 0, 0) != 0)
        return TC_ACT_OK;
    if (rewrite_headers(skb, v, &ip, &udp, 8 + dlen) < 0)
        return TC_ACT_SHOT;
    return relayed(v, dlen);
}

SEC("classifier")
int portico_relay(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *ipp = (void *)(eth + 1);
    if ((void *)(ipp + 1) > end)
        return TC_ACT_OK;
    // No options, UDP, not a fragment (neither MF nor an offset).
    if (ipp->ihl != 5 || ipp->version != 4 || ipp->protocol != IPPROTO_UDP ||
        (ipp->frag_off & bpf_htons(0x3fff)))
        return TC_ACT_OK;
    struct udphdr *udpp = (void *)(ipp + 1);
    if ((void *)(udpp + 1) > end)
        return TC_ACT_OK;
    __u32 ip_len = bpf_ntohs(ipp->tot_len);
    __u32 udp_len = bpf_ntohs(udpp->len);
    // The lengths must agree with each other and with the frame (no Ethernet padding, no
    // GSO aggregate).
    if (udp_len < 8 || ip_len != 20 + udp_len || skb->len != ETH_LEN + ip_len || skb->gso_segs > 1)
        return TC_ACT_OK;
    __u32 dlen = udp_len - 8;
    if (dlen > MAX_PAYLOAD)
        return TC_ACT_OK;
    // Copies: the helpers below invalidate packet pointers.
    struct iphdr ip = *ipp;
    struct udphdr udp = *udpp;

    if (dlen >= 4) {
        __u8 *d = (void *)(udpp + 1);
        if ((void *)(d + 4) > end)
            return TC_ACT_OK;
        if ((d[0] & 0xC0) == 0x40) {
            __u32 chanhdr = *(__u32 *)d;
            __u16 number = *(__u16 *)d;
            __u32 clen = ((__u32)d[2] << 8) | d[3];
            struct chan_key ck = {
                .client_ip = ip.saddr,
                .listen_ip = ip.daddr,
                .client_port = udp.source,
                .listen_port = udp.dest,
                .channel = number,
            };
            struct fwd *v = bpf_map_lookup_elem(&CHANNELS, &ck);
            if (v) {
                if (clen + 4 > dlen)
                    return TC_ACT_OK;
                __u32 pad = dlen - 4 - clen;
                // Padding only up to the next multiple of 4.
                if (pad > 3 || (pad && ((clen + pad) & 3)))
                    return TC_ACT_OK;
                if (v->flags & FWD_LOCAL_PEER) {
                    struct peer_key back = {
                        .peer_ip = v->saddr,
                        .relay_ip = v->daddr,
                        .peer_port = v->sport,
                        .relay_port = v->dport,
                    };
                    struct fwd *w = bpf_map_lookup_elem(&PEERS, &back);
                    // A media leg or NAT map port of this host: through loopback, as the
                    // user-space relay would send it.
                    if (w && (w->flags & FWD_PLAIN))
                        w = NULL;
                    if (w && !pad)
                        return hairpin(skb, v, w, ip, udp, chanhdr, clen);
                    if (w)
                        return TC_ACT_OK;
                }
                return to_peer(skb, v, ip, udp, chanhdr, clen, pad);
            }
        }
    }
    struct peer_key pk = {
        .peer_ip = ip.saddr,
        .relay_ip = ip.daddr,
        .peer_port = udp.source,
        .relay_port = udp.dest,
    };
    struct fwd *v = bpf_map_lookup_elem(&PEERS, &pk);
    if (v && (v->flags & FWD_PLAIN))
        return forward(skb, v, ip, udp, dlen);
    if (v)
        return to_client(skb, v, ip, udp, dlen);
    return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
