#!/usr/bin/env python3
"""A store that has lived against the same rows loaded in one go.

A city's store is written all day, every day, and flushed every minute. This
benchmark writes the city workload (`citytsdb gen`, default 10,000 devices x 10
days, four tables) to two servers:

- lived: in time order, with a flush after every few thousand rows per table
  (`--flush-every` lines, a thousand and more flushes), background compaction on;
- bulk: the same lines, then one flush.

It then reports, side by side and as ratios (lived / bulk): segments, catalog,
series-registry and store bytes, the time of each flush in the first and the last
tenth of the run, the restart time (start to the first correct answer), and two
queries, p50 over repeated runs: one device's day and the district-by-hour
averages over all the data, the latter also run by DuckDB over the lived store's
own Parquet files as a peer.

Targets (DESIGN.md): queries and restart within 1.2x of bulk, disk within 1.2x,
flush time in the last tenth within 1.5x of the first.

    python3 benches/lived_bench.py [--bin PATH] [--devices N] [--days D]
        [--flush-every LINES] [--runs N] [--quick] [--markdown FILE] [--workdir DIR]
        [--no-compact-endpoint] [--server-arg=ARG ...]

`--no-compact-endpoint` measures a binary without `POST /api/v1/compact` (the code
before compaction existed) as it is. Needs Python 3.11 with `duckdb`
(tests/requirements.txt).
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
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import city_bench as cb  # noqa: E402  (the shared process, HTTP and formatting helpers)

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
TABLES = ("manhole", "parking", "traffic", "sewage")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gen_lines(args, work: Path) -> Path:
    path = work / "city.lp"
    if path.exists() and path.stat().st_size > 0 and args.reuse_data:
        return path
    log(f"generating {args.devices:,} devices x {args.days} days")
    with open(path, "wb") as out:
        subprocess.run([str(args.bin), "gen", "--devices", str(args.devices), "--days", str(args.days),
                        "--start", START.strftime("%Y-%m-%dT%H:%M:%SZ"), "--seed", "1"],
                       stdout=out, check=True)
    return path


def bodies(path: Path, lines_per_body: int):
    buf: list[bytes] = []
    with open(path, "rb") as f:
        for line in f:
            buf.append(line)
            if len(buf) == lines_per_body:
                yield b"".join(buf), len(buf)
                buf = []
    if buf:
        yield b"".join(buf), len(buf)


def post(port: int, path: str, body: bytes | None = None, timeout: float = 3600) -> tuple[int, bytes, float]:
    t = time.perf_counter()
    status, out = cb.http_call(port, "POST", path, body=body, timeout=timeout)
    return status, out, time.perf_counter() - t


def write_store(args, lp: Path, data: Path, name: str, lived: bool) -> dict:
    extra = ["--flush-rows", "1000000000", "--flush-interval", "3600s", *args.server_arg]
    if lived and not args.no_compact_endpoint:
        extra += ["--compaction-settle", args.settle]
    srv, port, _ = cb.start_citytsdb(args.bin, data, data.parent / f"{name}.log", extra)
    out: dict = {"flushes": []}
    written = since_flush = 0
    t0 = time.perf_counter()
    for body, n in bodies(lp, 5000):
        status, answer, _ = post(port, f"/api/v1/write?db={cb.DB}&precision=s", body)
        if status != 204:
            raise RuntimeError(f"{name}: write answered {status}: {answer[:300]!r}")
        written += n
        since_flush += n
        if lived and since_flush >= args.flush_every:
            status, answer, secs = post(port, "/api/v1/flush")
            if status != 200:
                raise RuntimeError(f"{name}: flush answered {status}: {answer[:300]!r}")
            out["flushes"].append(secs)
            since_flush = 0
    status, answer, secs = post(port, "/api/v1/flush")
    if status != 200:
        raise RuntimeError(f"{name}: flush answered {status}: {answer[:300]!r}")
    out["flushes"].append(secs)
    out["write_secs"] = time.perf_counter() - t0
    out["lines"] = written
    client = cb.Client(port)
    out["segments_before_compact"] = segments(client)
    if lived and not args.no_compact_endpoint:
        # Background compaction has been running all along; this folds what was
        # still settling when the writes stopped.
        status, answer, secs = post(port, "/api/v1/compact")
        if status != 200:
            raise RuntimeError(f"{name}: compact answered {status}: {answer[:300]!r}")
        out["compact"] = json.loads(answer)
        out["compact_secs"] = secs
    out["segments"] = segments(client)
    store = data / "store"
    out["store_bytes"] = cb.dir_bytes(store)
    out["catalog_bytes"] = cb.dir_bytes(store / "catalog")
    out["series_bytes"] = cb.dir_bytes(store / "series")
    out["wal_bytes"] = cb.dir_bytes(data / "wal")
    client.close()
    cb.stop(srv)
    return out


def segments(client) -> int:
    status, body = cb.city_sql(client, "SELECT count(*) AS n FROM system.segments")
    if status != 200:
        raise RuntimeError(f"system.segments answered {status}: {body[:300]!r}")
    return int(cb.city_rows(body)[0]["n"])


def queries(args) -> dict:
    rng = random.Random(7)
    day = lambda d: (START + dt.timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ")
    devices = [rng.randrange(0, args.devices) for _ in range(args.runs + 2)]
    days = [rng.randrange(0, args.days) for _ in range(args.runs + 2)]
    one = [
        f"SELECT time, tilt_deg, water_level_cm FROM manhole WHERE device = 'mh-{min(5 * (1 + d // 5), 5 * (args.devices // 5)):05d}' "
        f"AND time >= '{day(x)}' AND time < '{day(x + 1)}' ORDER BY time"
        for d, x in zip(devices, days)
    ]
    hourly = ("SELECT district, date_bin(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS level "
              "FROM manhole GROUP BY district, hour ORDER BY level DESC LIMIT 10")
    return {"device_day": one, "district_hour": [hourly] * (args.runs + 2)}


def measure(args, work: Path, qs: dict) -> tuple[dict, dict]:
    """Each store's restart time (started alone), then the queries' times with both
    servers up, each query run on one store then the other (who goes first
    alternates), so a noisy neighbour on the machine weighs on both alike."""
    servers, out = {}, {}
    for name in ("lived", "bulk"):
        data = work / name
        srv, port, t_spawn = cb.start_citytsdb(args.bin, data, data.parent / f"{name}.restart.log",
                                               ["--flush-interval", "3600s", *args.server_arg])
        client = cb.Client(port, keepalive=True)
        status, body = cb.city_sql(client, "SELECT count(*) AS n FROM manhole")
        if status != 200:
            raise RuntimeError(f"{name}: count answered {status}: {body[:300]!r}")
        out[name] = {"restart_secs": time.perf_counter() - t_spawn, "rows": int(cb.city_rows(body)[0]["n"])}
        servers[name] = (srv, client)
    for key, sqls in qs.items():
        for name in servers:
            out[name][key] = []
        for i, sql in enumerate(sqls):
            order = ("lived", "bulk") if i % 2 == 0 else ("bulk", "lived")
            for name in order:
                client = servers[name][1]
                t = time.perf_counter()
                status, body = cb.city_sql(client, sql)
                if status != 200:
                    raise RuntimeError(f"{name} {key}: {status} {body[:300]!r}")
                if i >= 2:  # two warm-ups
                    out[name][key].append(time.perf_counter() - t)
                out[name][key + "_answer"] = body
        for name in servers:
            out[name][key].sort()
    for name, (srv, client) in servers.items():
        status, body = cb.city_sql(client, "SELECT path FROM system.segments WHERE table_name = 'manhole'")
        store = work / name / "store"
        out[name]["manhole_files"] = [str(store / r["path"]) for r in cb.city_rows(body)] if status == 200 else []
        client.close()
        cb.stop(srv)
    return out["lived"], out["bulk"]


def same_answer(a: bytes, b: bytes) -> bool:
    """Equal answers, floats within 1e-9 relative (sums in another order differ in
    the last bits)."""
    ra, rb = cb.city_rows(a), cb.city_rows(b)
    if len(ra) != len(rb):
        return False
    for x, y in zip(ra, rb):
        if x.keys() != y.keys():
            return False
        for k in x:
            u, v = x[k], y[k]
            if isinstance(u, float) and isinstance(v, float):
                if abs(u - v) > 1e-9 * max(1.0, abs(u), abs(v)):
                    return False
            elif u != v:
                return False
    return True


def duck(files: list[str], qs: dict) -> dict:
    import duckdb
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    lst = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    con.execute(f"CREATE VIEW manhole AS SELECT * FROM read_parquet([{lst}])")
    times = []
    sql = qs["district_hour"][0].replace("date_bin(", "time_bucket(")
    for i in range(len(qs["district_hour"])):
        t = time.perf_counter()
        con.execute(sql).fetchall()
        if i >= 2:
            times.append(time.perf_counter() - t)
    times.sort()
    return {"district_hour": times}


def tenth(xs: list[float], last: bool) -> float:
    k = max(1, len(xs) // 10)
    part = sorted(xs[-k:] if last else xs[:k])
    return part[len(part) // 2]


def report(args, lived: dict, bulk: dict, ml: dict, mb: dict, dk: dict) -> str:
    p50 = lambda xs: xs[len(xs) // 2] if xs else float("nan")
    rows = [
        ("lines written", f"{lived['lines']:,}", f"{bulk['lines']:,}", ""),
        ("flushes", f"{len(lived['flushes']):,}", f"{len(bulk['flushes']):,}", ""),
        ("segments before POST /compact", f"{lived['segments_before_compact']:,}",
         f"{bulk['segments_before_compact']:,}", ""),
        ("segments", f"{lived['segments']:,}", f"{bulk['segments']:,}", ""),
        ("store bytes", cb.fmt_bytes(lived["store_bytes"]), cb.fmt_bytes(bulk["store_bytes"]),
         f"{lived['store_bytes'] / bulk['store_bytes']:.2f}x (target <= 1.2x)"),
        ("catalog bytes", cb.fmt_bytes(lived["catalog_bytes"]), cb.fmt_bytes(bulk["catalog_bytes"]), ""),
        ("series registry bytes", cb.fmt_bytes(lived["series_bytes"]), cb.fmt_bytes(bulk["series_bytes"]), ""),
        ("flush, first tenth (p50)", cb.fmt_ms(tenth(lived["flushes"], False) * 1000) + " ms", "", ""),
        ("flush, last tenth (p50)", cb.fmt_ms(tenth(lived["flushes"], True) * 1000) + " ms", "",
         f"{tenth(lived['flushes'], True) / tenth(lived['flushes'], False):.2f}x of the first (target <= 1.5x)"),
        ("restart to first answer", f"{ml['restart_secs']:.2f} s", f"{mb['restart_secs']:.2f} s",
         f"{ml['restart_secs'] / mb['restart_secs']:.2f}x (target <= 1.2x)"),
    ]
    for key in ("device_day", "district_hour"):
        a, b = p50(ml[key]), p50(mb[key])
        rows.append((f"{key} p50", cb.fmt_ms(a * 1000) + " ms", cb.fmt_ms(b * 1000) + " ms",
                     f"{a / b:.2f}x (target <= 1.2x)"))
    d = p50(dk["district_hour"])
    rows.append(("district_hour p50, DuckDB over the lived Parquet", cb.fmt_ms(d * 1000) + " ms", "",
                 f"DuckDB / citytsdb lived: {d / p50(ml['district_hour']):.2f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"| {'what':<{w[0]}} | {'lived':<{w[1]}} | {'bulk':<{w[2]}} | {'lived / bulk':<{w[3]}} |",
             f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 2)}:|{'-' * (w[2] + 2)}:|{'-' * (w[3] + 2)}|"]
    lines[1] = "| --- | ---: | ---: | --- |"
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    head = (f"lived_bench: {args.devices:,} devices x {args.days} days, flush every {args.flush_every:,} lines; "
            f"{cb.profile_of(args.bin)}; {cb.cpu_model()}; {os.cpu_count()} CPUs; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--flush-every", type=int, default=25_000, help="lines between flushes of the lived store")
    ap.add_argument("--settle", default="10s", help="--compaction-settle of the lived store")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="1,000 devices x 2 days")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--reuse-data", action="store_true", help="keep a generated city.lp in --workdir")
    ap.add_argument("--no-compact-endpoint", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="an extra `citytsdb serve` argument for both stores (repeatable), "
                         "e.g. --server-arg=--compaction-page-rows=4096")
    args = ap.parse_args()
    if args.quick:
        args.devices, args.days, args.flush_every, args.runs = 1000, 2, 2000, 10
    if args.bin is None:
        rel = cb.REPO / "target" / "release" / "citytsdb"
        args.bin = rel if rel.exists() else cb.REPO / "target" / "debug" / "citytsdb"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lived-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lp = gen_lines(args, work)
    results = {}
    for name, lived in (("lived", True), ("bulk", False)):
        data = work / name
        shutil.rmtree(data, ignore_errors=True)
        log(f"{name}: writing")
        results[name] = write_store(args, lp, data, name, lived)
        log(f"{name}: {results[name]['segments']} segments, {results[name]['store_bytes']:,} bytes, "
            f"{len(results[name]['flushes'])} flushes, written in {results[name]['write_secs']:.0f} s")
    qs = queries(args)
    ml, mb = measure(args, work, qs)
    if ml["rows"] != mb["rows"]:
        raise RuntimeError(f"the stores disagree: {ml['rows']} rows lived, {mb['rows']} bulk")
    for key in qs:
        if not same_answer(ml[key + "_answer"], mb[key + "_answer"]):
            raise RuntimeError(f"{key}: the stores answer differently")
    dk = duck(ml["manhole_files"], qs)
    text = report(args, results["lived"], results["bulk"], ml, mb, dk)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
