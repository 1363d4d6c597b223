#!/usr/bin/env python3
"""City workload, side by side: citytsdb against DuckDB and InfluxDB 1.x on the same data.

One command measures, on `citytsdb gen` data (default 10,000 devices x 7 days):

- ingest: rows/s and p50/p99 write latency of line protocol over HTTP from several
  concurrent client processes, every write acknowledged (204; durable, no_sync=false), for
  citytsdb and InfluxDB 1.x, with bodies of 5,000 lines and, into fresh servers, of 10,000
  lines (the same lines re-split);
- storage: bytes on disk per row and per float value after a flush (citytsdb), after the
  cache snapshot and compaction (InfluxDB), and for a DuckDB table of the same rows;
- six queries, p50 and p95 over repeated runs after two warm-ups, for citytsdb (SQL over
  HTTP), DuckDB in-process over citytsdb's own Parquet segments and over a DuckDB table
  loaded from them, and InfluxDB 1.x (InfluxQL over HTTP), with answers cross-checked;
  one device's day (q1) and the latest reading of every device (q3) again over one
  kept-alive HTTP connection;
- alert latency of a fast-path rule (runs the `alert_latency` benchmark binary);
- WAL replay rows/s and time to the first healthy and the first correct answer after a
  `kill -9`;
- peak memory (VmHWM) of the servers: right after the 5,000-line ingest (before the flush),
  at the end of the 10,000-line ingest, and at the end of the run; the citytsdb server's
  write-buffer settings (`citytsdb serve --help` defaults and the environment) are noted;
- the size of the citytsdb binary and of `influxd`, and the threads each side may use.

It prints one table (and appends it as markdown with `--markdown FILE`). Ratios are
"peer / citytsdb" for times, bytes and memory and "citytsdb / peer" for rows/s, so a
ratio above 1 always means citytsdb is better.

    python3 benches/city_bench.py [--bin PATH] [--influxd PATH] [--devices N] [--days D]
        [--clients N] [--runs N] [--quick] [--markdown FILE] [--workdir DIR] [--keep-data]
        [--skip influx,duckdb,alert,restart,ingest10k]

Needs Python 3.11 with `duckdb` and `pyarrow` (tests/requirements.txt), and for the
InfluxDB column Debian's `influxdb` package (`apt-get install influxdb`). Every child
process is killed when the program ends, however it ends.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import http.client
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DB = "city"
START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SEED = 1
INTERVAL_S = 300  # `citytsdb gen`'s default --interval (5m)
LINES_PER_BODY = 5000
LINES_PER_BODY_LARGE = 10_000  # the second ingest run (a multiple of LINES_PER_BODY)
HTTP_TIMEOUT = 120.0
STARTUP_TIMEOUT = 120.0
DISTRICT = "金水区"

# --------------------------------------------------------------------------- children

CHILDREN: list[subprocess.Popen] = []
WRITERS: list[mp.Process] = []


def _kill_children() -> None:
    for w in WRITERS:
        if w.is_alive():
            w.kill()
    for p in CHILDREN:
        if p.poll() is None:
            try:
                if getattr(p, "_own_group", False):
                    os.killpg(p.pid, signal.SIGKILL)  # a group this program created
                else:
                    p.kill()
            except OSError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_kill_children)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)


def spawn(cmd: list[str], log: Path, own_group: bool = False, **kw) -> subprocess.Popen:
    out = open(log, "ab")
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=own_group,
        **kw,
    )
    out.close()
    p._own_group = own_group  # type: ignore[attr-defined]
    CHILDREN.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------- HTTP

def http_call(port: int, method: str, path: str, body: bytes | None = None,
              headers: dict | None = None, timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Client:
    """GETs over HTTP: a new connection per request, or one kept alive (`keepalive=True`,
    reconnecting once when it breaks)."""

    def __init__(self, port: int, keepalive: bool = False, timeout: float = HTTP_TIMEOUT):
        self.port, self.keepalive, self.timeout, self.conn = port, keepalive, timeout, None

    def get(self, path: str) -> tuple[int, bytes]:
        if not self.keepalive:
            return http_call(self.port, "GET", path, timeout=self.timeout)
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_healthy(port: int, path: str, proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT,
                 ok=(200, 204), poll: float = 0.05) -> float:
    """Polls until `path` answers; returns the time it first did (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {path}")
        try:
            status, _ = http_call(port, "GET", path, timeout=2.0)
            if status in ok:
                return time.perf_counter()
        except OSError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"no answer on 127.0.0.1:{port}{path} within {timeout:.0f} s")


# --------------------------------------------------------------------------- data

# The field set of a line: after the first unescaped space, before " <timestamp>".
FIELDS_RE = re.compile(rb"(?<!\\) ([^ \n]*) -?\d+\n")
# A float field value: a number without the i/u suffix (not a boolean, not a string).
FLOAT_RE = re.compile(rb"=[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?=[,\n])")


