"""Helpers of the Python report writers of scripts/bench.sh (fastpath_report.py,
media_fastpath_report.py): medians that skip missing values, numbers shown as "–" when
missing, and replacing one marked section of perf/RESULTS.md. The markers are the ones
`portico-perf bench-report` uses (perf/src/results_doc.rs), so a refresh of one section
keeps all the others, whoever wrote them."""

import os
import statistics


def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def num(x, fmt):
    return "–" if x != x else format(x, fmt)


def write_section(out, name, body):
    """Puts `body` (starting with its `## ` heading) between the markers of section `name`
    in `out`, replacing what was there or appending; returns the section as written."""
    begin, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    section = begin + "\n" + body.rstrip("\n") + "\n" + end + "\n"
    text = ""
    if os.path.exists(out):
        with open(out) as f:
            text = f.read()
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        stop = text.find("\n", stop) + 1 if stop >= 0 else len(text)
        text = text[:start] + section + text[stop:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(out, "w") as f:
        f.write(text)
    return section
