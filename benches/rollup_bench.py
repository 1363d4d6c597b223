#!/usr/bin/env python3
"""A year of hourly rollups of 10,000 covers, against the same questions over raw rows.

The covers of the city workload (`citytsdb gen --table manhole`, default 10,000
covers reporting every 15 minutes for 365 days) are streamed to a server and
flushed. Then the rollup

    {"name": "manhole_1h", "source": "manhole", "interval": "1h",
     "aggregates": {"water_level_cm": ["min", "max", "avg", "count"],
                    "tilt_deg": ["max"], "battery_pct": ["last"]}}

is defined and the backfill timed until the listing says it is materialised. Each
question is asked three ways, each p50 of several runs over a kept-alive HTTP
connection (citytsdb) or in-process (DuckDB):

- citytsdb over the rollup table,
- citytsdb over the raw rows (the same `GROUP BY date_bin(...)`),
- DuckDB over the raw Parquet files (the peer; `time_bucket` over the times as
  plain UTC timestamps, which DuckDB buckets far faster than `TIMESTAMPTZ`),

and every answer is checked against DuckDB's (same row count and values). Last, how
long a freshly written hour takes to be materialised (the rollup kept current).

    python3 benches/rollup_bench.py [--bin PATH] [--covers N] [--days D]
        [--interval 15m] [--workdir DIR] [--reuse-data] [--markdown FILE]

Needs Python 3.11 with `duckdb` (tests/requirements.txt).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import city_bench as cb  # noqa: E402
import lived_bench as lb  # noqa: E402

START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
ROLLUP = {
    "name": "manhole_1h",
    "source": "manhole",
    "interval": "1h",
    "aggregates": {
        "water_level_cm": ["min", "max", "avg", "count"],
        "tilt_deg": ["max"],
        "battery_pct": ["last"],
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sql_ok(client, sql: str) -> list[dict]:
    status, body = cb.city_sql(client, sql)
    if status != 200:
        raise RuntimeError(f"{sql}: {status} {body[:300]!r}")
    return cb.city_rows(body)


def stream_writes(args, port: int) -> int:
    """Streams the generator's lines to the server in bodies of about 4 MiB."""
    cmd = [str(args.bin), "gen", "--devices", str(args.covers * 5 // 2), "--days", str(args.days),
           "--interval", args.interval, "--table", "manhole",
           "--start", START.strftime("%Y-%m-%dT%H:%M:%SZ"), "--seed", "7"]
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    rest = b""
    lines = 0
    last_log = time.perf_counter()
    assert gen.stdout is not None
    while True:
        chunk = gen.stdout.read(4 << 20)
        if not chunk:
            break
        buf = rest + chunk
        cut = buf.rfind(b"\n") + 1
        body, rest = buf[:cut], buf[cut:]
        if not body:
            continue
        status, answer, _ = lb.post(port, f"/api/v1/write?db={cb.DB}&precision=s", body)
        if status != 204:
            raise RuntimeError(f"write answered {status}: {answer[:300]!r}")
        lines += body.count(b"\n")
        if time.perf_counter() - last_log > 30:
            log(f"{lines:,} lines written")
            last_log = time.perf_counter()
    if rest.strip():
        status, answer, _ = lb.post(port, f"/api/v1/write?db={cb.DB}&precision=s", rest)
        if status != 204:
            raise RuntimeError(f"write answered {status}: {answer[:300]!r}")
        lines += 1
    if gen.wait() != 0:
        raise RuntimeError("citytsdb gen failed")
    return lines


def questions(args) -> list[dict]:
    end = START + dt.timedelta(days=args.days)
    device = f"mh-{(args.covers * 5 // 2) // 2 // 5 * 5:05d}"  # a cover near the middle
    return [
        {
            "name": "one cover's year, hourly max level",
            "rollup": f"SELECT time, water_level_cm_max AS v FROM manhole_1h WHERE device = '{device}' ORDER BY time",
            "raw": ("SELECT date_bin(INTERVAL '1 hour', time) AS time, max(water_level_cm) AS v FROM manhole "
                    f"WHERE device = '{device}' GROUP BY 1 ORDER BY 1"),
            "duck": ("SELECT time_bucket(INTERVAL 1 hour, time::TIMESTAMP) AS time, max(water_level_cm) AS v FROM raw "
                     f"WHERE device = '{device}' GROUP BY 1 ORDER BY 1"),
        },
        {
            "name": "district x day over the year: max level, readings",
            "rollup": ("SELECT date_bin(INTERVAL '1 day', time) AS day, district, max(water_level_cm_max) AS top, "
                       "sum(water_level_cm_count) AS n FROM manhole_1h GROUP BY 1, 2 ORDER BY 1, 2"),
            "raw": ("SELECT date_bin(INTERVAL '1 day', time) AS day, district, max(water_level_cm) AS top, "
                    "count(water_level_cm) AS n FROM manhole GROUP BY 1, 2 ORDER BY 1, 2"),
            "duck": ("SELECT time_bucket(INTERVAL 1 day, time::TIMESTAMP) AS day, district, max(water_level_cm) AS top, "
                     "count(water_level_cm) AS n FROM raw GROUP BY 1, 2 ORDER BY 1, 2"),
        },
        {
            "name": "the city's hourly max tilt over the year",
            "rollup": "SELECT time, max(tilt_deg_max) AS tilt FROM manhole_1h GROUP BY 1 ORDER BY 1",
            "raw": ("SELECT date_bin(INTERVAL '1 hour', time) AS time, max(tilt_deg) AS tilt FROM manhole "
                    "GROUP BY 1 ORDER BY 1"),
            "duck": ("SELECT time_bucket(INTERVAL 1 hour, time::TIMESTAMP) AS time, max(tilt_deg) AS tilt FROM raw "
                     "GROUP BY 1 ORDER BY 1"),
        },
        {
            "name": "one district's last week, hourly mean level",
            "rollup": (f"SELECT time, sum(water_level_cm_avg * water_level_cm_count) / sum(water_level_cm_count) AS v "
                       f"FROM manhole_1h WHERE district = 'zhengdong' AND time >= '{cb.iso(end - dt.timedelta(days=7))}' "
                       "GROUP BY 1 ORDER BY 1"),
            "raw": ("SELECT date_bin(INTERVAL '1 hour', time) AS time, avg(water_level_cm) AS v FROM manhole "
                    f"WHERE district = 'zhengdong' AND time >= '{cb.iso(end - dt.timedelta(days=7))}' "
                    "GROUP BY 1 ORDER BY 1"),
            "duck": ("SELECT time_bucket(INTERVAL 1 hour, time::TIMESTAMP) AS time, avg(water_level_cm) AS v FROM raw "
                     f"WHERE district = 'zhengdong' AND time >= {cb.duck_ts(end - dt.timedelta(days=7))} "
                     "GROUP BY 1 ORDER BY 1"),
        },
    ]


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for i in range(runs + 1):
        t = time.perf_counter()
        out = fn()
        if i > 0:  # the first run warms caches
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return str(a) == str(b)


def same_answer(ours: list[dict], theirs: list[tuple]) -> bool:
    if len(ours) != len(theirs):
        return False
    for o, t in zip(ours, theirs):
        values = list(o.values())
        # Times: compare the numbers only (formats differ).
        for a, b in zip(values, t):
            if isinstance(b, dt.datetime):
                a = dt.datetime.fromisoformat(str(a).replace("Z", "+00:00"))
                b = b if b.tzinfo else b.replace(tzinfo=dt.timezone.utc)
                if a != b:
                    return False
            elif not close(a, b if not hasattr(b, "__float__") or isinstance(b, bool) else float(b)):
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--covers", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--interval", default="15m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--reuse-data", action="store_true")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--redefine", action="store_true",
                    help="with --reuse-data: drop the rollup and time its backfill again")
    ap.add_argument("--skip-questions", action="store_true", help="time the backfill and refresh only")
    args = ap.parse_args()
    if args.bin is None:
        rel = cb.REPO / "target" / "release" / "citytsdb"
        args.bin = rel if rel.exists() else cb.REPO / "target" / "debug" / "citytsdb"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rollup-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "store"
    extra = ["--flush-rows", "2000000", "--flush-interval", "3600s", "--rollup-interval", "1s",
             "--query-timeout", "600s", "--query-memory-limit", "4GiB"]
    R: dict = {}
    if not (args.reuse_data and (data / "store").exists()):
        shutil.rmtree(data, ignore_errors=True)
        srv, port, _ = cb.start_citytsdb(args.bin, data, work / "server.log", extra)
        log(f"writing {args.covers:,} covers x {args.days} days every {args.interval}")
        t = time.perf_counter()
        R["lines"] = stream_writes(args, port)
        R["write_secs"] = time.perf_counter() - t
        for path in ("/api/v1/flush", "/api/v1/compact"):
            status, answer, secs = lb.post(port, path)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}")
            R[path] = secs
            log(f"{path}: {secs:.1f} s")
        cb.stop(srv)
    srv, port, _ = cb.start_citytsdb(args.bin, data, work / "server.log", extra)
    client = cb.Client(port, keepalive=True)
    rollups = f"/api/v1/databases/{cb.DB}/rollups"
    if args.redefine:
        cb.http_call(port, "DELETE", f"{rollups}/manhole_1h")
    status, body = cb.http_call(port, "GET", f"{rollups}/manhole_1h")
    if status == 404:
        log("defining the rollup; backfilling")
        t = time.perf_counter()
        status, body, _ = lb.post(port, rollups, json.dumps(ROLLUP).encode())
        if status != 201:
            raise RuntimeError(f"defining the rollup answered {status}: {body[:300]!r}")
        while True:
            status, body = cb.http_call(port, "GET", f"{rollups}/manhole_1h")
            if json.loads(body)["materialised"]:
                break
            time.sleep(0.5)
        R["backfill_secs"] = time.perf_counter() - t
        log(f"backfilled in {R['backfill_secs']:.1f} s")
        status, answer, _ = lb.post(port, "/api/v1/flush")
        status, answer, _ = lb.post(port, "/api/v1/compact")
    raw_rows = int(sql_ok(client, "SELECT count(*) AS n FROM manhole")[0]["n"])
    rollup_rows = int(sql_ok(client, "SELECT count(*) AS n FROM manhole_1h")[0]["n"])
    sizes = {r["table_name"]: (int(r["bytes"]), int(r["n"])) for r in sql_ok(
        client, "SELECT table_name, sum(bytes) AS bytes, count(*) AS n FROM system.segments GROUP BY 1")}
    files = [str(data / "store" / r["path"]) for r in sql_ok(
        client, "SELECT path FROM system.segments WHERE table_name = 'manhole'")]

    qs = [] if args.skip_questions else questions(args)
    import duckdb
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    lst = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    con.execute(f"CREATE VIEW raw AS SELECT * FROM read_parquet([{lst}])")
    duck_threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    results = []
    for q in qs:
        log(q["name"])
        t_roll, a_roll = timed(lambda: sql_ok(client, q["rollup"]), args.runs)
        t_raw, a_raw = timed(lambda: sql_ok(client, q["raw"]), max(1, args.runs // 2))
        t_duck, a_duck = timed(lambda: con.execute(q["duck"]).fetchall(), max(1, args.runs // 2))
        ok = same_answer(a_roll, a_duck) and same_answer(a_raw, a_duck)
        results.append((q, t_roll, t_raw, t_duck, len(a_duck), ok))

    # Kept current: the next hour of every cover, then the time until materialised.
    end = START + dt.timedelta(days=args.days)
    gen = subprocess.run([str(args.bin), "gen", "--devices", str(args.covers * 5 // 2), "--days", "1",
                          "--interval", args.interval, "--table", "manhole",
                          "--start", cb.iso(end), "--seed", "7"], capture_output=True, check=True)
    hour_end = int(end.timestamp()) + 3600
    lines = [l for l in gen.stdout.splitlines() if int(l.rsplit(b" ", 1)[1]) < hour_end]
    status, answer, _ = lb.post(port, f"/api/v1/write?db={cb.DB}&precision=s", b"\n".join(lines))
    if status != 204:
        raise RuntimeError(f"write answered {status}: {answer[:300]!r}")
    R["hour_rows"] = len(lines)
    lb.post(port, "/api/v1/flush")
    t = time.perf_counter()
    while True:
        status, body = cb.http_call(port, "GET", f"{rollups}/manhole_1h")
        if json.loads(body)["materialised"]:
            break
        time.sleep(0.05)
    R["current_secs"] = time.perf_counter() - t
    client.close()
    cb.stop(srv)

    rows = [
        ("raw rows (covers x days x readings)", f"{raw_rows:,}",
         f"{cb.fmt_bytes(sizes.get('manhole', (0, 0))[0])} in {sizes.get('manhole', (0, 0))[1]} segments"),
        ("rollup rows (covers x hours)", f"{rollup_rows:,}",
         f"{cb.fmt_bytes(sizes.get('manhole_1h', (0, 0))[0])} in {sizes.get('manhole_1h', (0, 0))[1]} segments"),
    ]
    if "write_secs" in R:
        rows.append(("writing the raw rows", f"{R['write_secs']:.0f} s", f"{R['lines'] / R['write_secs']:,.0f} rows/s"))
    if "backfill_secs" in R:
        rows.append(("backfill of the rollup", f"{R['backfill_secs']:.0f} s",
                     f"{raw_rows / R['backfill_secs']:,.0f} raw rows/s"))
    rows.append(("the next hour of every cover, materialised after its flush", f"{R['current_secs'] * 1000:.0f} ms",
                 f"{R['hour_rows']:,} rows; refresher every 1 s"))
    table = []
    for q, t_roll, t_raw, t_duck, n, ok in results:
        table.append(f"| {q['name']} | {n:,} | {cb.fmt_ms(t_roll * 1000)} ms | {cb.fmt_ms(t_raw * 1000)} ms | "
                     f"{cb.fmt_ms(t_duck * 1000)} ms | "
                     f"{t_duck / t_roll:.1f}x | {t_raw / t_roll:.1f}x | {'yes' if ok else 'NO'} |")
    head = (f"rollup_bench: {args.covers:,} covers x {args.days} days every {args.interval}; {cb.profile_of(args.bin)}; "
            f"{cb.cpu_model()}; {os.cpu_count()} CPUs; DuckDB {duckdb.__version__} threads={duck_threads}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    text = (head + "\n\n| what | value | note |\n| --- | ---: | --- |\n"
            + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
            + "\n\n| question | answer rows | citytsdb rollup | citytsdb raw | DuckDB raw files | DuckDB / rollup "
              "| raw / rollup | same answer |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
            + "\n".join(table) + "\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    if not all(r[-1] for r in results):
        print("FAILED: an answer differs from DuckDB's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
