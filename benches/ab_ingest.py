#!/usr/bin/env python3
"""A/B of the write path of two citytsdb builds on the same city lines.

Generates `citytsdb gen --devices 10000 --days N` once (as `city_bench.py` does,
kept in `--lines`), then, alternating which build goes first each round, starts
each build on an empty data directory and writes every line with `precision=s`
from four writer processes (`city_bench.py`'s writers). Prints per run the rows
acknowledged per second, the server's CPU seconds (user + system, from /proc)
per row written, its peak resident memory, and the flushes and compactions it
ran meanwhile; then the median of each build and the ratio new / old (below 1
for CPU: the new build spends less per row).

    python3 benches/ab_ingest.py --old OLD_BIN --new NEW_BIN --days 7 --rounds 2

On two CPUs the writers share the machine with the server, so rows/s is what
the machine does with both; CPU per row is the server's alone.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import city_bench as cb  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return float("nan")


def run(bin_path: Path, work: Path, lines_per_body: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    srv, port, _ = cb.start_citytsdb(bin_path, work / "data", work / "server.log", [])
    try:
        c0 = cpu_seconds(srv.pid)
        ing = cb.ingest(port, f"/api/v1/write?db={cb.DB}&precision=s",
                        list(range(len(cb.BODIES))), 4)
        c1 = cpu_seconds(srv.pid)
        hwm = cb.vm_hwm_bytes(srv.pid)
        _, body = cb.http_call(port, "GET", "/metrics")
        text = body.decode(errors="replace")
    finally:
        cb.stop(srv)
    if ing["errors"]:
        raise RuntimeError(f"{bin_path}: {len(ing['errors'])} failed bodies: {ing['errors'][:3]}")
    return {
        "rows_per_s": ing["rows_per_s"],
        "us_per_row": (c1 - c0) / ing["acked_lines"] * 1e6,
        "cpu_s": c1 - c0,
        "hwm_mb": (hwm or 0) / 1e6,
        "flushes": metric(text, "citytsdb_flushes_total"),
        "flush_s": metric(text, "citytsdb_flush_seconds_total"),
        "compactions": metric(text, "citytsdb_compactions_total"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the old build's citytsdb binary")
    ap.add_argument("--new", type=Path, required=True, help="the new build's citytsdb binary")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lines-per-body", type=int, default=cb.LINES_PER_BODY)
    ap.add_argument("--workdir", type=Path, default=Path("ab_ingest_work"))
    ap.add_argument("--lines", type=Path, help="the generated lines (default WORKDIR/city-<days>d.lp)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    lp = args.lines or args.workdir / f"city-{args.days}d.lp"
    if not lp.exists():
        gen = [str(args.new), "gen", "--devices", "10000", "--days", str(args.days),
               "--start", cb.iso(cb.START), "--seed", str(cb.SEED)]
        with open(lp, "wb") as f:
            subprocess.run(gen, stdout=f, check=True, stdin=subprocess.DEVNULL)
    with open(lp, "rb") as f:
        cb.BODIES, cb.BODY_LINES, _, _ = cb.load_bodies(f, args.lines_per_body)
    print(f"{sum(cb.BODY_LINES):,} lines in {len(cb.BODIES)} bodies of {args.lines_per_body}; "
          f"{cb.cpu_model()}, load {cb.loadavg()}", flush=True)
    results: dict[str, list[dict]] = {"old": [], "new": []}
    print("| round | build | rows/s | server CPU s | us CPU / row | peak RSS MB | flushes | flush s | compactions |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for which in order:
            bin_path = args.old if which == "old" else args.new
            m = run(bin_path, args.workdir / "run", args.lines_per_body)
            results[which].append(m)
            print(f"| {r + 1} | {which} | {m['rows_per_s']:,.0f} | {m['cpu_s']:.1f} | {m['us_per_row']:.3f} | "
                  f"{m['hwm_mb']:.0f} | {m['flushes']:.0f} | {m['flush_s']:.1f} | {m['compactions']:.0f} |", flush=True)
    med = {w: {k: statistics.median(m[k] for m in ms) for k in ("rows_per_s", "us_per_row")}
           for w, ms in results.items()}
    print()
    print("| median | old | new | new / old |")
    print("| --- | ---: | ---: | ---: |")
    for k, label in (("rows_per_s", "rows/s"), ("us_per_row", "us server CPU per row")):
        print(f"| {label} | {med['old'][k]:,.3f} | {med['new'][k]:,.3f} | {med['new'][k] / med['old'][k]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
