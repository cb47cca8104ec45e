"""Two aioice ICE agents connecting relay-to-relay through one TURN server.

Used by controlplane/tests/turn/aioice.rs. Each agent gathers only a relayed candidate
(TransportPolicy.RELAY) from the TURN server given on the command line, the candidates are
exchanged in-process (only type "relay" kept), the agents connect, and COUNT datagrams go
each way. Then one line `READY {json}` reports what happened (each agent's relayed address
and its TURN client socket's address, datagrams received) and the script waits for a line
on stdin before closing, so the test can look at the server's allocations meanwhile. The
test runs it under a time limit and kills it after that.

Arguments: HOST PORT TRANSPORT USER PASSWORD COUNT [CAFILE [TLS_PORT]], TRANSPORT one of
udp, tcp, tls, or A,B (agent a over A, agent b over B; tls then goes to localhost:TLS_PORT).
"""

import asyncio
import json
import socket
import ssl
import sys

import aioice


def client_socket(conn):
    """The local address and socket type of the agent's TURN client socket."""
    for protocol in conn._protocols:
        if protocol.local_candidate.type != "relay":
            continue
        inner = protocol.transport._TurnTransport__inner_protocol
        sock = inner.transport.get_extra_info("socket")
        kind = "stream" if sock.type == socket.SOCK_STREAM else "datagram"
        host, port = inner.transport.get_extra_info("sockname")[:2]
        tls = inner.transport.get_extra_info("ssl_object") is not None
        host = f"[{host}]" if ":" in host else host
        return {"addr": f"{host}:{port}", "socket": kind, "tls": tls}
    raise SystemExit("no relay protocol")


async def main():
    host, port, transport, user, password, count = sys.argv[1:7]
    port, count = int(port), int(count)
    cafile = sys.argv[7] if len(sys.argv) > 7 else None
    # "udp", "tcp", "tls", or "A,B": agent a over A, agent b over B, each "udp" or "tcp"
    # to HOST:PORT or "tls" to localhost:TLS_PORT (argument 8).
    kinds = transport.split(",") if "," in transport else [transport, transport]
    tls_port = int(sys.argv[8]) if len(sys.argv) > 8 else port

    def agent(controlling, kind):
        tls = None
        if kind == "tls":
            # The server's generated certificate is the only trust anchor; it names
            # "localhost", and the test connects by that name.
            tls = ssl.create_default_context(cafile=cafile)
        mixed = kind == "tls" and "," in transport
        return aioice.Connection(
            ice_controlling=controlling,
            components=1,
            turn_server=("localhost", tls_port) if mixed else (host, port),
            turn_username=user,
            turn_password=password,
            turn_transport="udp" if kind == "udp" else "tcp",
            turn_ssl=tls if tls is not None else False,
            use_ipv6=False,
            transport_policy=aioice.TransportPolicy.RELAY,
        )

    agents = [agent(True, kinds[0]), agent(False, kinds[1])]
    a, b = agents
    await asyncio.gather(a.gather_candidates(), b.gather_candidates())
    for me, other in ((a, b), (b, a)):
        relays = [c for c in me.local_candidates if c.type == "relay"]
        if not relays:
            raise SystemExit(f"no relay candidate: {me.local_candidates}")
        for c in relays:
            await other.add_remote_candidate(c)
        await other.add_remote_candidate(None)
        other.remote_username = me.local_username
        other.remote_password = me.local_password
    await asyncio.gather(a.connect(), b.connect())

    got = {"a": [], "b": []}

    async def receive(conn, name):
        while len(got[name]) < count:
            data, _component = await conn.recvfrom()
            got[name].append(data)

    receivers = [
        asyncio.ensure_future(receive(a, "a")),
        asyncio.ensure_future(receive(b, "b")),
    ]
    for i in range(count):
        await a.send(f"a->b {i:05d} ".encode() + b"x" * 100)
        await b.send(f"b->a {i:05d} ".encode() + b"y" * 200)
        await asyncio.sleep(0.005)
    try:
        await asyncio.wait_for(asyncio.gather(*receivers), timeout=10)
    except asyncio.TimeoutError:
        pass
    expect_b = [f"a->b {i:05d} ".encode() + b"x" * 100 for i in range(count)]
    expect_a = [f"b->a {i:05d} ".encode() + b"y" * 200 for i in range(count)]
    def describe(conn, received, expected):
        pair = conn._nominated.get(1)
        return {
            "candidates": [
                {"type": c.type, "addr": f"{c.host}:{c.port}"}
                for c in conn.local_candidates
            ],
            "client": client_socket(conn),
            "received": len(received),
            "intact": sorted(received) == expected,
            "pair": None
            if pair is None
            else {
                "local": f"{pair.local_candidate.host}:{pair.local_candidate.port}",
                "remote": f"{pair.remote_candidate.host}:{pair.remote_candidate.port}",
                "remote_type": pair.remote_candidate.type,
            },
        }

    report = {
        "a": describe(a, got["a"], expect_a),
        "b": describe(b, got["b"], expect_b),
    }
    print("READY " + json.dumps(report), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(a.close(), b.close())
    print("CLOSED", flush=True)


asyncio.run(main())
