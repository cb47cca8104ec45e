#!/usr/bin/env python3
"""rtp.py: one end of an RTP stream, as a phone or a media gateway does it (symmetric RTP:
it receives on the port it sends from). Python standard library only, so it runs inside any
network namespace of the lab (`ip netns exec NS python3 scripts/lab/rtp.py ...`).

It sends COUNT RTP packets (version 2, payload type 0 = PCMU, 20 ms of 8 kHz audio each:
sequence number +1 and timestamp +160 per packet, one SSRC, 160 bytes of payload) to --to at
--rate packets per second, and at the same time receives and checks what arrives on its
socket: valid RTP or not, from which source address, which SSRC, lost, duplicated and
reordered sequence numbers. After sending it waits --linger seconds for stragglers (or less,
once --expect packets have arrived). The result is one JSON object on stdout:

  {"label", "local", "to", "sent", "send_errors", "received", "invalid", "sources":
   {"IP:PORT": packets}, "ssrcs": {"0x..": packets}, "unique", "duplicates", "reordered",
   "lost" (expect - unique, when --expect is given), "first_from"}

Exit status 0 unless the arguments or the socket are wrong: judging the result is the
caller's job (a test asserts on the JSON; an operator reads it).

Example, two phones in two namespaces of the lab:
  ip netns exec lab-phonea python3 rtp.py --bind 10.0.1.2:5004 --to 198.18.0.10:40000
  ip netns exec lab-phonec python3 rtp.py --bind 10.0.3.2:5004 --to 198.18.0.10:40002
"""

import argparse
import json
import os
import random
import select
import socket
import struct
import sys
import time

HEADER = struct.Struct("!BBHII")
PAYLOAD = 160
# Bounds: at most this many packets sent, this long a run.
MAX_COUNT = 100_000
MAX_SECONDS = 600


def addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT")
    try:
        socket.inet_aton(host)
        return (host, int(port))
    except (OSError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not IPv4:PORT") from None


def packet(seq, ts, ssrc, marker):
    first = 0x80  # version 2, no padding, no extension, no CSRC
    second = (0x80 if marker else 0) | 0  # payload type 0 (PCMU)
    body = bytes((seq + i) & 0xFF for i in range(PAYLOAD))
    return HEADER.pack(first, second, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + body


class Stats:
    """What arrived, per the RTP rules of RFC 3550 appendix A.1 (extended sequence numbers,
    so a wrap at 65535 is not taken for reordering)."""

    def __init__(self):
        self.received = 0
        self.invalid = 0
        self.sources = {}
        self.ssrcs = {}
        self.seen = set()
        self.duplicates = 0
        self.reordered = 0
        self.highest = None  # extended
        self.first_from = None

    def extend(self, seq):
        if self.highest is None:
            return seq
        base = self.highest & ~0xFFFF
        cand = base | seq
        # pick the candidate closest to the highest seen
        best = min((cand - 0x10000, cand, cand + 0x10000), key=lambda c: abs(c - self.highest))
        return best

    def add(self, data, src):
        if len(data) < HEADER.size or data[0] >> 6 != 2:
            self.invalid += 1
            return
        _, _, seq, _, ssrc = HEADER.unpack_from(data)
        source = f"{src[0]}:{src[1]}"
        self.received += 1
        self.sources[source] = self.sources.get(source, 0) + 1
        key = f"{ssrc:#010x}"
        self.ssrcs[key] = self.ssrcs.get(key, 0) + 1
        if self.first_from is None:
            self.first_from = source
        ext = self.extend(seq)
        if (ssrc, ext) in self.seen:
            self.duplicates += 1
            return
        self.seen.add((ssrc, ext))
        if self.highest is not None and ext < self.highest:
            self.reordered += 1
        else:
            self.highest = ext


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bind", type=addr, required=True, help="local IP:PORT (the phone's RTP port)")
    ap.add_argument("--to", type=addr, help="where to send (the signalled address)")
    ap.add_argument(
        "--reply",
        action="store_true",
        help="send to the source of the first packet that arrives (an endpoint behind a static "
        "NAT map answering whoever reached it), waiting at most --wait seconds for it",
    )
    ap.add_argument("--wait", type=float, default=10.0, help="with --reply: seconds to wait")
    ap.add_argument("--count", type=int, default=100, help="packets to send (default 100)")
    ap.add_argument("--rate", type=float, default=50.0, help="packets per second (default 50)")
    ap.add_argument("--expect", type=int, help="packets expected to arrive (enables 'lost')")
    ap.add_argument("--linger", type=float, default=1.0, help="seconds to wait after sending")
    ap.add_argument("--start-at", type=float, help="UNIX time to start sending (both ends together)")
    ap.add_argument("--ready", help="create this file once the socket is bound")
    ap.add_argument(
        "--go",
        help="start once this file exists (at most 60 s; with --ready, several ends in "
        "several namespaces start together whatever their start-up time)",
    )
    ap.add_argument("--delay", type=float, default=0.0, help="seconds to wait after the start")
    ap.add_argument("--ssrc", type=lambda s: int(s, 0), help="SSRC (default random)")
    ap.add_argument("--label", default="", help="a name for the report")
    a = ap.parse_args()
    if not 0 <= a.count <= MAX_COUNT:
        ap.error(f"--count must be 0..{MAX_COUNT}")
    if not 0 < a.rate <= 10_000:
        ap.error("--rate must be in (0, 10000]")
    if not 0 <= a.linger <= 60:
        ap.error("--linger must be 0..60 seconds")
    if (a.to is None) == (not a.reply):
        ap.error("give exactly one of --to and --reply")
    if not 0 <= a.delay <= 60:
        ap.error("--delay must be 0..60 seconds")
    if not 0 <= a.wait <= 60:
        ap.error("--wait must be 0..60 seconds")
    if a.count / a.rate > MAX_SECONDS:
        ap.error(f"a run is at most {MAX_SECONDS} s")

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(a.bind)
    s.setblocking(False)
    ssrc = a.ssrc if a.ssrc is not None else random.getrandbits(32)
    seq0 = random.getrandbits(16)
    ts0 = random.getrandbits(32)
    stats = Stats()
    sent = 0
    send_errors = 0
    errors = {}
    sending_done = [False]

    def drain(until):
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            r, _, _ = select.select([s], [], [], left)
            if not r:
                return
            while True:
                try:
                    data, src = s.recvfrom(2048)
                except BlockingIOError:
                    break
                except OSError:
                    # ICMP errors (port/host unreachable) surface here on a UDP socket.
                    break
                stats.add(data, src)
            if a.expect is not None and len(stats.seen) >= a.expect and sending_done[0]:
                return

    if a.ready:
        with open(a.ready, "w") as f:
            f.write(f"{os.getpid()}\n")
    late_ms = 0
    if a.go:
        deadline = time.monotonic() + 60
        while not os.path.exists(a.go) and time.monotonic() < deadline:
            drain(time.monotonic() + 0.005)
        if not os.path.exists(a.go):
            ap.error(f"{a.go} did not appear within 60 s")
    if a.start_at is not None:
        wait = a.start_at - time.time()
        late_ms = max(0, int(-wait * 1000))
        if wait > 0:
            drain(time.monotonic() + min(wait, 30))
    if a.delay > 0:
        drain(time.monotonic() + a.delay)
    to = a.to
    if a.reply:
        deadline = time.monotonic() + a.wait
        while stats.first_from is None and time.monotonic() < deadline:
            drain(min(deadline, time.monotonic() + 0.05))
        if stats.first_from is not None:
            host, _, port = stats.first_from.rpartition(":")
            to = (host, int(port))
    interval = 1.0 / a.rate
    start = time.monotonic()
    for i in range(a.count if to is not None else 0):
        try:
            s.sendto(packet(seq0 + i, ts0 + 160 * i, ssrc, i == 0), to)
            sent += 1
        except OSError as e:
            send_errors += 1
            errors[os.strerror(e.errno) if e.errno else str(e)] = 1
        drain(start + (i + 1) * interval)
    sending_done[0] = True
    drain(time.monotonic() + a.linger)
    unique = len(stats.seen)
    out = {
        "label": a.label,
        "local": f"{a.bind[0]}:{a.bind[1]}",
        "to": f"{to[0]}:{to[1]}" if to is not None else None,
        "ssrc": f"{ssrc:#010x}",
        "sent": sent,
        "send_errors": send_errors,
        "send_error_kinds": sorted(errors),
        "received": stats.received,
        "invalid": stats.invalid,
        "sources": stats.sources,
        "ssrcs": stats.ssrcs,
        "unique": unique,
        "duplicates": stats.duplicates,
        "reordered": stats.reordered,
        "first_from": stats.first_from,
        # How late this end began against --start-at (a busy machine): the other end's
        # first packets may have arrived before this socket existed.
        "late_ms": late_ms,
    }
    if a.expect is not None:
        out["lost"] = max(a.expect - unique, 0)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
