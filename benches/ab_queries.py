#!/usr/bin/env python3
"""A/B of two citytsdb servers on copies of the same city store.

Sends the same queries to both over kept-alive HTTP connections, alternating
which server goes first each round, checks the answers are byte-identical, and
prints each query's p50 and the ratio new / old (below 1: the new server is
faster). Start the two servers first, e.g.

    citytsdb serve --data-dir storeA --http-bind 127.0.0.1:18080   # old build
    citytsdb serve --data-dir storeB --http-bind 127.0.0.1:18081   # new build
    python3 benches/ab_queries.py --old 18080 --new 18081 --rounds 5

The store is `citytsdb gen --devices 10000 --days N --start 2026-01-01T00:00:00Z`
imported with `--precision s`; `--day` picks q1's day (the default suits N = 7).
"""
import argparse
import datetime as dt
import http.client
import time
import urllib.parse

def queries(day: str) -> dict[str, str]:
    """The queries, with one device's day on `day` (YYYY-MM-DD) and the silent
    devices as of ten minutes before that day's end."""
    start = dt.date.fromisoformat(day)
    end = start + dt.timedelta(days=1)
    return {
        "top 10 covers by max tilt": "SELECT device, district, max(tilt_deg) AS tilt FROM manhole "
        "GROUP BY device, district ORDER BY tilt DESC, device LIMIT 10",
        "one device's day (q1)": "SELECT * FROM manhole WHERE device = 'mh-05001' "
        f"AND time >= '{start}T00:00:00Z' AND time < '{end}T00:00:00Z'",
        "district x hour (q2)": "SELECT date_bin(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS level "
        "FROM manhole WHERE district = '金水区' GROUP BY hour ORDER BY hour",
        "latest reading of every cover (q3, manhole)": "SELECT DISTINCT ON (device) device, district, time, "
        "tilt_deg, water_level_cm, battery_pct, cover_open FROM manhole ORDER BY device, time DESC",
        "silent devices (q5)": "SELECT device, district, last_time FROM system.devices "
        f"WHERE last_time < '{start}T23:50:00Z' ORDER BY device",
        "count and max of two float fields": "SELECT count(*), max(tilt_deg), max(water_level_cm) FROM manhole",
    }


def query(conn: http.client.HTTPConnection, db: str, sql: str) -> bytes:
    conn.request("GET", "/api/v1/query?" + urllib.parse.urlencode({"db": db, "sql": sql, "format": "jsonl"}))
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {body[:300]!r}")
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=int, required=True, help="port of the old build's server")
    ap.add_argument("--new", type=int, required=True, help="port of the new build's server")
    ap.add_argument("--db", default="city")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--day", default="2026-01-04", help="the day of q1 and the silent devices' cutoff")
    args = ap.parse_args()
    QUERIES = queries(args.day)
    conns = {p: http.client.HTTPConnection("127.0.0.1", p, timeout=60) for p in (args.old, args.new)}
    for name, sql in QUERIES.items():
        if query(conns[args.old], args.db, sql) != query(conns[args.new], args.db, sql):
            print(f"different answers: {name}")
    times = {name: {args.old: [], args.new: []} for name in QUERIES}
    for r in range(args.rounds):
        order = (args.old, args.new) if r % 2 == 0 else (args.new, args.old)
        for name, sql in QUERIES.items():
            for port in order:
                for _ in range(args.per_round):
                    t = time.perf_counter()
                    query(conns[port], args.db, sql)
                    times[name][port].append((time.perf_counter() - t) * 1000)
    print("| query | old p50 (ms) | new p50 (ms) | new / old |")
    print("| --- | ---: | ---: | ---: |")
    for name in QUERIES:
        old = sorted(times[name][args.old])[len(times[name][args.old]) // 2]
        new = sorted(times[name][args.new])[len(times[name][args.new]) // 2]
        print(f"| {name} | {old:.2f} | {new:.2f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
