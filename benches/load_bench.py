#!/usr/bin/env python3
"""Under load: many concurrent writers, readers and alert rules, citytsdb against InfluxDB 1.x.

On 127.0.0.1, for each system in turn (citytsdb, then InfluxDB 1.x as the peer):

- a fresh server on a temporary data directory (citytsdb optionally with a small
  `--max-buffer-size`, to show back-pressure);
- citytsdb only: K alert rules over the written table (plain filters, which the fast
  path checks on every written batch, and aggregate threshold rules such as "tilt
  above 15 degrees for 1m", evaluated every 15 s), delivering to a small webhook
  receiver in this program that counts the notifications;
- W writer threads, each posting line-protocol batches of B lines of manhole covers
  (`device` and `district` tags; `tilt_deg`, `water_level_cm`, `battery_pct`,
  `cover_open` fields) for its own slice of the devices, timestamps in milliseconds
  near the wall clock and advancing by at least 1 ms per round of its devices, so
  every line is a new (series, time);
- R reader threads running, in turn, the queries a city asks: one device's last
  hour, one district's per-minute average water level over the last hour, and the
  latest reading of every device that reported in the last 10 minutes (SQL on
  citytsdb, the InfluxQL equivalents on InfluxDB);
- both for D seconds; every request has a timeout, and the loops stop by themselves.

A 503 with `Retry-After` is honoured (sleep, then the same batch again) and counted
as back-pressure, never as an error; any other non-2xx answer, an InfluxQL error in a
200 answer, a timeout or a broken connection is an error. The server's VmRSS is read
from /proc/PID/status every 0.5 s (VmHWM at the end). Afterwards the rows the server
holds (`count(*)`) must equal the acknowledged rows.

It prints one table: per system, rows/s written, write latency p50/p90/p99/max (one
acknowledged request, send to 204), query latency p50/p99, requests, 503s, errors,
peak RSS, and the ratio citytsdb / InfluxDB of each (for rows/s above 1 is better for
citytsdb, for latencies and memory below 1 is).

    python3 benches/load_bench.py [--binary PATH] [--writers W] [--readers R]
        [--rules K] [--batch B] [--seconds D] [--devices N] [--max-buffer-size SIZE]
        [--skip-influx] [--influxd PATH] [--timeout S] [--markdown FILE] [--workdir DIR]

Run by hand, not by CI. Python 3.11, standard library only; the InfluxDB column needs
Debian's `influxdb` package (/usr/bin/influxd). Every child process is killed when
the program ends, however it ends.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import city_bench as cb  # noqa: E402  (the shared process, HTTP and formatting helpers)

DB = "city"
DISTRICTS = ["金水区", "二七区", "中原区", "管城区", "惠济区", "high tech", "zhengdong", "airport"]
LOOSE_EVERY = 500  # every 500th cover is loose: tilted 20-25 degrees all the time
RETRY_AFTER_CAP = 5.0  # seconds; a Retry-After longer than this is shortened to it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lp_escape(tag: str) -> str:
    return tag.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def iso_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def device_name(i: int) -> str:
    return f"mh-{i:05d}"


def district_of(i: int) -> str:
    return DISTRICTS[i % len(DISTRICTS)]


# --------------------------------------------------------------------------- workload

def field_pools(seed: int) -> tuple[list[str], list[str]]:
    """Field sets of ordinary covers and of loose ones, made once so that building a
    batch costs little of the client's CPU."""
    rng = random.Random(seed)
    normal, loose = [], []
    for _ in range(4096):
        level = round(-150 + rng.uniform(-2, 2), 1)
        normal.append(f"tilt_deg={round(2 * rng.random(), 2)},water_level_cm={level},"
                      f"battery_pct={rng.randrange(80, 101)}i,cover_open=false")
        loose.append(f"tilt_deg={round(20 + 5 * rng.random(), 2)},water_level_cm={level},"
                     f"battery_pct={rng.randrange(80, 101)}i,cover_open=false")
    return normal, loose


