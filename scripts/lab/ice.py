#!/usr/bin/env python3
"""ice.py: one ICE agent (RFC 8445, the aioice library) of a call between two namespaces of
the lab, as the reference's phones do it ("ICE", "Troubleshooting ICE"): it gathers host,
server-reflexive (STUN) and relayed (TURN) candidates, swaps them with the other agent
through files in --dir (the lab's stand-in for SDP), runs the connectivity checks, and if a
pair works sends 20 RTP packets over it and counts the other agent's. One JSON object on
stdout:

  {"role", "candidates": ["host ...", "srflx ...", "relay ..."], "connected": true|false,
   "conclusion": "SUCCESS"|"FAILED", "local": "TYPE IP:PORT", "remote": "TYPE IP:PORT",
   "local_type", "remote_type", "sent", "received", "error"}

Example (two namespaces, the same --dir):
  ip netns exec lab-phonea python3 ice.py --role controlling --dir /tmp/x \\
      --stun 198.18.0.10:3478 --turn 198.18.0.10:3478 --user alice --password secret
  ip netns exec lab-phonec python3 ice.py --role controlled --dir /tmp/x --stun 198.18.0.10:3478

Needs aioice (pip install aioice; scripts/test.sh installs it).
"""

import argparse
import asyncio
import json
import os
import struct
import sys
import time

try:
    import aioice
except ImportError:
    sys.exit("ice.py: the Python package aioice is missing (pip install aioice)")

PACKETS = 20


def addr(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT")
    return (host, int(port))


def describe(c):
    return f"{c.type} {c.host}:{c.port}"


def rtp(seq, ssrc):
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + bytes(160)


async def exchange(conn, ssrc, seconds):
    """Sends PACKETS RTP packets 20 ms apart while counting the other agent's."""
    got = set()

    async def receive():
        while len(got) < PACKETS:
            data = await conn.recv()
            if len(data) >= 12 and data[0] >> 6 == 2:
                (seq,) = struct.unpack_from("!H", data, 2)
                got.add(seq)

    rx = asyncio.ensure_future(receive())
    for seq in range(PACKETS):
        await conn.send(rtp(seq, ssrc))
        await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(rx, seconds)
    except asyncio.TimeoutError:
        pass
    return len(got)


async def run(a):
    kw = {}
    if a.stun:
        kw["stun_server"] = a.stun
    if a.turn:
        kw.update(turn_server=a.turn, turn_username=a.user, turn_password=a.password)
    controlling = a.role == "controlling"
    conn = aioice.Connection(ice_controlling=controlling, use_ipv6=False, **kw)
    out = {"role": a.role, "connected": False, "conclusion": "FAILED", "error": None}
    try:
        await asyncio.wait_for(conn.gather_candidates(), 10)
        out["candidates"] = [describe(c) for c in conn.local_candidates]
        mine = {
            "ufrag": conn.local_username,
            "pwd": conn.local_password,
            "candidates": [c.to_sdp() for c in conn.local_candidates],
        }
        path = os.path.join(a.dir, f"{a.role}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(mine, f)
        os.rename(path + ".tmp", path)
        other = os.path.join(a.dir, "controlled.json" if controlling else "controlling.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(other):
            if time.monotonic() > deadline:
                raise TimeoutError("the other agent's candidates did not come")
            await asyncio.sleep(0.02)
        with open(other) as f:
            peer = json.load(f)
        conn.remote_username = peer["ufrag"]
        conn.remote_password = peer["pwd"]
        for c in peer["candidates"]:
            await conn.add_remote_candidate(aioice.Candidate.from_sdp(c))
        await conn.add_remote_candidate(None)
        await asyncio.wait_for(conn.connect(), a.timeout)
        out["connected"] = True
        pair = conn._nominated.get(1)  # aioice has no public accessor for the selected pair
        if pair is not None:
            out["local"] = describe(pair.local_candidate)
            out["remote"] = describe(pair.remote_candidate)
            out["local_type"] = pair.local_candidate.type
            out["remote_type"] = pair.remote_candidate.type
        out["sent"] = PACKETS
        out["received"] = await exchange(conn, 0xA if controlling else 0xC, 5)
        out["conclusion"] = "SUCCESS" if out["received"] == PACKETS else "FAILED"
    except (ConnectionError, asyncio.TimeoutError, TimeoutError, OSError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            await asyncio.wait_for(conn.close(), 5)
        except Exception:  # closing a half-open agent: nothing more to report
            pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=("controlling", "controlled"), required=True)
    ap.add_argument("--dir", required=True, help="directory shared by both agents")
    ap.add_argument("--stun", type=addr, help="STUN server IP:PORT")
    ap.add_argument("--turn", type=addr, help="TURN server IP:PORT (UDP)")
    ap.add_argument("--user", default="")
    ap.add_argument("--password", default="")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds for the checks")
    a = ap.parse_args()
    if not 0 < a.timeout <= 60:
        ap.error("--timeout must be in (0, 60]")
    out = asyncio.run(run(a))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
