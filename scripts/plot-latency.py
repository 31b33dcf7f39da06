#!/usr/bin/env python3
"""Latency against offered load, from `citadel-bench --rate R --csv FILE` rows.

    scripts/plot-latency.py SWEEP.csv [OUT.png] [NOTE]   # default OUT: docs/latency-vs-load.png

NOTE, if given, is added to the title (say where and how the figures were taken).

Plots p50, p99 and p99.9 (ms, log scale) against the offered rate of every open-loop row
(mode=open), and the achieved throughput on a second axis, so the knee where the server
stops keeping up is visible. Run it through scripts/bench.sh, which puts matplotlib
(pinned below) in a venv under ~/.cache/citadel, or with any Python that has matplotlib.
"""
import csv
import sys

MATPLOTLIB_VERSION = "3.11.2"  # scripts/bench.sh installs exactly this


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 2
    src = argv[1]
    out = argv[2] if len(argv) > 2 else "docs/latency-vs-load.png"
    note = argv[3] if len(argv) > 3 else ""
    try:
        with open(src, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("mode") == "open" and r.get("offered_per_sec")]
    except OSError as e:
        print(f"error: cannot read {src}: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"error: {src} has no open-loop rows (run `citadel-bench --rate R --csv {src}`)", file=sys.stderr)
        return 1
    rows.sort(key=lambda r: float(r["offered_per_sec"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [float(r["offered_per_sec"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for key, label, style in (("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s-"), ("p999_ms", "p99.9", "^--")):
        ax.plot(x, [float(r[key]) for r in rows], style, label=label)
    ax.axhline(5.0, color="grey", linestyle=":", linewidth=1)
    ax.text(x[0], 5.2, "target: p99 < 5 ms at 5,000/s", color="grey", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (certificates/s, open loop)")
    ax.set_ylabel("latency from due time (ms)")
    ax2 = ax.twinx()
    ax2.plot(x, [float(r["throughput_per_sec"]) for r in rows], "k.:", label="achieved/s")
    ax2.set_ylabel("achieved throughput (/s)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title("citadel CreateCertificate over TLS gRPC: latency vs offered load\n"
                 f"(P-256 CSRs, RS256 tokens, distinct per request; {rows[0]['connections']} connections)"
                 + (f"\n{note}" if note else ""),
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} ({len(rows)} rates)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