class Batches:
    """One writer's batches: its devices in turn, each round of them one timestamp
    (ms), the next round at max(now, previous + 1 ms)."""

    def __init__(self, devices: list[int], batch: int, pools: tuple[list[str], list[str]], seed: int):
        self.prefix = [f"manhole,device={device_name(d)},district={lp_escape(district_of(d))} " for d in devices]
        self.fields = [pools[1] if d % LOOSE_EVERY == 7 else pools[0] for d in devices]
        self.batch = batch
        self.cursor = 0
        self.ts = int(time.time() * 1000)
        self.rng = random.Random(seed)

    def next(self) -> bytes:
        out = []
        n = len(self.prefix)
        k = self.rng.randrange(4096)
        for _ in range(self.batch):
            c = self.cursor
            out.append(f"{self.prefix[c]}{self.fields[c][(k + c) & 4095]} {self.ts}\n")
            c += 1
            if c == n:
                c = 0
                k = self.rng.randrange(4096)
                self.ts = max(int(time.time() * 1000), self.ts + 1)
            self.cursor = c
        return "".join(out).encode()


# --------------------------------------------------------------------------- systems

class System:
    name = ""
    write_path = ""

    def __init__(self, port: int, proc: subprocess.Popen):
        self.port, self.proc = port, proc

    def query_path(self, q: str) -> str:
        raise NotImplementedError

    def query_ok(self, status: int, body: bytes) -> str | None:
        """None when the answer is good, else what is wrong with it."""
        raise NotImplementedError


class City(System):
    name = "citytsdb"
    write_path = f"/api/v1/write?db={DB}&precision=ms"

    def query_path(self, q: str) -> str:
        return "/api/v1/query?" + urllib.parse.urlencode({"db": DB, "sql": q, "format": "jsonl"})

    def query_ok(self, status: int, body: bytes) -> str | None:
        return None if status == 200 else f"HTTP {status}: {body[:300]!r}"

    @staticmethod
    def queries(devices: int, rng: random.Random) -> tuple[str, str]:
        kind = rng.randrange(3)
        if kind == 0:
            d = device_name(rng.randrange(devices))
            return "device_last_hour", (f"SELECT time, tilt_deg, water_level_cm, battery_pct FROM manhole "
                                        f"WHERE device = {sql_str(d)} AND time > now() - INTERVAL '1 hour' ORDER BY time")
        if kind == 1:
            dist = rng.choice(DISTRICTS)
            return "district_minute_avg", (f"SELECT date_bin(INTERVAL '1 minute', time) AS minute, avg(water_level_cm) AS level, "
                                           f"max(tilt_deg) AS tilt FROM manhole WHERE district = {sql_str(dist)} "
                                           f"AND time > now() - INTERVAL '1 hour' GROUP BY minute ORDER BY minute")
        return "latest_per_device", ("SELECT DISTINCT ON (device) device, district, time, tilt_deg, water_level_cm "
                                     "FROM manhole WHERE time > now() - INTERVAL '10 minutes' ORDER BY device, time DESC")

    def count_where(self, where: str) -> tuple[int | None, str]:
        st, body = cb.http_call(self.port, "GET", self.query_path(f"SELECT count(*) AS n FROM manhole{where}"), timeout=600)
        if st != 200:
            return None, f"HTTP {st}: {body[:300]!r}"
        return int(cb.city_rows(body)[0]["n"]), ""

    def count(self, t_lo_ms: int, t_hi_ms: int, notes: list[str]) -> int:
        """count(*) of the table; if that one query fails, the sum over districts,
        and failing that over districts and 10-second slices of time (the failure
        is noted: it is a finding, not something to hide)."""
        n, err = self.count_where("")
        if n is not None:
            return n
        notes.append(f"SELECT count(*) FROM manhole failed: {err}")
        total = 0
        for dist in DISTRICTS:
            n, err = self.count_where(f" WHERE district = {sql_str(dist)}")
            if n is None:
                notes.append(f"count(*) of district {dist} failed too: {err[:200]}; counting by 10 s slices")
                for lo in range(t_lo_ms - t_lo_ms % 10_000, t_hi_ms + 1, 10_000):
                    n, err = self.count_where(f" WHERE district = {sql_str(dist)} AND time >= '{iso_ms(lo)}' "
                                              f"AND time < '{iso_ms(lo + 10_000)}'")
                    if n is None:
                        raise RuntimeError(f"count(*) of a 10 s slice answered {err}")
                    total += n
            else:
                total += n
        notes.append(f"counted as the sum over districts: {total:,}")
        return total


