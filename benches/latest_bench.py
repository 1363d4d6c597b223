#!/usr/bin/env python3
"""The latest reading of every device (q3 of benches/city_bench.py) against a running
server: four `DISTINCT ON` requests, one per table of the city workload, each on a
new connection as city_bench.py makes them; 5 warm-up rounds, then N timed.

    python3 benches/latest_bench.py PORT [ROUNDS]

The server must hold database `city` written by `citytsdb gen` (for example
`citytsdb gen --devices 10000 --days 1 > city.lp` and
`citytsdb import city.lp --db city --data-dir DIR`, then `citytsdb serve --data-dir DIR`).
"""
import http.client, urllib.parse, time, sys, statistics
port = int(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 50
COLS = {
    "manhole": "device, district, time, tilt_deg, water_level_cm, battery_pct, cover_open",
    "parking": "device, district, street, time, occupied, capacity",
    "traffic": "device, district, time, flow, speed_kmh",
    "sewage": "device, district, time, flow_lps, cod_mgl",
}
def get(sql, fmt="jsonl"):
    c = http.client.HTTPConnection("127.0.0.1", port)  # a new connection per request, as city_bench.py
    c.request("GET", "/api/v1/query?" + urllib.parse.urlencode({"db": "city", "sql": sql, "format": fmt}))
    r = c.getresponse(); body = r.read(); c.close()
    assert r.status == 200, body[:300]
    return body
qs = {t: f"SELECT DISTINCT ON (device) {c} FROM {t} ORDER BY device, time DESC" for t, c in COLS.items()}
rows = {t: get(q).count(b"\n") for t, q in qs.items()}
for _ in range(5):
    for q in qs.values(): get(q)
per = {t: [] for t in qs}; total = []
for _ in range(n):
    t0 = time.perf_counter()
    for t, q in qs.items():
        a = time.perf_counter(); get(q); per[t].append(time.perf_counter() - a)
    total.append(time.perf_counter() - t0)
def pct(v, p): v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))] * 1e3
for t in qs: print(f"{t:8s} rows {rows[t]:5d}  p50 {pct(per[t], .5):6.2f} ms  p95 {pct(per[t], .95):6.2f} ms")
print(f"all four p50 {pct(total, .5):6.2f} ms  p95 {pct(total, .95):6.2f} ms")
