#!/usr/bin/env python3
"""What deleting one device's week costs in a store of 30 days.

The city workload (`citytsdb gen`, default 2,500 devices x 30 days) is written to a
server, flushed and compacted (the days settled, as in a store that has lived).
Then, for several devices in turn, one week of that device's covers is deleted:

    DELETE FROM manhole WHERE device = 'mh-NNNNN'
        AND time >= '<day d>' AND time < '<day d + 7>'

and the benchmark reports, per delete, the time to the answer, the rows deleted,
the bytes the store grew by (catalog records, series-registry corrections) and
whether any Parquet file changed (none may: a delete masks rows). Then the same
deletes in DuckDB, over a DuckDB table loaded from the same segments, as the peer
(a ratio, DuckDB / citytsdb). Last, the one-device-day query before and after the
deletes (masked rows must not make reads dearer) and the compaction that drops
them.

    python3 benches/delete_bench.py [--bin PATH] [--devices N] [--days D]
        [--deletes K] [--workdir DIR] [--reuse-data] [--markdown FILE]

Needs Python 3.11 with `duckdb` (tests/requirements.txt).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import city_bench as cb  # noqa: E402
import lived_bench as lb  # noqa: E402

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parquet_state(store: Path) -> dict[str, tuple[int, int]]:
    """Every Parquet file of the store with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*.parquet")}