class Influx(System):
    name = "InfluxDB 1.x"
    write_path = f"/write?db={DB}&precision=ms"

    def query_path(self, q: str) -> str:
        return "/query?" + urllib.parse.urlencode({"db": DB, "q": q, "epoch": "ms"})

    def query_ok(self, status: int, body: bytes) -> str | None:
        if status != 200:
            return f"HTTP {status}: {body[:300]!r}"
        if b'"error"' in body:
            return f"InfluxQL error: {body[:300]!r}"
        return None

    @staticmethod
    def queries(devices: int, rng: random.Random) -> tuple[str, str]:
        kind = rng.randrange(3)
        if kind == 0:
            d = device_name(rng.randrange(devices))
            return "device_last_hour", (f"SELECT tilt_deg, water_level_cm, battery_pct FROM manhole "
                                        f"WHERE device = {sql_str(d)} AND time > now() - 1h")
        if kind == 1:
            dist = rng.choice(DISTRICTS)
            return "district_minute_avg", (f"SELECT mean(water_level_cm), max(tilt_deg) FROM manhole "
                                           f"WHERE district = {sql_str(dist)} AND time > now() - 1h "
                                           f"GROUP BY time(1m) fill(none)")
        return "latest_per_device", ("SELECT last(tilt_deg), last(water_level_cm) FROM manhole "
                                     "WHERE time > now() - 10m GROUP BY device")

    def count(self, t_lo_ms: int, t_hi_ms: int, notes: list[str]) -> int:
        st, body = cb.http_call(self.port, "GET", self.query_path("SELECT count(tilt_deg) FROM manhole"), timeout=600)
        if st != 200:
            raise RuntimeError(f"count answered {st}: {body[:300]!r}")
        rows = cb.influx_rows(body)
        return int(rows[0]["count"]) if rows else 0


# --------------------------------------------------------------------------- rules and webhook

class Receiver:
    """A webhook receiver on 127.0.0.1 that counts Alertmanager messages."""

    def __init__(self):
        self.lock = threading.Lock()
        self.posts = 0
        self.alerts = {"firing": 0, "resolved": 0}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                try:
                    msg = json.loads(body)
                    alerts = msg.get("alerts", [])
                except ValueError:
                    alerts = []
                with outer.lock:
                    outer.posts += 1
                    for a in alerts:
                        s = a.get("status", "?")
                        outer.alerts[s] = outer.alerts.get(s, 0) + 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def rule_bodies(k: int, webhook: str | None) -> list[dict]:
    """K rules over the manhole table, of four kinds in turn."""
    rules = []
    for i in range(k):
        dist = DISTRICTS[i % len(DISTRICTS)]
        kind = i % 4
        if kind == 0:  # plain filter: the fast path checks it on every written batch
            r = dict(name=f"cover-tilted-{i}", sql=f"SELECT device, district, tilt_deg FROM manhole WHERE tilt_deg > {15 + i % 5}",
                     every="15s", **{"for": "0s"}, severity="warning")
        elif kind == 1:  # "tilt > 15 for 1m", per district
            r = dict(name=f"cover-displaced-{i}",
                     sql=(f"SELECT device, district, max(tilt_deg) AS tilt FROM manhole WHERE district = {sql_str(dist)} "
                          f"AND time > now() - INTERVAL '2 minutes' GROUP BY device, district HAVING max(tilt_deg) > 15"),
                     every="15s", **{"for": "1m"}, severity="critical")
        elif kind == 2:  # water 20 cm below the road surface
            r = dict(name=f"water-high-{i}",
                     sql=(f"SELECT device, district, max(water_level_cm) AS level FROM manhole WHERE district = {sql_str(dist)} "
                          f"AND time > now() - INTERVAL '1 minute' GROUP BY device, district HAVING max(water_level_cm) > -20"),
                     every="15s", **{"for": "30s"}, severity="critical")
        else:  # device silent for 10 minutes
            r = dict(name=f"cover-silent-{i}",
                     sql=("SELECT device, district FROM system.devices WHERE table_name = 'manhole' "
                          f"AND district = {sql_str(dist)} AND last_time < now() - INTERVAL '10 minutes'"),
                     every="30s", **{"for": "0s"}, severity="warning")
        r.update(department="city-management", db=DB, labels={"bench": "load"},
                 annotations={"summary": "cover {{device}} in {{district}}"})
        if webhook:
            r["webhook"] = webhook
        rules.append(r)
    return rules


