"""Writes the fastpath section of perf/RESULTS.md from `scripts/bench.sh fastpath`'s run
reports (`portico-perf turn --json`, Portico's /metrics)."""

import glob
import json
import os
import sys

from results_md import med, num, write_section

results, out = sys.argv[1], sys.argv[2]
runs = {}
for path in sorted(glob.glob(os.path.join(results, "*.json"))):
    name = os.path.basename(path)[:-5]
    server = name.split("__")[0]
    kind = "flat" if "__flat__" in name else "sustained"
    with open(path) as f:
        v = json.load(f)
    d = v.get("data") or {}
    up, down = d.get("up", {}), d.get("down", {})
    relayed = up.get("received", 0) + down.get("received", 0)
    m = relayed / 1e6 if relayed else float("nan")
    machine = v["machine_busy_cpu_s"]
    gen = v["generator_cpu_s"]
    su = v.get("server_usage") or {}
    cpus = v.get("server_cpus_busy_s")
    kern = ""
    mp = os.path.join(results, name + ".metrics")
    if os.path.exists(mp):
        fp = sum(float(l.split()[-1]) for l in open(mp) if l.startswith("portico_fastpath_packets"))
        rp = sum(float(l.split()[-1]) for l in open(mp) if l.startswith("portico_relay_packets"))
        kern = f"{100 * fp / rp:.1f}%" if rp else ""
    runs.setdefault((kind, server), []).append({
        "pps": d.get("relayed_pps", 0),
        "loss": d.get("round_trip_loss_ratio", float("nan")),
        "p99": max(up.get("latency_us", {}).get("p99", 0), down.get("latency_us", {}).get("p99", 0)),
        "machine": machine / m,
        "minus_gen": (machine - gen) / m,
        # The servers' CPU (FP_TOPOLOGY=veth on 2+ cores): busy time of the CPU the servers
        # and their veth end's receive work are pinned to, softirq included.
        "cpus": cpus / m if cpus is not None else float("nan"),
        "server": su.get("cpu_s_per_million_relayed") or float("nan"),
        # Generator and server processes together: without IRQ time accounting the softirq
        # work done in a process's context (on `lo`, a send's whole receive side) is charged
        # to that process, so this sum holds the whole relay on `lo`.
        "procs": (gen + su.get("cpu_s", float("nan"))) / m,
        "gen": v.get("generator_cpu_us_per_packet") or float("nan"),
        "others": v.get("others_cpu_s", 0) / v["window_s"] if v.get("window_s") else 0,
        "kern": kern,
    })

lines = ["## TURN kernel fast path: fast path vs user-space relay vs coturn", "",
         "From the runs of the command below; rerun it to refresh this section.", "",
         "| | |", "|---|---|",
         f"| command | `{os.environ['FP_CMD']}` |",
         f"| runs | {os.environ['FP_FACTS']} |",
         f"| machine | {os.environ['FP_MACHINE']} |",
         f"| topology | {os.environ['FP_TOPO']} |",
         f"| loads | {os.environ['FP_LOADS']} |",
         "", "Median over the rounds; CPU-s per million relayed packets (each way counts).", ""]
for kind, title in [("sustained", "Sustained"), ("flat", "Flat out")]:
    if not any(k == kind for k, _ in runs):
        continue
    lines += [f"**{title}.**", "",
              "| server | runs | relayed pkt/s | loss | p99 µs (worse direction) | machine | machine − generator | servers' CPU (pinned, softirq included) | generator + server processes | server processes | generator µs / pkt | others' CPU, cores | kernel share |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for server in ["portico-fastpath", "portico", "coturn", "turn-stub"]:
        r = runs.get((kind, server))
        if not r:
            continue
        g = lambda k: med([x[k] for x in r])
        kern = ", ".join(x["kern"] for x in r if x["kern"]) or "–"
        lines.append(f"| {server} | {len(r)} | {g('pps'):,.0f} | {100 * g('loss'):.3f}% | {g('p99'):.1f} | {g('machine'):.2f} | {g('minus_gen'):.2f} | {num(g('cpus'), '.2f')} | {g('procs'):.2f} | {g('server'):.2f} | {g('gen'):.2f} | {g('others'):.2f} | {kern} |")
    if (kind, "coturn") in runs:
        lines.append("")
        for k, what in [("minus_gen", "machine − generator CPU"), ("cpus", "servers' CPU"),
                        ("procs", "generator + server processes CPU")]:
            c = med([x[k] for x in runs[(kind, "coturn")]])
            for s in ["portico-fastpath", "portico"]:
                if (kind, s) in runs:
                    x = med([y[k] for y in runs[(kind, s)]])
                    if x > 0 and c == c:
                        lines.append(f"- {title.lower()}, {s} / coturn, {what} per M packets: {c / x:.2f}× less")
    lines.append("")
print(write_section(out, "fastpath", "\n".join(lines)))