FLOAT_VALUE_RE = re.compile(rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _split_unescaped(s: bytes, sep: bytes) -> list[bytes]:
    """Splits on `sep` outside backslash escapes and double quotes."""
    parts, cur, esc, quoted = [], bytearray(), False, False
    for b in s:
        ch = bytes((b,))
        if esc:
            esc = False
        elif ch == b"\\":
            esc = True
        elif ch == b'"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(bytes(cur))
            cur = bytearray()
            continue
        cur += ch
    parts.append(bytes(cur))
    return parts


def _slow_counts(body: bytes) -> tuple[int, int]:
    """Field and float-field values of every line, by a full scan (the fallback)."""
    fields = floats = 0
    for line in body.split(b"\n"):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        parts = _split_unescaped(line, b" ")
        if len(parts) < 2:
            continue
        for kv in _split_unescaped(parts[1], b","):
            fields += 1
            value = _split_unescaped(kv, b"=")[-1]
            if FLOAT_VALUE_RE.fullmatch(value):
                floats += 1
    return fields, floats


def load_bodies(f, lines_per_body: int, copy=None) -> tuple[list[bytes], list[int], int, int]:
    """Splits a stream of lines into bodies; counts lines, field values and float field
    values; writes every body to `copy` too when given."""
    bodies, counts, fields, floats = [], [], 0, 0
    while True:
        chunk = list(itertools.islice(f, lines_per_body))
        if not chunk:
            break
        if not chunk[-1].endswith(b"\n"):
            chunk[-1] += b"\n"
        body = b"".join(chunk)
        sections = FIELDS_RE.findall(body)
        if len(sections) == len(chunk):
            joined = b"\n".join(sections) + b"\n"
            floats += len(FLOAT_RE.findall(joined))
            fields += joined.count(b"=")
        else:
            fi, fl = _slow_counts(body)
            fields += fi
            floats += fl
        bodies.append(body)
        counts.append(len(chunk))
        if copy is not None:
            copy.write(body)
    return bodies, counts, fields, floats


def resplit_bodies(lines_per_body: int) -> None:
    """Re-splits BODIES (bodies of LINES_PER_BODY lines, in order) into bodies of
    `lines_per_body` lines by joining consecutive ones, freeing each as it goes."""
    global BODIES, BODY_LINES
    if lines_per_body % LINES_PER_BODY:
        raise ValueError(f"{lines_per_body} is not a multiple of {LINES_PER_BODY}")
    k = lines_per_body // LINES_PER_BODY
    old, old_lines = BODIES, BODY_LINES
    BODIES, BODY_LINES = [], []
    for i in range(0, len(old), k):
        BODIES.append(b"".join(old[i:i + k]))
        BODY_LINES.append(sum(old_lines[i:i + k]))
        for j in range(i, min(i + k, len(old))):
            old[j] = b""


# --------------------------------------------------------------------------- ingest

BODIES: list[bytes] = []
BODY_LINES: list[int] = []


def _writer(port: int, path: str, indices: list[int], go, results) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    ok_lines, errors, latencies = 0, [], []
    try:
        conn.connect()
    except OSError:
        pass  # the first request reconnects and reports the error
    go.wait()
    for i in indices:
        t = time.perf_counter()
        try:
            conn.request("POST", path, body=BODIES[i],
                         headers={"Content-Type": "text/plain; charset=utf-8"})
            r = conn.getresponse()
            data = r.read()
        except (http.client.HTTPException, OSError) as e:
            errors.append(f"body {i}: {type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
            continue
        latencies.append(time.perf_counter() - t)
        if r.status == 204:
            ok_lines += BODY_LINES[i]
        else:
            errors.append(f"body {i}: HTTP {r.status}: {data[:300]!r}")
    conn.close()
    results.put((ok_lines, errors, latencies, time.perf_counter()))


def ingest(port: int, path: str, indices: list[int], clients: int) -> dict:
    """Writes the bodies `indices` with `clients` processes; rows/s over the wall time."""
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    procs = []
    for c in range(clients):
        p = ctx.Process(target=_writer, args=(port, path, indices[c::clients], go, results), daemon=True)
        p.start()
        procs.append(p)
        WRITERS.append(p)
    time.sleep(0.3)  # let every writer connect and wait
    t0 = time.perf_counter()
    go.set()
    got, ok_lines, errors, latencies, end = 0, 0, [], [], t0
    deadline = time.monotonic() + 4 * 3600
    while got < clients:
        try:
            lines, errs, lats, t_end = results.get(timeout=5)
        except queue.Empty:
            if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                if results.empty():
                    raise RuntimeError("writers died or timed out")
            continue
        got += 1
        ok_lines += lines
        errors += errs
        latencies += lats
        end = max(end, t_end)
    t1 = end  # when the last writer had its last answer (perf_counter is system-wide)
    for p in procs:
        p.join(timeout=10)
    lines_sent = sum(BODY_LINES[i] for i in indices)
    secs = t1 - t0
    lat = sorted(latencies)
    return {
        "lines": lines_sent,
        "acked_lines": ok_lines,
        "secs": secs,
        "rows_per_s": ok_lines / secs if secs > 0 else float("nan"),
        "errors": errors,
        "batch_p50_ms": pct(lat, 50) * 1e3,
        "batch_p99_ms": pct(lat, 99) * 1e3,
    }


# --------------------------------------------------------------------------- stats

def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not sorted_values:
        return float("nan")
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def timed_runs(fn, runs: int, warmups: int = 2) -> tuple[list[float], object]:
    result = None
    for _ in range(warmups):
        result = fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times), result


# --------------------------------------------------------------------------- citytsdb

def profile_of(bin_path: Path) -> str:
    parts = bin_path.resolve().parts
    if "release" in parts:
        return "release profile (opt-level 3)"
    if "debug" in parts:
        return "dev profile (the workspace sets opt-level 1)"
    return "unknown profile"


def serve_settings(bin_path: Path, options: list[str]) -> list[str]:
    """`--option value` as a server started without flags runs: the default that
    `citytsdb serve --help` prints, or the CITYTSDB_* environment variable it names."""
    try:
        text = subprocess.run([str(bin_path), "serve", "--help"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    out = []
    for opt in options:
        m = re.search(rf"^\s*{re.escape(opt)} <[^>]*>\s*\n(.*?)(?=^\s*-|\Z)", text, re.M | re.S)
        if not m:
            out.append(f"{opt} (not in `citytsdb serve --help`)")
            continue
        block = m.group(1)
        env = re.search(r"\[env: ([A-Z0-9_]+)", block)
        default = re.search(r"\[default: ([^\]]*)\]", block)
        if env and os.environ.get(env.group(1)):
            out.append(f"{opt} {os.environ[env.group(1)]} (from ${env.group(1)})")
        else:
            out.append(f"{opt} {default.group(1) if default else '?'}")
    if os.environ.get("CITYTSDB_CONFIG"):
        out.append(f"and whatever $CITYTSDB_CONFIG ({os.environ['CITYTSDB_CONFIG']}) sets")
    return out


def start_citytsdb(bin_path: Path, data: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    cmd = [str(bin_path), "serve", "--data-dir", str(data), "--http-bind", f"127.0.0.1:{port}", *extra]
    env = dict(os.environ, NO_COLOR="1")
    t_spawn = time.perf_counter()
    p = spawn(cmd, log, env=env)
    wait_healthy(port, "/health", p)
    return p, port, t_spawn


def city_sql(client: Client, sql: str, fmt: str = "jsonl") -> tuple[int, bytes]:
    q = urllib.parse.urlencode({"db": DB, "sql": sql, "format": fmt})
    return client.get(f"/api/v1/query?{q}")


def city_rows(body: bytes) -> list[dict]:
    return [json.loads(l) for l in body.splitlines() if l.strip()]


def live_files(client: Client, store: Path) -> dict:
    """Files the newest catalog lists, by table and kind, as the server's system tables
    name them; `floats` names each table's float field columns."""
    status, body = city_sql(client, "SELECT table_name, path FROM system.segments")
    if status != 200:
        raise RuntimeError(f"system.segments answered {status}: {body[:300]!r}")
    out = {"parquet": {}, "index": [], "series": sorted(p for p in (store / "series").rglob("*") if p.is_file()),
           "catalog": sorted(p for p in (store / "catalog").rglob("*") if p.is_file()), "floats": {}}
    for row in city_rows(body):
        path = store / row["path"]
        out["parquet"].setdefault(row["table_name"], []).append(path)
        out["index"].append(path.with_suffix(".index"))
    for name in out["parquet"]:
        status, body = city_sql(client, f"SHOW COLUMNS FROM {name}")
        cols = city_rows(body) if status == 200 else []
        out["floats"][name] = {c["column_name"] for c in cols if c.get("data_type") == "Float64"}
    return out


def float_column_bytes(files: dict) -> tuple[int, int, int]:
    """Compressed bytes and values of float field columns; all column-chunk bytes."""
    import pyarrow.parquet as pq
    col_bytes = values = all_bytes = 0
    for table, paths in files["parquet"].items():
        floats = files["floats"][table]
        for p in paths:
            md = pq.ParquetFile(p).metadata
            for rg in range(md.num_row_groups):
                g = md.row_group(rg)
                for ci in range(g.num_columns):
                    c = g.column(ci)
                    all_bytes += c.total_compressed_size
                    if c.path_in_schema in floats:
                        col_bytes += c.total_compressed_size
                        nulls = c.statistics.null_count if c.statistics is not None and c.statistics.has_null_count else 0
                        values += c.num_values - (nulls or 0)
    return col_bytes, values, all_bytes


# --------------------------------------------------------------------------- InfluxDB

INFLUX_CONF = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"

[meta]
  dir = "{dir}/meta"
  logging-enabled = false

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  wal-fsync-delay = "0s"
  index-version = "inmem"
  query-log-enabled = false
  max-series-per-database = 0
  max-values-per-tag = 0
  cache-snapshot-write-cold-duration = "10s"
  compact-full-write-cold-duration = "30s"

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false
  max-body-size = 0

[logging]
  level = "warn"
"""


def start_influx(influxd: Path, root: Path, log: Path) -> tuple[subprocess.Popen, int]:
    http_port, rpc_port = free_port(), free_port()
    while rpc_port == http_port:
        rpc_port = free_port()
    conf = root / "influxdb.conf"
    conf.write_text(INFLUX_CONF.format(dir=root, rpc=rpc_port, http=http_port))
    p = spawn([str(influxd), "run", "-config", str(conf)], log)
    wait_healthy(http_port, "/ping", p, ok=(204,))
    return p, http_port


def influx_create_db(port: int) -> None:
    status, body = http_call(port, "POST", "/query", body=urllib.parse.urlencode({"q": f"CREATE DATABASE {DB}"}).encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    if status != 200:
        raise RuntimeError(f"CREATE DATABASE answered {status}: {body[:300]!r}")


def influx_q(client: Client, q: str, epoch: str | None = None) -> tuple[int, bytes]:
    params = {"db": DB, "q": q}
    if epoch:
        params["epoch"] = epoch
    return client.get(f"/query?{urllib.parse.urlencode(params)}")


def influx_rows(body: bytes) -> list[dict]:
    doc = json.loads(body)
    rows = []
    for res in doc.get("results", []):
        if "error" in res:
            raise RuntimeError(f"InfluxQL error: {res['error']}")
        for s in res.get("series", []) or []:
            cols = s["columns"]
            for v in s.get("values", []) or []:
                r = dict(zip(cols, v))
                r.update(s.get("tags") or {})
                r["_measurement"] = s.get("name")
                rows.append(r)
    return rows


# --------------------------------------------------------------------------- queries

def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def duck_ts(t: dt.datetime) -> str:
    return "TIMESTAMPTZ '" + t.strftime("%Y-%m-%d %H:%M:%S") + "+00'"


TABLES = ["manhole", "parking", "traffic", "sewage"]
LATEST_COLUMNS = {
    "manhole": "device, district, time, tilt_deg, water_level_cm, battery_pct, cover_open",
    "parking": "device, district, street, time, occupied, capacity",
    "traffic": "device, district, time, flow, speed_kmh",
    "sewage": "device, district, time, flow_lps, cod_mgl",
}
ANY_FIELD = {"manhole": "tilt_deg", "parking": "occupied", "traffic": "flow", "sewage": "flow_lps"}


def build_queries(devices: int, days: int) -> list[dict]:
    dev = devices // 2
    while dev % 5 != 1 and dev < devices:
        dev += 1
    if dev % 5 != 1:
        dev = 1
    device = f"mh-{dev:05d}"
    day = days // 2
    d0 = START + dt.timedelta(days=day)
    d1 = d0 + dt.timedelta(days=1)
    end = START + dt.timedelta(days=days)
    cutoff = end - dt.timedelta(minutes=10)
    q = []
    q.append(dict(
        key="q1", name=f"one device's day ({device}, {d0:%Y-%m-%d}, all fields)",
        city=[f"SELECT * FROM manhole WHERE device = '{device}' AND time >= '{iso(d0)}' AND time < '{iso(d1)}' ORDER BY time"],
        duck=[f"SELECT * FROM manhole WHERE device = '{device}' AND time >= {duck_ts(d0)} AND time < {duck_ts(d1)} ORDER BY time"],
        influx=[f"SELECT * FROM manhole WHERE device = '{device}' AND time >= '{iso(d0)}' AND time < '{iso(d1)}'"],
        value=("water_level_cm", "water_level_cm", "water_level_cm"),
    ))
    q.append(dict(
        key="q2", name=f"district hourly avg water level, whole range ({DISTRICT})",
        city=[f"SELECT date_bin(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS level FROM manhole "
              f"WHERE district = '{DISTRICT}' AND time >= '{iso(START)}' AND time < '{iso(end)}' GROUP BY hour ORDER BY hour"],
        duck=[f"SELECT time_bucket(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS level FROM manhole "
              f"WHERE district = '{DISTRICT}' AND time >= {duck_ts(START)} AND time < {duck_ts(end)} GROUP BY hour ORDER BY hour"],
        influx=[f"SELECT mean(water_level_cm) FROM manhole WHERE district = '{DISTRICT}' AND time >= '{iso(START)}' "
                f"AND time < '{iso(end)}' GROUP BY time(1h) fill(none)"],
        value=("level", "level", "mean"),
    ))
    latest = [f"SELECT DISTINCT ON (device) {LATEST_COLUMNS[t]} FROM {t} ORDER BY device, time DESC" for t in TABLES]
    q.append(dict(
        key="q3", name="latest reading of every device (4 tables, one request each)",
        city=latest, duck=latest,
        influx=[f"SELECT last(*) FROM {t} GROUP BY device" for t in TABLES],
        value=None,
    ))
    q.append(dict(
        key="q4", name=f"5-minute buckets of traffic flow, one district, one day ({DISTRICT})",
        city=[f"SELECT date_bin(INTERVAL '5 minutes', time) AS bucket, sum(flow) AS flow, avg(speed_kmh) AS speed FROM traffic "
              f"WHERE district = '{DISTRICT}' AND time >= '{iso(d0)}' AND time < '{iso(d1)}' GROUP BY bucket ORDER BY bucket"],
        duck=[f"SELECT time_bucket(INTERVAL '5 minutes', time) AS bucket, sum(flow) AS flow, avg(speed_kmh) AS speed FROM traffic "
              f"WHERE district = '{DISTRICT}' AND time >= {duck_ts(d0)} AND time < {duck_ts(d1)} GROUP BY bucket ORDER BY bucket"],
        influx=[f"SELECT sum(flow), mean(speed_kmh) FROM traffic WHERE district = '{DISTRICT}' AND time >= '{iso(d0)}' "
                f"AND time < '{iso(d1)}' GROUP BY time(5m) fill(none)"],
        value=("flow", "flow", "sum"),
    ))
    union = " UNION ALL ".join(f"SELECT device, time FROM {t}" for t in TABLES)
    q.append(dict(
        key="q5", name=f"devices silent for 10 minutes at the end of the data (last reading < {iso(cutoff)})",
        city=[f"SELECT device, district, last_time FROM system.devices WHERE last_time < '{iso(cutoff)}' ORDER BY device"],
        duck=[f"SELECT device, max(time) AS last_time FROM ({union}) AS t GROUP BY device "
              f"HAVING max(time) < {duck_ts(cutoff)} ORDER BY device"],
        influx=["; ".join(f"SELECT last({ANY_FIELD[t]}) FROM {t} GROUP BY device" for t in TABLES)],
        influx_filter=int(cutoff.timestamp()),
        value=None,
    ))
    q.append(dict(
        key="q6", name="top 10 covers by max tilt, whole range",
        city=["SELECT device, district, max(tilt_deg) AS tilt FROM manhole GROUP BY device, district ORDER BY tilt DESC, device LIMIT 10"],
        duck=["SELECT device, district, max(tilt_deg) AS tilt FROM manhole GROUP BY device, district ORDER BY tilt DESC, device LIMIT 10"],
        influx=["SELECT top(tilt_deg, device, 10) FROM manhole"],
        value=("tilt", "tilt", "top"),
    ))
    return q


def summary(query: dict, engine: int, rows: list[dict]) -> tuple:
    """Row count and, where there is one, the sorted values of the query's value column."""
    if query["key"] in ("q3", "q5"):
        return (len(rows), tuple(sorted(str(r.get("device")) for r in rows)))
    col = query["value"][engine]
    vals = []
    for r in rows:
        v = r.get(col)
        vals.append(float(v) if v is not None else float("nan"))
    return (len(rows), tuple(sorted(vals)))


def agree(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    for x, y in zip(a[1], b[1]):
        if isinstance(x, float) and isinstance(y, float):
            if math.isnan(x) and math.isnan(y):
                continue
            if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------- formatting

def fmt_int(n: float) -> str:
    return f"{n:,.0f}" if n == n else "-"


def fmt_ms(v: float) -> str:
    if v != v:
        return "-"
    if v < 10:
        return f"{v:.2f}"
    if v < 1000:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def met(conditions: list[bool | None]) -> str:
    """'yes' when every measured condition holds (None: its peer was not measured)."""
    measured = [c for c in conditions if c is not None]
    if not measured:
        return "-"
    if not all(measured):
        return "no"
    return "yes" if len(measured) == len(conditions) else "yes, where measured"


def ratio(peer: float | None, ours: float | None) -> str:
    if not peer or not ours or peer != peer or ours != ours:
        return "-"
    r = peer / ours
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x" if r < 100 else f"{r:,.0f}x"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# --------------------------------------------------------------------------- phases

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def phase_citytsdb(args, work: Path, queries: list[dict], R: dict) -> None:
    data = work / "citytsdb"
    shutil.rmtree(data, ignore_errors=True)
    srv, port, _ = start_citytsdb(args.bin, data, work / "citytsdb.log", [])
    R["city_port"] = port
    log(f"citytsdb up on 127.0.0.1:{port}; ingesting {R['lines']:,} lines in {len(BODIES)} bodies with {args.clients} clients")
    ing = ingest(port, f"/api/v1/write?db={DB}&precision=s", list(range(len(BODIES))), args.clients)
    R["city_ingest"] = ing
    R["city_hwm_ingest"] = vm_hwm_bytes(srv.pid)  # before the flush, compaction and queries
    log(f"citytsdb ingest: {ing['rows_per_s']:,.0f} rows/s ({ing['secs']:.1f} s), {len(ing['errors'])} failed bodies; "
        f"VmHWM {fmt_bytes(R['city_hwm_ingest'])}")
    R["city_wal_before_flush"] = dir_bytes(data / "wal")
    R["city_store_before_flush"] = dir_bytes(data / "store")
    t = time.perf_counter()
    status, body = http_call(port, "POST", "/api/v1/flush", timeout=600)
    R["city_flush"] = (status, body.decode(errors="replace"), time.perf_counter() - t)
    if status != 200:
        raise RuntimeError(f"flush answered {status}: {body[:300]!r}")
    # The store settles before it is measured: every day compacted into one run and
    # the replaced files collected (background compaction would otherwise rewrite
    # segments under the queries and DuckDB). A server without the endpoint (404)
    # is measured as it is.
    t = time.perf_counter()
    status, body = http_call(port, "POST", "/api/v1/compact", timeout=3600)
    R["city_compact"] = (status, body.decode(errors="replace"), time.perf_counter() - t)
    if status not in (200, 404):
        raise RuntimeError(f"compact answered {status}: {body[:300]!r}")
    if status == 200:
        log(f"citytsdb compacted in {R['city_compact'][2]:.1f} s: {R['city_compact'][1]}")
    store = data / "store"
    files = live_files(Client(port), store)
    R["city_files"] = files
    parquet = [p for ps in files["parquet"].values() for p in ps]
    R["city_parquet_bytes"] = sum(p.stat().st_size for p in parquet)
    R["city_index_bytes"] = sum(p.stat().st_size for p in files["index"])
    R["city_series_bytes"] = sum(p.stat().st_size for p in files["series"])
    R["city_catalog_bytes"] = sum(p.stat().st_size for p in files["catalog"])
    R["city_live_store_bytes"] = (R["city_parquet_bytes"] + R["city_index_bytes"] + R["city_series_bytes"]
                                  + R["city_catalog_bytes"])
    R["city_store_du"] = dir_bytes(store)
    R["city_wal_after_flush"] = dir_bytes(data / "wal")
    R["city_segments"] = len(parquet)
    fb, fv, cb = float_column_bytes(files)
    R["city_float_col_bytes"], R["city_float_values_stored"], R["city_colchunk_bytes"] = fb, fv, cb
    client = Client(port)
    status, body = city_sql(client, "SELECT sum(c) AS n FROM (" + " UNION ALL ".join(
        f"SELECT count(*) AS c FROM {t}" for t in TABLES) + ") AS t")
    R["city_rows"] = int(city_rows(body)[0]["n"]) if status == 200 else None
    # Does the latest-per-device query take the in-memory path?
    status, body = city_sql(client, "EXPLAIN ANALYZE " + queries[2]["city"][0], "pretty")
    R["city_lvc"] = b"LastValueCacheExec" in body
    log(f"citytsdb after flush: {R['city_rows']:,} rows, {R['city_segments']} segments, "
        f"{R['city_parquet_bytes']:,} Parquet bytes; running the queries")
    R["city_q"] = {}
    for q in queries:
        def run(q=q):
            rows = []
            for sql in q["city"]:
                st, b = city_sql(client, sql)
                if st != 200:
                    raise RuntimeError(f"citytsdb {q['key']} answered {st}: {b[:300]!r}")
                rows.append(b)
            return rows
        times, bodies = timed_runs(run, args.runs)
        rows = [r for b in bodies for r in city_rows(b)]
        R["city_q"][q["key"]] = (times, summary(q, 0, rows))
        log(f"  citytsdb {q['key']}: p50 {fmt_ms(pct(times, 50))} ms, {len(rows)} rows")
    client.close()
    # The same q1 over one kept-alive connection, as a pooling client sends it.
    ka = Client(port, keepalive=True)
    R["city_q1_keepalive"], _ = timed_runs(lambda: city_sql(ka, queries[0]["city"][0]), args.runs)
    # q3's four requests, one after another over that one connection.
    def q3_keepalive():
        out = []
        for sql in queries[2]["city"]:
            st, b = city_sql(ka, sql)
            if st != 200:
                raise RuntimeError(f"citytsdb q3 (kept-alive) answered {st}: {b[:300]!r}")
            out.append(b)
        return out
    times, bodies = timed_runs(q3_keepalive, args.runs)
    R["city_q3_keepalive"] = times
    if summary(queries[2], 0, [r for b in bodies for r in city_rows(b)]) != R["city_q"]["q3"][1]:
        R["warnings"].append("q3 over one kept-alive connection answers differently from q3 over new connections")
    log(f"  citytsdb q1 kept-alive: p50 {fmt_ms(pct(R['city_q1_keepalive'], 50))} ms; "
        f"q3 kept-alive: p50 {fmt_ms(pct(times, 50))} ms")
    ka.close()
    R["city_hwm"] = vm_hwm_bytes(srv.pid)
    stop(srv)


def phase_duckdb(args, work: Path, queries: list[dict], R: dict) -> None:
    import duckdb
    files = R["city_files"]
    seg = duckdb.connect()
    seg.execute("SET TimeZone = 'UTC'")
    R["duck_threads"] = seg.execute("SELECT current_setting('threads')").fetchone()[0]
    for t in TABLES:
        lst = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files["parquet"].get(t, []))
        seg.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet([{lst}])")
    dbfile = work / "duck.db"
    for p in (dbfile, Path(str(dbfile) + ".wal")):
        if p.exists():
            p.unlink()
    tab = duckdb.connect(str(dbfile))
    tab.execute("SET TimeZone = 'UTC'")
    t = time.perf_counter()
    for name in TABLES:
        lst = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files["parquet"].get(name, []))
        tab.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet([{lst}])")
    tab.execute("CHECKPOINT")
    R["duck_load_secs"] = time.perf_counter() - t
    R["duck_table_bytes"] = dbfile.stat().st_size
    R["duck_table_rows"] = sum(tab.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in TABLES)
    log(f"DuckDB table loaded: {R['duck_table_rows']:,} rows, {R['duck_table_bytes']:,} bytes; running the queries")
    for label, con in (("duck_seg", seg), ("duck_tab", tab)):
        R[label] = {}
        for q in queries:
            def run(q=q, con=con):
                out = []
                for sql in q["duck"]:
                    cur = con.execute(sql)
                    names = [d[0] for d in cur.description]
                    out += [dict(zip(names, r)) for r in cur.fetchall()]
                return out
            times, rows = timed_runs(run, args.runs)
            R[label][q["key"]] = (times, summary(q, 1, rows))
            log(f"  {label} {q['key']}: p50 {fmt_ms(pct(times, 50))} ms, {len(rows)} rows")
    seg.close()
    tab.close()


def phase_influx(args, work: Path, queries: list[dict], R: dict) -> None:
    root = work / "influxdb"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    srv, port = start_influx(args.influxd, root, work / "influxd.log")
    influx_create_db(port)
    log(f"influxd up on 127.0.0.1:{port}; ingesting with {args.clients} clients")
    ing = ingest(port, f"/write?db={DB}&precision=s", list(range(len(BODIES))), args.clients)
    R["influx_ingest"] = ing
    R["influx_hwm_ingest"] = vm_hwm_bytes(srv.pid)
    log(f"InfluxDB ingest: {ing['rows_per_s']:,.0f} rows/s ({ing['secs']:.1f} s), {len(ing['errors'])} failed bodies; "
        f"VmHWM {fmt_bytes(R['influx_hwm_ingest'])}")
    R["influx_after_ingest"] = (dir_bytes(root / "data"), dir_bytes(root / "wal"))
    # Let the cache snapshot (10 s cold) and the full compaction (30 s cold) run: wait
    # until the WAL is (nearly) empty and the size has not moved for 20 s, at most 5 min.
    t0, last, stable_since = time.monotonic(), None, time.monotonic()
    while time.monotonic() - t0 < 300:
        time.sleep(5)
        size = (dir_bytes(root / "data"), dir_bytes(root / "wal"))
        if size != last:
            last, stable_since = size, time.monotonic()
        elif size[1] < 1 << 20 and time.monotonic() - stable_since >= 20 and time.monotonic() - t0 >= 45:
            break
    R["influx_settle_secs"] = time.monotonic() - t0
    R["influx_disk"] = (dir_bytes(root / "data"), dir_bytes(root / "wal"))
    client = Client(port)
    st, b = influx_q(client, "; ".join(f"SELECT count({ANY_FIELD[t]}) FROM {t}" for t in TABLES))
    R["influx_rows"] = sum(r.get("count", 0) for r in influx_rows(b)) if st == 200 else None
    log(f"InfluxDB settled after {R['influx_settle_secs']:.0f} s: {R['influx_rows']} rows, "
        f"data {R['influx_disk'][0]:,} B, wal {R['influx_disk'][1]:,} B; running the queries")
    R["influx_q"] = {}
    for q in queries:
        def run(q=q):
            out = []
            for stmt in q["influx"]:
                st, b = influx_q(client, stmt, "s" if "influx_filter" in q else None)
                if st != 200:
                    raise RuntimeError(f"InfluxDB {q['key']} answered {st}: {b[:300]!r}")
                rows = influx_rows(b)
                if "influx_filter" in q:  # done client-side: InfluxQL cannot filter on last()
                    rows = [r for r in rows if r["time"] < q["influx_filter"]]
                out += rows
            return out
        times, rows = timed_runs(run, args.runs)
        R["influx_q"][q["key"]] = (times, summary(q, 2, rows))
        log(f"  influx {q['key']}: p50 {fmt_ms(pct(times, 50))} ms, {len(rows)} rows")
    client.close()
    ka = Client(port, keepalive=True)
    R["influx_q1_keepalive"], _ = timed_runs(lambda: influx_q(ka, queries[0]["influx"][0]), args.runs)
    def q3_keepalive():
        for stmt in queries[2]["influx"]:
            st, b = influx_q(ka, stmt)
            if st != 200:
                raise RuntimeError(f"InfluxDB q3 (kept-alive) answered {st}: {b[:300]!r}")
            influx_rows(b)  # parsed, as on new connections
    R["influx_q3_keepalive"], _ = timed_runs(q3_keepalive, args.runs)
    ka.close()
    R["influx_hwm"] = vm_hwm_bytes(srv.pid)
    stop(srv)


def phase_ingest_large(args, work: Path, R: dict, influx: bool) -> None:
    """A second ingest of the same lines in bodies of LINES_PER_BODY_LARGE lines, into a
    fresh citytsdb (and a fresh InfluxDB): rows/s, write latency and VmHWM at its end."""
    resplit_bodies(LINES_PER_BODY_LARGE)
    R["large_bodies"] = len(BODIES)
    indices = list(range(len(BODIES)))
    data = work / "citytsdb10k"
    shutil.rmtree(data, ignore_errors=True)
    srv, port, _ = start_citytsdb(args.bin, data, work / "citytsdb10k.log", [])
    log(f"citytsdb (fresh) up on 127.0.0.1:{port}; ingesting {R['lines']:,} lines in {len(BODIES)} bodies "
        f"of {LINES_PER_BODY_LARGE:,} lines with {args.clients} clients")
    try:
        ing = ingest(port, f"/api/v1/write?db={DB}&precision=s", indices, args.clients)
        R["city_ingest10k"] = ing
        R["city_hwm10k"] = vm_hwm_bytes(srv.pid)
        log(f"citytsdb ingest ({LINES_PER_BODY_LARGE:,}-line bodies): {ing['rows_per_s']:,.0f} rows/s "
            f"({ing['secs']:.1f} s), {len(ing['errors'])} failed bodies; VmHWM {fmt_bytes(R['city_hwm10k'])}")
    finally:
        stop(srv)
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)
    if not influx:
        return
    root = work / "influxdb10k"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        srv, port = start_influx(args.influxd, root, work / "influxd10k.log")
        try:
            influx_create_db(port)
            log(f"influxd (fresh) up on 127.0.0.1:{port}; ingesting {len(BODIES)} bodies of "
                f"{LINES_PER_BODY_LARGE:,} lines with {args.clients} clients")
            ing = ingest(port, f"/write?db={DB}&precision=s", indices, args.clients)
            R["influx_ingest10k"] = ing
            R["influx_hwm10k"] = vm_hwm_bytes(srv.pid)
            log(f"InfluxDB ingest ({LINES_PER_BODY_LARGE:,}-line bodies): {ing['rows_per_s']:,.0f} rows/s "
                f"({ing['secs']:.1f} s), {len(ing['errors'])} failed bodies; VmHWM {fmt_bytes(R['influx_hwm10k'])}")
        finally:
            stop(srv)
    except Exception as e:  # noqa: BLE001
        R["warnings"].append(f"InfluxDB {LINES_PER_BODY_LARGE:,}-line ingest failed: {e} (log: {work / 'influxd10k.log'})")
    finally:
        if not args.keep_data:
            shutil.rmtree(root, ignore_errors=True)


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def parse_log_time(s: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def phase_restart(args, work: Path, R: dict) -> None:
    data = work / "restart"
    shutil.rmtree(data, ignore_errors=True)
    logf = work / "restart.log"
    if logf.exists():
        logf.unlink()
    extra = ["--flush-rows", "1000000000", "--flush-interval", "24h"]
    srv, port, _ = start_citytsdb(args.bin, data, logf, extra)
    want = min(args.restart_rows, R["lines"])
    idx, n = [], 0
    for i, c in enumerate(BODY_LINES):
        if n >= want:
            break
        idx.append(i)
        n += c
    log(f"restart: writing {n:,} lines to a server that will not flush, then kill -9")
    ing = ingest(port, f"/api/v1/write?db={DB}&precision=s", idx, args.clients)
    if ing["errors"]:
        raise RuntimeError(f"restart load failed: {ing['errors'][:3]}")
    count_sql = "SELECT sum(c) AS n FROM (" + " UNION ALL ".join(
        f"SELECT count(*) AS c FROM {t}" for t in TABLES) + ") AS t"
    client = Client(port)
    st, b = city_sql(client, count_sql)
    client.close()
    expected = int(city_rows(b)[0]["n"])
    R["restart_lines"] = n
    R["restart_expected"] = expected
    R["restart_wal_bytes"] = dir_bytes(data / "wal")
    R["restart_store_bytes"] = dir_bytes(data / "store")
    srv.kill()
    srv.wait(timeout=30)
    # Restart: spawn -> first healthy /health -> first correct count.
    port2 = free_port()
    cmd = [str(args.bin), "serve", "--data-dir", str(data), "--http-bind", f"127.0.0.1:{port2}", *extra]
    wall_spawn = time.time()
    t_spawn = time.perf_counter()
    srv2 = spawn(cmd, logf, env=dict(os.environ, NO_COLOR="1"))
    t_health = wait_healthy(port2, "/health", srv2, timeout=600, poll=0.002)
    client = Client(port2)
    deadline = time.perf_counter() + 600
    t_count, got = None, None
    while time.perf_counter() < deadline:
        try:
            st, b = city_sql(client, count_sql)
            if st == 200:
                got = int(city_rows(b)[0]["n"])
                if got == expected:
                    t_count = time.perf_counter()
                    break
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.002)
    client.close()
    R["restart_health_s"] = t_health - t_spawn
    R["restart_count_s"] = (t_count - t_spawn) if t_count else None
    R["restart_count_got"] = got
    # The server logs "replayed the WAL ... rows=N" once the replay is done.
    replay_rows = replay_at = None
    text = ANSI_RE.sub("", logf.read_text(errors="replace"))
    for line in text.splitlines():
        if "replayed the WAL" in line:
            m = re.search(r"\brows=(\d+)", line)
            ts = parse_log_time(line.split()[0])
            if m and ts:
                replay_rows, replay_at = int(m.group(1)), ts
    R["restart_replay_rows"] = replay_rows
    R["restart_replay_s"] = (replay_at - wall_spawn) if replay_at else None
    R["restart_hwm"] = vm_hwm_bytes(srv2.pid)
    stop(srv2)
    log(f"restart: /health after {R['restart_health_s']:.3f} s, correct count after "
        f"{R['restart_count_s'] if R['restart_count_s'] is not None else float('nan'):.3f} s, "
        f"replay logged after {R['restart_replay_s']} s for {replay_rows} rows")


def phase_alert(args, R: dict) -> None:
    exe = args.alert_bin
    if exe is None:
        for c in (REPO / "target/release/alert_latency", REPO / "target/debug/alert_latency"):
            if c.is_file():
                exe = c
                break
    if exe is None or not Path(exe).is_file():
        R["alert"] = None
        R["alert_note"] = "alert_latency binary not found (cargo build --workspace --all-targets)"
        return
    cmd = [str(exe), "--bin", str(args.bin), "--probes", str(args.probes)]
    if args.quick:
        cmd += ["--duration", "20"]
    R["alert_cmd"] = " ".join(cmd)
    log(f"alert latency: {R['alert_cmd']}")
    out_path = Path(args.work) / "alert_latency.out"
    p = spawn(cmd, out_path, own_group=True, cwd=REPO)
    try:
        p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    text = out_path.read_text(errors="replace")
    R["alert"] = None
    for line in text.splitlines():
        if line.startswith("| alert latency: write ack -> webhook receipt"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            def ms(s):
                m = re.match(r"([\d.,]+)\s*(ms|s|µs)", s)
                if not m:
                    return float("nan")
                v = float(m.group(1).replace(",", ""))
                return v * 1000 if m.group(2) == "s" else v / 1000 if m.group(2) == "µs" else v
            R["alert"] = {"n": cells[1], "p50": ms(cells[2]), "p90": ms(cells[3]), "p99": ms(cells[4]),
                          "max": ms(cells[5]), "lost": cells[6]}
        if line.startswith("alert latency (write ack"):
            R["alert_load"] = line
    if R["alert"] is None:
        R["alert_note"] = f"alert_latency exited {p.returncode} without a result (see {out_path})"


# --------------------------------------------------------------------------- report

def report(args, R: dict, queries: list[dict]) -> str:
    has_influx = "influx_ingest" in R
    has_duck = "duck_seg" in R
    L = []
    L.append(f"City workload, side by side: {args.devices:,} devices x {args.days} days "
             f"(`{R['gen_command']}`), {R['lines']:,} lines ({R['lp_bytes']:,} B), "
             f"{R['float_values']:,} float field values, {R['bodies']:,} bodies of {LINES_PER_BODY:,} lines"
             + (f" (and {R['large_bodies']:,} of {LINES_PER_BODY_LARGE:,} for the second ingest)"
                if "large_bodies" in R else ""))
    L.append("")
    L.append(f"- command: `{R['command']}`")
    L.append(f"- date: {R['date']}; machine: {os.cpu_count()} CPUs (`nproc`), {cpu_model()}; the clients, "
             f"DuckDB and the servers share these CPUs")
    L.append(f"- load average (1/5/15 min) at the start: {R['load_start']}; at the end: {R['load_end']}")
    L.append(f"- citytsdb: `{args.bin}` ({profile_of(args.bin)}); DuckDB {R.get('duck_version', '-')} "
             f"(Python, in-process, {R.get('duck_threads', '-')} threads); "
             f"InfluxDB: {R.get('influx_version', 'not run')}")
    L.append("- ratios: peer / citytsdb for times, bytes and memory, citytsdb / peer for rows/s: "
             "**a ratio above 1 means citytsdb is better**; query cells are p50 / p95 in ms over "
             f"{args.runs} runs after 2 warm-ups; ratios use the p50")
    L.append("")
    hdr = ["metric", "citytsdb", "DuckDB (segments)", "DuckDB (table)", "InfluxDB 1.x", "ratio(s)", "DESIGN.md target", "met?"]
    rows = []
    NR = "not run"
    infl = (lambda s: s) if has_influx else (lambda s: NR)

    # ingest
    ingest_target = ">= 1,200,000 rows/s and >= 4x InfluxDB 1.x"

    def ingest_met(c: dict, i: dict | None) -> str:
        return met([c["rows_per_s"] >= 1.2e6 and not c["errors"],
                    c["rows_per_s"] / i["rows_per_s"] >= 4 if i and i["rows_per_s"] else None])

    ci = R["city_ingest"]
    ii = R.get("influx_ingest")
    rows.append([f"ingest rows/s, HTTP line protocol, {LINES_PER_BODY:,}-line bodies, {args.clients} clients, "
                 "every write acked (204)",
                 fmt_int(ci["rows_per_s"]), "-", "-",
                 fmt_int(ii["rows_per_s"]) if ii else NR,
                 f"vs InfluxDB {ratio(ci['rows_per_s'], ii['rows_per_s'])}" if ii else "-",
                 ingest_target, ingest_met(ci, ii)])
    rows.append(["  5,000-line write latency p50 / p99 (ms)",
                 f"{fmt_ms(ci['batch_p50_ms'])} / {fmt_ms(ci['batch_p99_ms'])}", "-", "-",
                 f"{fmt_ms(ii['batch_p50_ms'])} / {fmt_ms(ii['batch_p99_ms'])}" if ii else NR,
                 f"InfluxDB {ratio(ii['batch_p50_ms'], ci['batch_p50_ms'])} (p50)" if ii else "", "", ""])
    ch_i, ih_i = R.get("city_hwm_ingest"), R.get("influx_hwm_ingest")
    rows.append(["  peak memory of the server right after that ingest, before the flush (VmHWM)",
                 fmt_bytes(ch_i), "-", "-", fmt_bytes(ih_i) if ih_i else infl("-"),
                 f"InfluxDB {ratio(ih_i, ch_i)}" if ih_i and ch_i else "",
                 "bounded by the write buffer (notes)", "not judged by one run"])
    c10, i10 = R.get("city_ingest10k"), R.get("influx_ingest10k")
    big = f"{LINES_PER_BODY_LARGE:,}"
    if c10:
        rows.append([f"ingest rows/s, HTTP line protocol, {big}-line bodies, {args.clients} clients, "
                     "fresh servers, every write acked (204)",
                     fmt_int(c10["rows_per_s"]), "-", "-",
                     fmt_int(i10["rows_per_s"]) if i10 else NR,
                     f"vs InfluxDB {ratio(c10['rows_per_s'], i10['rows_per_s'])}" if i10 else "-",
                     ingest_target, ingest_met(c10, i10)])
        rows.append([f"  {big}-line write latency p50 / p99 (ms)",
                     f"{fmt_ms(c10['batch_p50_ms'])} / {fmt_ms(c10['batch_p99_ms'])}", "-", "-",
                     f"{fmt_ms(i10['batch_p50_ms'])} / {fmt_ms(i10['batch_p99_ms'])}" if i10 else NR,
                     f"InfluxDB {ratio(i10['batch_p50_ms'], c10['batch_p50_ms'])} (p50)" if i10 else "", "", ""])
        ch10, ih10 = R.get("city_hwm10k"), R.get("influx_hwm10k")
        rows.append([f"  peak memory of the server at the end of its {big}-line ingest (VmHWM)",
                     fmt_bytes(ch10), "-", "-", fmt_bytes(ih10) if ih10 else NR,
                     f"InfluxDB {ratio(ih10, ch10)}" if ih10 and ch10 else "",
                     "bounded by the write buffer (notes)", "not judged by one run"])
    else:
        rows.append([f"ingest rows/s, {big}-line bodies", NR, "-", "-", NR, "", ingest_target, "-"])
    # storage
    lines, stored = R["lines"], R["city_rows"] or R["lines"]
    fv = R["float_values"]
    city_b = R["city_live_store_bytes"]
    duck_b = R.get("duck_table_bytes")
    infl_b = sum(R["influx_disk"]) if has_influx else None
    rows.append(["storage, bytes per row (after flush; citytsdb: live Parquet + index + series + catalog)",
                 f"{city_b / stored:.2f}", "(same files)",
                 f"{duck_b / stored:.2f}" if duck_b else "-",
                 f"{infl_b / stored:.2f}" if infl_b else infl("-"),
                 "; ".join(x for x in [f"DuckDB table {ratio(duck_b, city_b)}" if duck_b else "",
                                        f"InfluxDB {ratio(infl_b, city_b)}" if infl_b else ""] if x),
                 "", ""])
    fcb, fvs = R["city_float_col_bytes"], R["city_float_values_stored"]
    rows.append(["storage, bytes per float value: float columns' Parquet column chunks / stored float values",
                 f"{fcb / fvs:.3f}" if fvs else "-", "(same files)", "-", "-", "",
                 "<= 0.5 bytes per float value", "yes" if fvs and fcb / fvs <= 0.5 else "no"])
    rows.append(["storage, all bytes / float values in the data (every column, tags and timestamps included)",
                 f"{city_b / fv:.2f}", "(same files)",
                 f"{duck_b / fv:.2f}" if duck_b else "-",
                 f"{infl_b / fv:.2f}" if infl_b else infl("-"),
                 "; ".join(x for x in [f"DuckDB table {ratio(duck_b, city_b)}" if duck_b else "",
                                        f"InfluxDB {ratio(infl_b, city_b)}" if infl_b else ""] if x),
                 "", ""])
    rows.append(["WAL bytes per row (restart phase: every row still in the WAL)",
                 f"{R['restart_wal_bytes'] / R['restart_lines']:.1f}" if R.get("restart_lines") else "-",
                 "-", "-",
                 "-" if has_influx else NR,
                 "", "", ""])
    # queries
    # (text, met? from citytsdb's and DuckDB-over-segments' p50, whether it needs DuckDB)
    q3_target = "< 5 ms in total for 10^4 devices, from memory"
    if args.devices < 10_000:
        q3_target += f" (measured with {args.devices:,})"
    targets = {
        "q1": ("p50 < 3 ms; >= 5x faster than DuckDB over the same files (target is for 30 days)",
               lambda c, s: c < 3 and s / c >= 5, True),
        "q2": ("no slower than DuckDB over the same files", lambda c, s: s / c >= 1, True),
        "q3": (q3_target, lambda c, s: c < 5, False),
        "q6": ("no slower than DuckDB over the same files", lambda c, s: s / c >= 1, True),
    }
    for q in queries:
        k = q["key"]
        c_t, c_s = R["city_q"][k]
        cells = [f"{q['name']}", f"{fmt_ms(pct(c_t, 50))} / {fmt_ms(pct(c_t, 95))}"]
        rat = []
        for label, name in (("duck_seg", "DuckDB segments"), ("duck_tab", "DuckDB table"), ("influx_q", "InfluxDB")):
            if label in R:
                t, _s = R[label][k]
                cells.append(f"{fmt_ms(pct(t, 50))} / {fmt_ms(pct(t, 95))}")
                rat.append(f"{name} {ratio(pct(t, 50), pct(c_t, 50))}")
            else:
                cells.append(NR if label == "influx_q" else "-")
        cells.append("; ".join(rat))
        if k in targets and (has_duck or not targets[k][2]):
            text, fn, _ = targets[k]
            ok = fn(pct(c_t, 50), pct(R["duck_seg"][k][0], 50) if has_duck else None)
            cells += [text, "yes" if ok else "no"]
        elif k in targets:
            cells += [targets[k][0], "- (DuckDB not run)"]
        else:
            cells += ["-", "-"]
        rows.append(cells)
        if k == "q1":
            ck, ik = R["city_q1_keepalive"], R.get("influx_q1_keepalive")
            c50 = pct(ck, 50)
            peers = [pct(R[lb]["q1"][0], 50) if lb in R else None for lb in ("duck_seg", "duck_tab")]
            peers.append(pct(ik, 50) if ik else None)
            rows.append(["  the same one device's day, over one kept-alive HTTP connection",
                         f"{fmt_ms(c50)} / {fmt_ms(pct(ck, 95))}", "-", "-",
                         f"{fmt_ms(pct(ik, 50))} / {fmt_ms(pct(ik, 95))}" if ik else infl("-"),
                         "; ".join(f"{name} {ratio(x, c50)}" for name, x in
                                   zip(("DuckDB segments", "DuckDB table", "InfluxDB (kept-alive)"), peers) if x),
                         "p50 < 1.5 ms over HTTP on a kept-alive connection; faster than InfluxDB 1.x and "
                         "DuckDB in-process",
                         met([c50 < 1.5] + [c50 < x if x else None for x in peers])])
        if k == "q3":
            ck3, ik3 = R["city_q3_keepalive"], R.get("influx_q3_keepalive")
            rows.append(["  the same four requests, one after another over one kept-alive HTTP connection",
                         f"{fmt_ms(pct(ck3, 50))} / {fmt_ms(pct(ck3, 95))}", "-", "-",
                         f"{fmt_ms(pct(ik3, 50))} / {fmt_ms(pct(ik3, 95))}" if ik3 else infl("-"),
                         f"InfluxDB {ratio(pct(ik3, 50), pct(ck3, 50))} (kept-alive)" if ik3 else "",
                         q3_target, "yes" if pct(ck3, 50) < 5 else "no"])
    # alert
    a = R.get("alert")
    if a:
        rows.append([f"alert latency, fast-path rule, write ack -> webhook (p50 / p99 ms; {a['n']} probes, {a['lost']} lost)",
                     f"{fmt_ms(a['p50'])} / {fmt_ms(a['p99'])}", "-", "-", "-", "",
                     "p99 < 50 ms", "yes" if a["p99"] < 50 and a["lost"] == "0" else "no"])
    else:
        rows.append(["alert latency, fast-path rule", "not run", "-", "-", "-", "", "p99 < 50 ms", "-"])
    # restart
    if "restart_health_s" in R:
        rr, rs = R.get("restart_replay_rows"), R.get("restart_replay_s")
        rate = rr / rs if rr and rs else None
        rows.append([f"restart after kill -9 with {R['restart_lines']:,} lines in the WAL: spawn -> first /health 200 (s)",
                     f"{R['restart_health_s']:.3f}", "-", "-", "-", "", "", ""])
        rows.append(["  spawn -> first correct SELECT count(*) (s)",
                     f"{R['restart_count_s']:.3f}" if R["restart_count_s"] else f"never (got {R['restart_count_got']})",
                     "-", "-", "-", "", "", ""])
        rows.append(["  WAL replay rows/s (rows replayed / spawn -> 'replayed the WAL' log line)",
                     fmt_int(rate) if rate else "-", "-", "-", "-", "",
                     ">= 1,000,000 rows/s", "yes" if rate and rate >= 1e6 else "no"])
    else:
        rows.append(["restart / WAL replay", "not run", "-", "-", "-", "", ">= 1,000,000 rows/s", "-"])
    # memory
    ch, ih = R.get("city_hwm"), R.get("influx_hwm")
    rows.append(["peak memory of the server (VmHWM, end of its ingest + flush + queries)",
                 fmt_bytes(ch), "-", "-", fmt_bytes(ih) if ih else infl("-"),
                 f"InfluxDB {ratio(ih, ch)}" if ih and ch else "",
                 "bounded by configuration", "not judged by one run"])
    # binary
    cb_, ib_ = R["city_bin_bytes"], R.get("influxd_bin_bytes")
    rows.append(["size of the server binary (MB; citytsdb: --bin, InfluxDB: influxd)",
                 f"{cb_ / 1e6:.1f}", "-", "-", f"{ib_ / 1e6:.1f}" if ib_ else "-",
                 f"InfluxDB {ratio(ib_, cb_)}" if ib_ else "",
                 "tens of MB", "yes" if cb_ < 100e6 else "no"])

    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
    def line(r):
        return "| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) + " |"
    L.append(line(hdr))
    L.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    L += [line(r) for r in rows]
    L.append("")
    # notes
    notes = []
    notes.append(f"citytsdb ingest: {ci['acked_lines']:,} of {ci['lines']:,} lines acked in {ci['secs']:.1f} s"
                 + (f"; {len(ci['errors'])} bodies failed, first: {ci['errors'][0]}" if ci["errors"] else "")
                 + f"; WAL at the end of ingest {R['city_wal_before_flush']:,} B (rows not yet flushed by "
                 f"--flush-rows 1,000,000 / --flush-interval 60s, the defaults), store {R['city_store_before_flush']:,} B; "
                 f"final flush: {R['city_flush'][1]} in {R['city_flush'][2]:.1f} s"
                 + (f"; then POST /api/v1/compact: {R['city_compact'][1]} in {R['city_compact'][2]:.1f} s"
                    if R.get("city_compact", (404,))[0] == 200 else "; no POST /api/v1/compact (404)"))
    notes.append(f"citytsdb store after the flush: {R['city_segments']} live segments, Parquet {R['city_parquet_bytes']:,} B, "
                 f"index {R['city_index_bytes']:,} B, series {R['city_series_bytes']:,} B, catalog {R['city_catalog_bytes']:,} B; "
                 f"the whole store directory is {R['city_store_du']:,} B; {R['city_rows']:,} rows stored of {lines:,} lines "
                 f"(retried lines merge); float columns {fcb:,} B for {fvs:,} stored values; every column chunk "
                 f"{R['city_colchunk_bytes']:,} B")
    notes.append("citytsdb write buffer (every citytsdb server here but the restart phase's, started without "
                 "flags; `citytsdb serve --help` defaults unless the environment sets them): "
                 + ", ".join(R["city_buffer_settings"])
                 + f"; the peak memory rows read VmHWM from /proc/<pid>/status")
    notes.append(f"threads: citytsdb {os.cpu_count()} (one query worker per CPU), "
                 + (f"DuckDB {R['duck_threads']} (current_setting('threads'))" if "duck_threads" in R
                    else "DuckDB not run"))
    notes.append(f"binaries: citytsdb `{args.bin}` {R['city_bin_bytes']:,} B ({profile_of(args.bin)}); "
                 + (f"InfluxDB `{args.influxd}` {R['influxd_bin_bytes']:,} B" if R.get("influxd_bin_bytes")
                    else f"InfluxDB `{args.influxd}` not found"))
    if c10:
        notes.append(f"{big}-line ingest (fresh servers, data deleted after): citytsdb {c10['acked_lines']:,} of "
                     f"{c10['lines']:,} lines acked in {c10['secs']:.1f} s"
                     + (f"; {len(c10['errors'])} bodies failed, first: {c10['errors'][0]}" if c10["errors"] else "")
                     + (f"; InfluxDB {i10['acked_lines']:,} of {i10['lines']:,} in {i10['secs']:.1f} s"
                        + (f"; {len(i10['errors'])} bodies failed, first: {i10['errors'][0]}" if i10["errors"] else "")
                        if i10 else ""))
    if R.get("city_lvc") is False:
        notes.append("WARNING: EXPLAIN ANALYZE of the latest-per-device query shows no LastValueCacheExec")
    if has_duck:
        notes.append(f"DuckDB (segments): read_parquet over the {R['city_segments']} Parquet files the newest catalog lists "
                     f"(views per table, no hive partitioning: the layout is segments/<db>/<table>/<day>/); "
                     f"DuckDB (table): CREATE TABLE AS SELECT from those files into {R['duck_table_bytes']:,} B "
                     f"(load {R['duck_load_secs']:.1f} s, not timed); DuckDB runs in this process, without HTTP or "
                     "serialisation, and returns Python tuples; time_bucket stands in for date_bin")
    if has_influx:
        ia, idisk = R["influx_after_ingest"], R["influx_disk"]
        notes.append(f"InfluxDB ingest: {ii['acked_lines']:,} of {ii['lines']:,} lines acked in {ii['secs']:.1f} s"
                     + (f"; {len(ii['errors'])} bodies failed, first: {ii['errors'][0]}" if ii["errors"] else "")
                     + f" (wal-fsync-delay 0s: fsync before every ack, inmem index); right after ingest data "
                     f"{ia[0]:,} B + wal {ia[1]:,} B; after {R['influx_settle_secs']:.0f} s idle (cache snapshot "
                     f"after 10 s cold, full compaction after 30 s cold, both lowered from 10m/4h so that the "
                     f"measurement sees compacted TSM) data {idisk[0]:,} B + wal {idisk[1]:,} B; it counts "
                     f"{R['influx_rows']} rows")
        notes.append("InfluxQL: q2/q4 GROUP BY time() ... fill(none) with the same time bounds; q3 last(*) per device "
                     "(each field's last value on its own); q5 last(<one field>) GROUP BY device per table, "
                     "filtered client-side (InfluxQL cannot filter on a selector's time), inside the timing; "
                     "q6 top(tilt_deg, device, 10)")
    notes.append("HTTP queries (citytsdb, InfluxDB) open a new connection per request and read the whole "
                 "answer (citytsdb: format=jsonl); the 'kept-alive' rows send the same q1, and q3's four "
                 "requests one after another, over one persistent connection")
    notes.append("q3 is four requests (one per table, 10^4 devices in all at the default size), timed together; "
                 "citytsdb answers q5 from system.devices (in memory), DuckDB with a GROUP BY max(time) over "
                 "every table")
    if R.get("alert_cmd"):
        notes.append(f"alert latency: `{R['alert_cmd']}` (its own load: 10,000 covers at 100,000 rows/s)"
                     + (f"; {R['alert_load']}" if R.get("alert_load") else ""))
    if R.get("alert_note"):
        notes.append(f"alert latency: {R['alert_note']}")
    if "restart_health_s" in R:
        notes.append(f"restart: --flush-rows 1e9 --flush-interval 24h, {R['restart_lines']:,} lines written "
                     f"({R['restart_expected']:,} rows), WAL {R['restart_wal_bytes']:,} B, kill -9; the log "
                     f"says {R['restart_replay_rows']} rows replayed, logged {R['restart_replay_s'] or float('nan'):.3f} s "
                     f"after spawn (process start + catalog load + replay); VmHWM after the restart "
                     f"{fmt_bytes(R.get('restart_hwm'))}")
    for w in R["warnings"]:
        notes.append(f"WARNING: {w}")
    L += [f"- {n}" for n in notes]
    return "\n".join(L) + "\n"


def check_answers(queries: list[dict], R: dict) -> None:
    for q in queries:
        k = q["key"]
        ref = R["city_q"][k][1]
        for label, name in (("duck_seg", "DuckDB (segments)"), ("duck_tab", "DuckDB (table)"), ("influx_q", "InfluxDB")):
            if label not in R:
                continue
            other = R[label][k][1]
            if label == "influx_q" and k == "q3":
                ok = other[0] == ref[0] and set(other[1]) == set(ref[1])
            else:
                ok = agree(ref, other)
            if not ok:
                R["warnings"].append(f"{k}: {name} gives {other[0]} rows, citytsdb {ref[0]}"
                                     + ("" if other[0] != ref[0] else " (values differ)"))


def main() -> int:
    default_bin = REPO / "target/release/citytsdb"
    if not default_bin.is_file():
        default_bin = REPO / "target/debug/citytsdb"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=default_bin, help="citytsdb binary (default %(default)s)")
    ap.add_argument("--influxd", type=Path, default=Path("/usr/bin/influxd"), help="InfluxDB 1.x server (default %(default)s)")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--clients", type=int, default=4, help="concurrent writer processes (default 4)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs of each query (default 20)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 devices x 1 day, 5 runs, few probes")
    ap.add_argument("--markdown", type=Path, help="append the result table to this file as markdown")
    ap.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary directory, removed)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep city.lp and every server's data in the workdir (default: each is deleted once measured)")
    ap.add_argument("--probes", type=int, default=200, help="alert_latency probes (default 200)")
    ap.add_argument("--alert-bin", type=Path, help="the alert_latency binary (default target/{release,debug}/alert_latency)")
    ap.add_argument("--restart-rows", type=int, default=5_000_000,
                    help="lines in the WAL for the restart measurement (default 5,000,000)")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: influx,duckdb,alert,restart,ingest10k")
    args = ap.parse_args()
    if args.quick:
        args.devices, args.days, args.runs, args.probes = 500, 1, 5, 30
        args.restart_rows = min(args.restart_rows, 100_000)
    args.bin = args.bin.resolve() if args.bin.exists() else args.bin
    if not args.bin.is_file():
        print(f"citytsdb binary {args.bin} not found: cargo build --workspace --all-targets, or pass --bin", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "influx" not in skip and not args.influxd.is_file():
        print(f"{args.influxd} not found: InfluxDB 1.x column not run. Install it with "
              "`apt-get install influxdb` (Debian; put a policy-rc.d that exits 101 first so the "
              "package does not start a service), or pass --influxd.", file=sys.stderr)
        skip.add("influx")

    tmp = None
    if args.workdir:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="city_bench.")
        work = Path(tmp)
        atexit.register(shutil.rmtree, tmp, True)
    args.work = work

    R: dict = {"warnings": [], "command": " ".join(["python3", "benches/city_bench.py", *sys.argv[1:]]), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    R["load_start"] = loadavg()
    queries = build_queries(args.devices, args.days)
    log(f"citytsdb {args.bin} ({profile_of(args.bin)}), workdir {work}")

    # Generated straight into memory (and to city.lp with --keep-data), then split.
    t = time.perf_counter()
    gen = [str(args.bin), "gen", "--devices", str(args.devices), "--days", str(args.days),
           "--start", iso(START), "--seed", str(SEED)]
    R["gen_command"] = " ".join(["citytsdb", *gen[1:]])
    global BODIES, BODY_LINES
    copy = open(work / "city.lp", "wb") if args.keep_data else None
    p = subprocess.Popen(gen, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    CHILDREN.append(p)
    try:
        BODIES, BODY_LINES, fields, floats = load_bodies(p.stdout, LINES_PER_BODY, copy)
    finally:
        if copy is not None:
            copy.close()
    if p.wait(timeout=60) != 0:
        raise RuntimeError(f"{R['gen_command']} exited with {p.returncode}")
    R["lines"], R["field_values"], R["float_values"] = sum(BODY_LINES), fields, floats
    R["lp_bytes"] = sum(len(b) for b in BODIES)
    R["bodies"] = len(BODIES)
    log(f"generated {R['lines']:,} lines ({R['lp_bytes']:,} B), {fields:,} field values of which "
        f"{floats:,} floats, {len(BODIES)} bodies ({time.perf_counter() - t:.1f} s); "
        f"{shutil.disk_usage(work).free / 2**30:.1f} GiB free in {work}")

    try:
        import duckdb
        R["duck_version"] = duckdb.__version__
    except Exception as e:  # noqa: BLE001
        skip.add("duckdb")
        R["warnings"].append(f"DuckDB not available: {e}")
    R["city_bin_bytes"] = args.bin.stat().st_size
    R["influxd_bin_bytes"] = args.influxd.stat().st_size if args.influxd.is_file() else None
    R["city_buffer_settings"] = serve_settings(
        args.bin, ["--max-buffer-size", "--flush-rows", "--flush-interval", "--max-body-size"])
    if "influx" not in skip:
        try:
            v = subprocess.run([str(args.influxd), "version"], capture_output=True, text=True, timeout=30).stdout.strip()
            R["influx_version"] = v or "InfluxDB 1.x"
        except (OSError, subprocess.SubprocessError):
            R["influx_version"] = "InfluxDB 1.x"

    phase_citytsdb(args, work, queries, R)
    if "duckdb" not in skip:
        phase_duckdb(args, work, queries, R)
    if not args.keep_data:  # the disk is shared: drop each phase's data once measured
        shutil.rmtree(work / "citytsdb", ignore_errors=True)
        for f in (work / "duck.db", work / "duck.db.wal"):
            f.unlink(missing_ok=True)
    if "influx" not in skip:
        try:
            phase_influx(args, work, queries, R)
        except Exception as e:  # noqa: BLE001
            R["warnings"].append(f"InfluxDB phase failed: {e} (log: {work / 'influxd.log'})")
            for k in ("influx_ingest", "influx_q"):
                R.pop(k, None)
        if not args.keep_data:
            shutil.rmtree(work / "influxdb", ignore_errors=True)
    if "restart" not in skip:
        phase_restart(args, work, R)
        if not args.keep_data:
            shutil.rmtree(work / "restart", ignore_errors=True)
    if "ingest10k" not in skip:  # last of the phases that use the bodies: it re-splits them
        phase_ingest_large(args, work, R, "influx" not in skip)
    if "alert" not in skip:
        phase_alert(args, R)
    R["load_end"] = loadavg()
    check_answers(queries, R)
    # Nothing of the bodies is needed any more.
    text = report(args, R, queries)
    print()
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