# --------------------------------------------------------------------------- load

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.write_lat: list[float] = []      # one acknowledged request: send -> 204
        self.ack_lat: list[float] = []        # first send -> 204, back-pressure waits included
        self.query_lat: dict[str, list[float]] = {}
        self.acked_rows = 0
        self.write_requests = 0
        self.query_requests = 0
        self.backpressure = 0
        self.errors: list[str] = []
        self.write_errors = 0
        self.query_errors = 0
        self.retry_after: set[str] = set()
        self.rows_in_doubt = 0                # rows of batches that timed out (may or may not be written)

    def error(self, kind: str, msg: str):
        with self.lock:
            if kind == "write":
                self.write_errors += 1
            else:
                self.query_errors += 1
            if len(self.errors) < 50:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {kind}: {msg}")


class Conn:
    """One kept-alive HTTP connection, reopened after a failure."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout, self.c = port, timeout, None

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        if self.c is None:
            self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.c.request(method, path, body=body, headers=headers or {})
            r = self.c.getresponse()
            data = r.read()
            if r.getheader("Connection", "").lower() == "close":
                self.close()
            return r.status, r.getheader("Retry-After"), data
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.c is not None:
            self.c.close()
            self.c = None


def writer(sys_: System, batches: Batches, lines: int, stop_at: float, give_up_at: float, timeout: float, st: Stats):
    conn = Conn(sys_.port, timeout)
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    while time.monotonic() < stop_at:
        body = batches.next()
        first = time.perf_counter()
        while True:
            t = time.perf_counter()
            try:
                status, retry_after, data = conn.call("POST", sys_.write_path, body, headers)
            except (OSError, http.client.HTTPException) as e:
                with st.lock:
                    st.write_requests += 1
                    st.rows_in_doubt += lines
                st.error("write", f"{type(e).__name__}: {e}")
                break
            now = time.perf_counter()
            with st.lock:
                st.write_requests += 1
            if 200 <= status < 300:
                with st.lock:
                    st.write_lat.append(now - t)
                    st.ack_lat.append(now - first)
                    st.acked_rows += lines
                break
            if status == 503 and retry_after is not None:
                with st.lock:
                    st.backpressure += 1
                    st.retry_after.add(retry_after)
                if time.monotonic() > give_up_at:
                    st.error("write", "still 503 after the run's end plus the grace time; batch given up")
                    break
                try:
                    wait = float(retry_after)
                except ValueError:
                    wait = 1.0
                time.sleep(min(max(wait, 0.0), RETRY_AFTER_CAP))
                continue
            st.error("write", f"HTTP {status} (Retry-After {retry_after}): {data[:300]!r}")
            break
    conn.close()


def reader(sys_: System, devices: int, seed: int, stop_at: float, timeout: float, st: Stats):
    conn = Conn(sys_.port, timeout)
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        kind, q = sys_.queries(devices, rng)
        t = time.perf_counter()
        try:
            status, _, data = conn.call("GET", sys_.query_path(q))
        except (OSError, http.client.HTTPException) as e:
            with st.lock:
                st.query_requests += 1
            st.error("query", f"{kind}: {type(e).__name__}: {e}")
            continue
        dt = time.perf_counter() - t
        with st.lock:
            st.query_requests += 1
        bad = sys_.query_ok(status, data)
        if bad:
            st.error("query", f"{kind}: {bad}")
            continue
        with st.lock:
            st.query_lat.setdefault(kind, []).append(dt)
    conn.close()


def rss_kib(pid: int) -> tuple[int | None, int | None]:
    rss = hwm = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def sampler(pid: int, t0: float, stop: threading.Event, out: list):
    while not stop.is_set():
        rss, _ = rss_kib(pid)
        if rss is not None:
            out.append((time.monotonic() - t0, rss))
        stop.wait(0.5)


METRIC_RE = re.compile(rb"^(citytsdb_buffer_bytes|citytsdb_buffer_rows|citytsdb_wal_bytes) (\S+)$", re.M)


def metrics_sampler(port: int, t0: float, stop: threading.Event, out: list):
    """citytsdb's buffer size from /metrics, once a second."""
    while not stop.is_set():
        try:
            st, body = cb.http_call(port, "GET", "/metrics", timeout=5)
            if st == 200:
                m = {k.decode(): float(v) for k, v in METRIC_RE.findall(body)}
                out.append((time.monotonic() - t0, m))
        except OSError:
            pass
        stop.wait(1.0)


def metrics(port: int) -> dict:
    st, body = cb.http_call(port, "GET", "/metrics", timeout=30)
    out = {}
    if st == 200:
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("citytsdb_") and " " in line and "{" not in line:
                k, v = line.rsplit(" ", 1)
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
    return out


