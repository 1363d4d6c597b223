#!/usr/bin/env python3
"""Top 10 covers by max tilt: a running citytsdb over HTTP beside DuckDB in-process
over the same live Parquet files of the `manhole` table.

    python3 benches/top10_duck.py PORT STORE_DIR [ROUNDS]

STORE_DIR is the directory the segment paths of `system.segments` are relative
to (`<data-dir>/store` for the local store). Each round prints the p50 of 20
requests (a new connection each, as `city_bench.py` does) after 2 warm-ups, the
p50 of 20 DuckDB runs (2 threads), and DuckDB / citytsdb (above 1: citytsdb is
faster); the answers are compared at the end.
"""
import json
import statistics
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import duckdb

Q = ("SELECT device, district, max(tilt_deg) AS tilt FROM manhole "
     "GROUP BY device, district ORDER BY tilt DESC, device LIMIT 10")


def main() -> None:
    port, store = int(sys.argv[1]), Path(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3

    def http(sql: str) -> bytes:
        q = urllib.parse.urlencode({"db": "city", "sql": sql, "format": "jsonl"})
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{q}").read()

    rows = [json.loads(l) for l in http("SELECT table_name, path FROM system.segments").splitlines()]
    files = [str(store / r["path"]) for r in rows if r["table_name"] == "manhole"]
    con = duckdb.connect()
    con.execute("SET threads=2")
    con.execute(f"CREATE VIEW manhole AS SELECT * FROM read_parquet({files!r})")

    def p50(f) -> float:
        for _ in range(2):
            f()
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    for r in range(rounds):
        c = p50(lambda: http(Q))
        d = p50(lambda: con.execute(Q).fetchall())
        print(f"round {r}: citytsdb {c:.1f} ms, DuckDB (segments, 2 threads) {d:.1f} ms, "
              f"DuckDB / citytsdb {d / c:.2f}")
    ours = [tuple(json.loads(l).values()) for l in http(Q).splitlines()]
    duck = con.execute(Q).fetchall()
    same = [(a, b, round(float(x), 6)) for a, b, x in ours] == [(a, b, round(float(x), 6)) for a, b, x in duck]
    print(f"same answers: {same} ({len(files)} files)")


if __name__ == "__main__":
    main()