def sql_ok(client, sql: str) -> list[dict]:
    status, body = cb.city_sql(client, sql)
    if status != 200:
        raise RuntimeError(f"{sql}: {status} {body[:300]!r}")
    return cb.city_rows(body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--devices", type=int, default=2_500)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--deletes", type=int, default=7)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--reuse-data", action="store_true")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if args.bin is None:
        rel = cb.REPO / "target" / "release" / "citytsdb"
        args.bin = rel if rel.exists() else cb.REPO / "target" / "debug" / "citytsdb"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="delete-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.flush_every = 0
    lp = lb.gen_lines(args, work)
    data = work / "store"
    shutil.rmtree(data, ignore_errors=True)

    log("writing")
    srv, port, _ = cb.start_citytsdb(args.bin, data, work / "server.log",
                                     ["--flush-rows", "1000000000", "--flush-interval", "3600s"])
    lines = 0
    for body, n in lb.bodies(lp, 5000):
        status, answer, _ = lb.post(port, f"/api/v1/write?db={cb.DB}&precision=s", body)
        if status != 204:
            raise RuntimeError(f"write answered {status}: {answer[:300]!r}")
        lines += n
    for path in ("/api/v1/flush", "/api/v1/compact"):
        status, answer, secs = lb.post(port, path)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}")
        log(f"{path}: {secs:.1f} s")
    client = cb.Client(port, keepalive=True)
    store = data / "store"
    rows_total = int(sql_ok(client, "SELECT count(*) AS n FROM manhole")[0]["n"])
    devices = [r["device"] for r in sql_ok(client, "SELECT DISTINCT device FROM manhole ORDER BY device")]
    rng = random.Random(11)
    chosen = rng.sample(devices, min(args.deletes, len(devices)))
    day = lambda d: (START + dt.timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ")
    first_day = [rng.randrange(0, max(1, args.days - 7)) for _ in chosen]

    def device_day(device: str) -> float:
        sql = (f"SELECT time, tilt_deg, water_level_cm FROM manhole WHERE device = '{device}' "
               f"AND time >= '{day(first_day[0] + 2)}' AND time < '{day(first_day[0] + 3)}' ORDER BY time")
        times = []
        for i in range(12):
            t = time.perf_counter()
            sql_ok(client, sql)
            if i >= 2:
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    # A device whose rows stay, read in a week where the deletes masked rows.
    reader = next(x for x in devices if x not in chosen)
    before_read = device_day(reader)
    results = []
    for device, d in zip(chosen, first_day):
        sql = (f"DELETE FROM manhole WHERE device = '{device}' "
               f"AND time >= '{day(d)}' AND time < '{day(d + 7)}'")
        parquet_before = parquet_state(store)
        bytes_before = cb.dir_bytes(store)
        t = time.perf_counter()
        status, body, _ = lb.post(port, "/api/v1/query",
                                  json.dumps({"db": cb.DB, "sql": sql}).encode())
        secs = time.perf_counter() - t
        if status != 200:
            raise RuntimeError(f"{sql}: {status} {body[:300]!r}")
        deleted = json.loads(body)["deleted"]
        if deleted == 0:
            raise RuntimeError(f"{sql}: deleted nothing (is the data complete? try without --reuse-data)")
        results.append({
            "device": device, "secs": secs, "deleted": deleted,
            "grew": cb.dir_bytes(store) - bytes_before,
            "parquet_touched": parquet_state(store) != parquet_before,
        })
        log(f"{device}: {deleted} rows in {secs * 1000:.1f} ms")
    after_read = device_day(reader)
    rows_after = int(sql_ok(client, "SELECT count(*) AS n FROM manhole")[0]["n"])
    status, answer, compact_secs = lb.post(port, "/api/v1/compact")
    if status != 200:
        raise RuntimeError(f"compact answered {status}: {answer[:300]!r}")
    files = [str(store / r["path"]) for r in sql_ok(
        client, "SELECT path FROM system.segments WHERE table_name = 'manhole'")]
    rows_compacted = int(sql_ok(client, "SELECT sum(rows) AS n FROM system.segments WHERE table_name = 'manhole'")[0]["n"])
    client.close()
    cb.stop(srv)

    log("DuckDB")
    import duckdb
    con = duckdb.connect(str(work / "duck.db"))
    con.execute("SET TimeZone = 'UTC'")
    con.execute("DROP TABLE IF EXISTS manhole")
    lst = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    con.execute(f"CREATE TABLE manhole AS SELECT * FROM read_parquet([{lst}])")
    con.execute("CHECKPOINT")
    duck = []
    # The same deletes, of other devices (the ones above are gone from these files).
    others = [x for x in devices if x not in chosen]
    for device, d in zip(rng.sample(others, len(chosen)), first_day):
        t = time.perf_counter()
        con.execute(f"DELETE FROM manhole WHERE device = '{device}' AND time >= TIMESTAMPTZ '{day(d)}' "
                    f"AND time < TIMESTAMPTZ '{day(d + 7)}'")
        con.execute("CHECKPOINT")
        duck.append(time.perf_counter() - t)
    con.close()

    p50 = lambda xs: sorted(xs)[len(xs) // 2]
    ours = [r["secs"] for r in results]
    rows = [
        ("manhole rows in the store", f"{rows_total:,}", ""),
        ("deletes (one device, 7 days each)", f"{len(results)}", ""),
        ("rows deleted per delete (p50)", f"{p50([r['deleted'] for r in results]):,}", ""),
        ("time to the answer, p50 / max", f"{p50(ours) * 1000:.1f} / {max(ours) * 1000:.1f} ms",
         f"DuckDB (DELETE + CHECKPOINT) p50 {p50(duck) * 1000:.1f} ms: DuckDB / citytsdb {p50(duck) / p50(ours):.2f}"),
        ("store bytes added per delete (p50)", cb.fmt_bytes(p50([r['grew'] for r in results])), "catalog record, registry correction"),
        ("Parquet files changed by the deletes", f"{sum(r['parquet_touched'] for r in results)}", "must be 0"),
        ("one device's day, before / after the deletes (p50)", f"{before_read * 1000:.2f} / {after_read * 1000:.2f} ms", ""),
        ("rows after the deletes", f"{rows_after:,}", f"{rows_total - rows_after:,} fewer"),
        ("compaction after the deletes", f"{compact_secs:.1f} s", f"stored rows then: {rows_compacted:,}"),
    ]
    head = (f"delete_bench: {args.devices:,} devices x {args.days} days; {cb.profile_of(args.bin)}; "
            f"{cb.cpu_model()}; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    text = head + "\n\n| what | value | note |\n| --- | ---: | --- |\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    bad = sum(r["parquet_touched"] for r in results)
    if bad or rows_compacted != rows_after:
        print("FAILED: a delete touched a Parquet file or compaction kept deleted rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