def run_load(sys_: System, args, pools) -> dict:
    st = Stats()
    devices = list(range(args.devices))
    w = args.writers
    t0 = time.monotonic()
    t_lo_ms = int(time.time() * 1000) - 120_000
    stop_at = t0 + args.seconds
    give_up_at = stop_at + args.grace
    rss: list = []
    bufs: list = []
    stop = threading.Event()
    samplers = [threading.Thread(target=sampler, args=(sys_.proc.pid, t0, stop, rss), daemon=True)]
    if isinstance(sys_, City):
        samplers.append(threading.Thread(target=metrics_sampler, args=(sys_.port, t0, stop, bufs), daemon=True))
    for s in samplers:
        s.start()
    threads = []
    for i in range(w):
        b = Batches(devices[i::w], args.batch, pools, seed=1000 + i)
        threads.append(threading.Thread(target=writer, daemon=True, name=f"writer-{i}",
                                        args=(sys_, b, args.batch, stop_at, give_up_at, args.timeout, st)))
    for i in range(args.readers):
        threads.append(threading.Thread(target=reader, daemon=True, name=f"reader-{i}",
                                        args=(sys_, args.devices, 2000 + i, stop_at, args.timeout, st)))
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    last_log = time.monotonic()
    hard_end = give_up_at + args.timeout + 30
    while any(t.is_alive() for t in threads) and time.monotonic() < hard_end:
        time.sleep(0.5)
        if time.monotonic() - last_log >= 10:
            last_log = time.monotonic()
            with st.lock:
                log(f"  {sys_.name}: {time.monotonic() - t0:.0f} s, {st.acked_rows:,} rows acked, "
                    f"{st.query_requests} queries, {st.backpressure} 503s, {st.write_errors + st.query_errors} errors, "
                    f"RSS {rss[-1][1] / 1024 if rss else 0:,.0f} MiB")
    hung = [t.name for t in threads if t.is_alive()]
    wall = time.perf_counter() - t_start
    stop.set()
    for s in samplers:
        s.join(timeout=10)
    out = {"stats": st, "wall": wall, "rss": rss, "bufs": bufs, "hung": hung, "t_lo_ms": t_lo_ms}
    _, out["hwm_kib"] = rss_kib(sys_.proc.pid)
    return out


# --------------------------------------------------------------------------- phases

def seed(sys_: System, args, pools) -> int:
    """One reading of every cover a minute ago, before the load: the database and
    table exist (rules are planned against them) and every device is known."""
    ts = int(time.time() * 1000) - 60_000
    rows = 0
    for lo in range(0, args.devices, 5000):
        body = "".join(f"manhole,device={device_name(d)},district={lp_escape(district_of(d))} {pools[0][d & 4095]} {ts}\n"
                       for d in range(lo, min(args.devices, lo + 5000))).encode()
        st, ans = cb.http_call(sys_.port, "POST", sys_.write_path, body=body, timeout=args.timeout)
        if not 200 <= st < 300:
            raise RuntimeError(f"{sys_.name}: the seed write answered {st}: {ans[:300]!r}")
        rows += body.count(b"\n")
    return rows


