"""Writes the media-fastpath section of perf/RESULTS.md from `scripts/bench.sh
media-fastpath`'s run reports (`portico-perf media --json`, Portico's /metrics)."""

import glob
import json
import os
import sys

from results_md import med, num, write_section

results, out = sys.argv[1], sys.argv[2]
runs = {}
for path in sorted(glob.glob(os.path.join(results, "*.json"))):
    name = os.path.basename(path)[:-5]
    server = name.split("__")[0][len("media-"):]
    with open(path) as f:
        v = json.load(f)
    c = v["cpu_s_per_million"]
    kern = ""
    mp = os.path.join(results, name + ".metrics")
    if os.path.exists(mp):
        with open(mp) as f:
            lines = f.read().splitlines()
        fp = sum(float(l.split()[-1]) for l in lines
                 if l.startswith("portico_fastpath_packets") and 'direction="media"' in l)
        mr = sum(float(l.split()[-1]) for l in lines if l.startswith("portico_media_relay_packets"))
        kern = f"{100 * fp / mr:.1f}%" if mr else ""
    runs.setdefault(server, []).append({
        "pps": v["relayed_pps"],
        "loss": v["lost"] / max(v["sent"], 1),
        "machine": c["machine"],
        "minus_gen": c["machine_minus_generator"],
        "cpus": c["server_cpus"] if c["server_cpus"] is not None else float("nan"),
        "proc": c["server_process"],
        "rss": (v["rss_kib"][1] - v["rss_kib"][0]) / 1024 * 1000 / max(v["sessions"], 1),
        "kern": kern,
    })


env = os.environ
lines = [
    "## Media relay kernel fast path: fast path vs user-space media relay vs rtpengine", "",
    "From the runs of the command below; rerun it to refresh this section.", "",
    "| | |", "|---|---|",
    f"| command | `{env['MFP_CMD']}` |",
    f"| runs | {env['MFP_FACTS']} |",
    f"| machine | {env['MFP_MACHINE']} |",
    "| topology | " + env["MFP_TOPO"].replace(
        "`portico-perf turn` in another (clients from 10.78.0.0/16, peers on 10.77.0.2)",
        "`portico-perf media` in another (endpoints on 10.77.0.2)") + " |",
    "| load | `portico-perf media` in the generator namespace: sessions created through "
    "Portico's REST API (or rtpengine's ng offer/answer) on 10.77.0.1, two endpoints per "
    "session on 10.77.0.2, RTP with a 12-byte header and 160-byte payload at 50 packets/s "
    "each way per session, sequence numbers checked |",
    f"| servers | Portico: {env['MFP_WORKERS']} io_uring workers, `turn.fast_path` on or off; "
    f"rtpengine: {env['MFP_RTPENGINE']}, userspace forwarding (`--table=-1`; its in-kernel "
    f"module needs a DKMS build against this kernel), {env['MFP_WORKERS']} threads |",
    "", "Median over the rounds; CPU-s per million relayed packets (each forwarded packet "
    "counts once); kernel share = `fastpath_packets{direction=\"media\"}` / "
    "`media_relay_packets` at the end of each run.", "",
    "| server | runs | relayed pkt/s | loss | machine | machine − generator | servers' CPU "
    "(pinned, softirq included) | server process | RSS MiB per 1000 sessions | kernel share |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for server in ["portico-fastpath", "portico", "rtpengine"]:
    r = runs.get(server)
    if not r:
        continue

    def g(k):
        return med([x[k] for x in r])

    kern = ", ".join(x["kern"] for x in r if x["kern"]) or "–"
    lines.append(
        f"| {server} | {len(r)} | {g('pps'):,.0f} | {100 * g('loss'):.3f}% | "
        f"{g('machine'):.2f} | {g('minus_gen'):.2f} | {num(g('cpus'), '.2f')} | "
        f"{g('proc'):.2f} | {g('rss'):.2f} | {kern} |")
lines.append("")
for ref in ["portico", "rtpengine"]:
    if "portico-fastpath" in runs and ref in runs:
        for k, what in [("minus_gen", "machine − generator CPU"), ("cpus", "servers' CPU")]:
            x = med([y[k] for y in runs["portico-fastpath"]])
            c = med([y[k] for y in runs[ref]])
            if x > 0 and c == c:
                lines.append(f"- portico-fastpath / {ref}, {what} per M packets: {c / x:.2f}× less")
lines.append("")
print(write_section(out, "media-fastpath", "\n".join(lines)))