def phase_city(args, work: Path, pools) -> dict:
    data = work / "citytsdb"
    shutil.rmtree(data, ignore_errors=True)
    extra = []
    if args.max_buffer_size:
        extra += ["--max-buffer-size", args.max_buffer_size]
    logf = work / "citytsdb.log"
    srv, port, _ = cb.start_citytsdb(args.binary, data, logf, extra)
    sys_ = City(port, srv)
    log(f"citytsdb up on 127.0.0.1:{port} (pid {srv.pid}){' with --max-buffer-size ' + args.max_buffer_size if args.max_buffer_size else ''}")
    seeded = seed(sys_, args, pools)
    recv = Receiver()
    webhook = f"http://127.0.0.1:{recv.port}/hook"
    for body in rule_bodies(args.rules, webhook):
        st, ans = cb.http_call(port, "POST", "/api/v1/rules", body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"}, timeout=30)
        if st != 201:
            raise RuntimeError(f"rule {body['name']} answered {st}: {ans[:300]!r}")
    log(f"  {args.rules} rules registered; webhook receiver on 127.0.0.1:{recv.port}; "
        f"{args.writers} writers x {args.batch}-line batches, {args.readers} readers, {args.seconds} s")
    res = run_load(sys_, args, pools)
    res["seeded"] = seeded
    res["count_notes"] = []
    res["held_rows"] = sys_.count(res["t_lo_ms"], int(time.time() * 1000) + 60_000, res["count_notes"])
    res["healthy"] = cb.http_call(port, "GET", "/health", timeout=10)[0] == 200
    res["metrics"] = metrics(port)
    st_, body = cb.http_call(port, "GET", "/api/v1/alerts", timeout=30)
    try:
        res["active_alerts"] = len(json.loads(body)) if st_ == 200 else None
    except ValueError:
        res["active_alerts"] = None
    time.sleep(1)  # let deliveries in flight land
    res["webhook"] = (recv.posts, dict(recv.alerts))
    recv.close()
    _, res["hwm_kib"] = rss_kib(srv.pid)
    cb.stop(srv)
    res["exit"] = srv.returncode
    text = logf.read_text(errors="replace")
    res["log_problems"] = [l for l in cb.ANSI_RE.sub("", text).splitlines()
                           if re.search(r"\b(ERROR|WARN|panick)", l)]
    return res


def phase_influx(args, work: Path, pools) -> dict:
    root = work / "influxdb"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    srv, port = cb.start_influx(args.influxd, root, work / "influxd.log")
    st, body = cb.http_call(port, "POST", "/query", body=urllib.parse.urlencode({"q": f"CREATE DATABASE {DB}"}).encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    if st != 200:
        raise RuntimeError(f"CREATE DATABASE answered {st}: {body[:300]!r}")
    log(f"influxd up on 127.0.0.1:{port} (pid {srv.pid}); {args.writers} writers, {args.readers} readers, {args.seconds} s")
    sys_ = Influx(port, srv)
    seeded = seed(sys_, args, pools)
    res = run_load(sys_, args, pools)
    res["seeded"] = seeded
    res["count_notes"] = []
    res["held_rows"] = sys_.count(res["t_lo_ms"], int(time.time() * 1000) + 60_000, res["count_notes"])
    res["healthy"] = cb.http_call(port, "GET", "/ping", timeout=10)[0] == 204
    _, res["hwm_kib"] = rss_kib(srv.pid)
    cb.stop(srv)
    res["exit"] = srv.returncode
    return res


# --------------------------------------------------------------------------- report

def summarise(res: dict) -> dict:
    st: Stats = res["stats"]
    wl = sorted(st.write_lat)
    al = sorted(st.ack_lat)
    ql = sorted(x for v in st.query_lat.values() for x in v)
    rss = res["rss"]
    peak = max((r for _, r in rss), default=None)
    half = res["wall"] / 2
    first = max((r for t, r in rss if t <= half), default=None)
    second = max((r for t, r in rss if t > half), default=None)
    return {
        "rows_s": st.acked_rows / res["wall"] if res["wall"] else float("nan"),
        "w": [cb.pct(wl, p) * 1e3 for p in (50, 90, 99)] + [(wl[-1] if wl else float("nan")) * 1e3],
        "ack": [cb.pct(al, p) * 1e3 for p in (50, 99)] + [(al[-1] if al else float("nan")) * 1e3],
        "q": [cb.pct(ql, p) * 1e3 for p in (50, 99)] + [(ql[-1] if ql else float("nan")) * 1e3],
        "qk": {k: (len(v), cb.pct(sorted(v), 50) * 1e3, cb.pct(sorted(v), 99) * 1e3) for k, v in sorted(st.query_lat.items())},
        "peak": peak * 1024 if peak else None,
        "first_half": first * 1024 if first else None,
        "second_half": second * 1024 if second else None,
        "end": rss[-1][1] * 1024 if rss else None,
        "hwm": res["hwm_kib"] * 1024 if res.get("hwm_kib") else None,
    }


def report(args, R: dict) -> str:
    names = [n for n in ("citytsdb", "influx") if n in R]
    S = {n: summarise(R[n]) for n in names}
    both = len(names) == 2

    def ratio(a, b):
        if a is None or b is None or a != a or b != b or b == 0:
            return "-"
        r = a / b
        return f"{r:.2f}x" if r < 10 else f"{r:.1f}x" if r < 100 else f"{r:,.0f}x"

    rows = []

    def row(label, f, num=None, with_ratio=True):
        cells = [f(n) for n in names]
        rt = ratio(num("citytsdb"), num("influx")) if both and with_ratio and num else ""
        rows.append([label] + cells + ([rt] if both else []))

    ms = cb.fmt_ms
    row("rows/s written (acknowledged rows / wall time)", lambda n: cb.fmt_int(S[n]["rows_s"]), lambda n: S[n]["rows_s"])
    for i, p in enumerate(("p50", "p90", "p99", "max")):
        row(f"write latency {p} (ms; {args.batch}-line batch, send -> 2xx)", lambda n, i=i: ms(S[n]["w"][i]), lambda n, i=i: S[n]["w"][i])
    row("ack latency incl. back-pressure waits p99 / max (ms)", lambda n: f"{ms(S[n]['ack'][1])} / {ms(S[n]['ack'][2])}",
        lambda n: S[n]["ack"][1])
    row("query latency p50 (ms; all kinds)", lambda n: ms(S[n]["q"][0]), lambda n: S[n]["q"][0])
    row("query latency p99 (ms; all kinds)", lambda n: ms(S[n]["q"][1]), lambda n: S[n]["q"][1])
    kinds = sorted({k for n in names for k in S[n]["qk"]})
    for k in kinds:
        row(f"  {k}: n, p50 / p99 (ms)",
            lambda n, k=k: (f"{S[n]['qk'][k][0]:,}: {ms(S[n]['qk'][k][1])} / {ms(S[n]['qk'][k][2])}" if k in S[n]["qk"] else "-"),
            lambda n, k=k: S[n]["qk"][k][1] if k in S[n]["qk"] else None)
    row("requests (writes + queries)", lambda n: f"{R[n]['stats'].write_requests:,} + {R[n]['stats'].query_requests:,}",
        lambda n: R[n]["stats"].write_requests + R[n]["stats"].query_requests)
    row("503s with Retry-After (back-pressure; retried)", lambda n: f"{R[n]['stats'].backpressure:,}", with_ratio=False)
    row("errors (other non-2xx, timeouts; must be 0)",
        lambda n: f"{R[n]['stats'].write_errors + R[n]['stats'].query_errors:,}"
                  + (f" ({R[n]['stats'].write_errors} writes, {R[n]['stats'].query_errors} queries)"
                     if R[n]['stats'].write_errors + R[n]['stats'].query_errors else ""),
        with_ratio=False)
    row("rows held (count) = acknowledged (+ seed rows)?",
        lambda n: f"{R[n]['held_rows']:,} = {R[n]['stats'].acked_rows:,} + {R[n]['seeded']:,}: "
                  + ("yes" if R[n]["held_rows"] == R[n]["stats"].acked_rows + R[n]["seeded"] else "NO")
                  + (" (the one count(*) failed; summed by district)" if R[n].get("count_notes") else ""), with_ratio=False)
    row("peak RSS (sampled every 0.5 s)", lambda n: cb.fmt_bytes(S[n]["peak"]), lambda n: S[n]["peak"])
    row("peak RSS, first half / second half of the run",
        lambda n: f"{cb.fmt_bytes(S[n]['first_half'])} / {cb.fmt_bytes(S[n]['second_half'])}", with_ratio=False)
    row("VmHWM at the end", lambda n: cb.fmt_bytes(S[n]["hwm"]), lambda n: S[n]["hwm"])
    if "citytsdb" in R:
        c = R["citytsdb"]
        posts, al = c["webhook"]
        m = c["metrics"]
        rows.append([f"alert rules ({args.rules}): evaluations, failures; webhook POSTs (firing / resolved alerts)",
                     f"{m.get('citytsdb_rule_evaluations_total', 0):,.0f}, {m.get('citytsdb_rule_evaluation_failures_total', 0):,.0f}; "
                     f"{posts:,} ({al.get('firing', 0):,} / {al.get('resolved', 0):,})"]
                    + (["(no rules)", ""] if both else []))
        bufs = [b[1].get("citytsdb_buffer_bytes", 0) for b in c["bufs"]]
        if bufs:
            rows.append(["write buffer, max sampled (/metrics, every 1 s)", cb.fmt_bytes(max(bufs))]
                        + (["-", ""] if both else []))
    head = ["metric"] + [("citytsdb" if n == "citytsdb" else "InfluxDB 1.x") for n in names] + (["citytsdb / InfluxDB"] if both else [])
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(names) + (" --- |" if both else "")]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    title = (f"load_bench: {args.writers} writers x {args.batch}-line batches, {args.readers} readers, {args.rules} rules, "
             f"{args.seconds} s per system, {args.devices:,} covers"
             f"{', --max-buffer-size ' + args.max_buffer_size if args.max_buffer_size else ''}; "
             f"{cb.profile_of(args.binary)}; {cb.cpu_model()}; {os.cpu_count()} CPUs; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return title + "\n\n" + "\n".join(lines) + "\n"


def details(R: dict) -> str:
    out = []
    for n in R:
        r = R[n]
        st: Stats = r["stats"]
        out.append(f"{n}: wall {r['wall']:.1f} s, exit {r.get('exit')}, healthy after the load: {r['healthy']}"
                   + (f", threads still running at the hard end: {r['hung']}" if r["hung"] else ""))
        if st.retry_after:
            out.append(f"  Retry-After values seen: {sorted(st.retry_after)}")
        if st.rows_in_doubt:
            out.append(f"  rows of timed-out batches (written or not): {st.rows_in_doubt:,}")
        tl = r["rss"]
        if tl:
            marks = [tl[min(len(tl) - 1, int(len(tl) * f))] for f in (0, 0.25, 0.5, 0.75, 1.0)]
            out.append("  RSS over the run: " + ", ".join(f"{t:.0f} s {v / 1024:,.0f} MiB" for t, v in marks))
        if r.get("bufs"):
            b = r["bufs"]
            marks = [b[min(len(b) - 1, int(len(b) * f))] for f in (0, 0.25, 0.5, 0.75, 1.0)]
            out.append("  write buffer over the run: " + ", ".join(
                f"{t:.0f} s {m.get('citytsdb_buffer_bytes', 0) / 2**20:,.0f} MiB / {m.get('citytsdb_buffer_rows', 0):,.0f} rows"
                for t, m in marks))
        for note in r.get("count_notes") or []:
            out.append(f"  count: {note}")
        for e in st.errors[:20]:
            out.append(f"  error: {e}")
        probs = r.get("log_problems") or []
        full = [l for l in probs if "write buffer full" in l]
        slow = [l for l in probs if "slow query" in l]
        other = [l for l in probs if l not in full and l not in slow]
        if probs:
            out.append(f"  server log: {len(full)} 'write buffer full' 503 lines, {len(slow)} slow-query warnings, "
                       f"{len(other)} other WARN/ERROR lines")
            for group in (full[:2], slow[:3], other[:15]):
                out += [f"    {l[:400]}" for l in group]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=Path, default=Path("/work/release-target/release/citytsdb"))
    ap.add_argument("--influxd", type=Path, default=Path("/usr/bin/influxd"))
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--rules", type=int, default=20)
    ap.add_argument("--batch", type=int, default=5000, help="lines per write request")
    ap.add_argument("--seconds", type=float, default=60, help="load duration per system")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--max-buffer-size", default=None, help="citytsdb --max-buffer-size, e.g. 64MiB (default: the server's)")
    ap.add_argument("--skip-influx", action="store_true")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request before it counts as an error")
    ap.add_argument("--grace", type=float, default=30.0,
                    help="seconds after the run a writer keeps retrying a batch refused with 503")
    ap.add_argument("--markdown", type=Path, help="append the table to this file")
    ap.add_argument("--workdir", type=Path, help="data directories and logs (default: a new temporary directory)")
    args = ap.parse_args()
    if not args.binary.is_file():
        print(f"{args.binary} not found; build it or pass --binary", file=sys.stderr)
        return 2
    if args.writers < 1 or args.devices < args.writers or args.batch < 1 or args.seconds <= 0:
        print("need --writers >= 1, --devices >= --writers, --batch >= 1, --seconds > 0", file=sys.stderr)
        return 2
    if not args.skip_influx and not args.influxd.is_file():
        print(f"{args.influxd} not found: pass --skip-influx or --influxd PATH", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="load-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work directory {work}; load average {cb.loadavg()}")
    pools = field_pools(1)
    R = {}
    R["citytsdb"] = phase_city(args, work, pools)
    if not args.skip_influx:
        R["influx"] = phase_influx(args, work, pools)
    text = report(args, R)
    print(text)
    print(details(R))
    log(f"load average {cb.loadavg()}; logs in {work}")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n" + details(R) + "\n")
    failed = any(R[n]["stats"].write_errors + R[n]["stats"].query_errors or R[n]["held_rows"] != R[n]["stats"].acked_rows + R[n]["seeded"]
                 or R[n]["hung"] for n in R)
    if not args.workdir:
        for n in ("citytsdb", "influxdb"):
            shutil.rmtree(work / n, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
