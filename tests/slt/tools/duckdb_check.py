#!/usr/bin/env python3
"""Cross-checks the golden answers of tests/slt/*.slt with DuckDB.

    python3 tests/slt/tools/duckdb_check.py [-v] [FILES...]

Loads tests/slt/data/city.lp into DuckDB (parsed here, repeated series+time merged
field by field, last write wins), runs every `query` record of the files there
(after a few translations: date_bin, time_bucket, to_unixtime), prints DuckDB's
answer with the runner's rules (floats to 9 significant digits, NULL, (empty)) and
compares it with the expected rows. Records DuckDB cannot run (SHOW, system and
information_schema tables, functions it lacks) are listed as skipped; mismatches
are printed in full for review. Not part of the build; needs `pip install duckdb`.
"""

import datetime as dt
import decimal
import os
import re
import sys

import duckdb

HERE = os.path.dirname(os.path.abspath(__file__))
SLT = os.path.dirname(HERE)


def split_unescaped(s, sep, quotes=False):
    out, cur, i, inq = [], [], 0, False
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if quotes and c == '"':
            inq = not inq
        if c == sep and not inq:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def unescape(s):
    return re.sub(r"\\(.)", r"\1", s)


def field_value(v):
    if v.startswith('"'):
        return v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if v in ("t", "T", "true", "True", "TRUE"):
        return True
    if v in ("f", "F", "false", "False", "FALSE"):
        return False
    if v.endswith("i"):
        return int(v[:-1])
    return float(v)


def load_lp(path):
    """table -> (tag names, field names, {(tags, time): {field: value}})"""
    tables = {}
    for raw in open(path, encoding="utf-8"):
        line = raw.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = split_unescaped(line, " ", quotes=True)
        head, fields_s, ts = parts[0], parts[1], int(parts[2])
        series = split_unescaped(head, ",")
        table = unescape(series[0])
        tags = tuple((unescape(k), unescape(v)) for k, v in
                     (split_unescaped(t, "=") for t in series[1:]))
        fields = {}
        for f in split_unescaped(fields_s, ",", quotes=True):
            k, v = f.split("=", 1)
            fields[unescape(k)] = field_value(v)
        tag_names, field_names, rows = tables.setdefault(table, ([], [], {}))
        for k, _ in tags:
            if k not in tag_names:
                tag_names.append(k)
        for k in fields:
            if k not in field_names:
                field_names.append(k)
        rows.setdefault((tags, ts), {}).update(fields)
    return tables


def sql_type(values):
    for v in values:
        if isinstance(v, bool):
            return "BOOLEAN"
        if isinstance(v, int):
            return "BIGINT"
        if isinstance(v, float):
            return "DOUBLE"
        if isinstance(v, str):
            return "VARCHAR"
    return "VARCHAR"


def connect():
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET integer_division = true")
    con.execute("SET default_null_order = 'nulls_last_on_asc_first_on_desc'")
    for table, (tag_names, field_names, rows) in load_lp(os.path.join(SLT, "data", "city.lp")).items():
        cols = ["time"] + tag_names + field_names
        types = ["TIMESTAMPTZ"] + ["VARCHAR"] * len(tag_names) + [
            sql_type([r.get(f) for r in rows.values()]) for f in field_names]
        con.execute(f'CREATE TABLE {table} ({", ".join(f"{c} {t}" for c, t in zip(cols, types))})')
        data = []
        for (tags, ts), fields in rows.items():
            tagd = dict(tags)
            data.append([dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=ts)]
                        + [tagd.get(t) for t in tag_names] + [fields.get(f) for f in field_names])
        con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(cols))})", data)
    con.execute("CREATE MACRO date_bin(i, t, o := TIMESTAMPTZ '1970-01-01 00:00:00+00') AS time_bucket(i, t, CAST(o AS TIMESTAMPTZ))")
    con.execute("CREATE MACRO to_unixtime(t) AS CAST(epoch(t) AS BIGINT)")
    con.execute("CREATE MACRO to_timestamp_seconds(s) AS to_timestamp(s)")
    return con


def fmt_float(v):
    if v == 0:
        return "0.0"
    r = float(f"{v:.8e}")
    s = repr(r)
    if "e" in s or "E" in s:
        s = f"{decimal.Decimal(s):f}"
    if "." not in s:
        s += ".0"
    return s


def render(v):
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (float, decimal.Decimal)):
        return fmt_float(float(v))
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(dt.timezone.utc).replace(tzinfo=None)
        s = v.strftime("%Y-%m-%dT%H:%M:%S")
        if v.microsecond:
            s += ("." + f"{v.microsecond:06d}").rstrip("0")
        return s + "Z"
    if isinstance(v, str):
        if v == "":
            return "(empty)"
        return v.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return str(v)


def records(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.startswith("query ") or line.startswith("query error"):
            i += 1
            continue
        header, start = line, i
        i += 1
        sql = []
        while i < len(lines) and lines[i].strip() and lines[i].rstrip() != "----":
            sql.append(lines[i])
            i += 1
        rows = []
        if i < len(lines) and lines[i].rstrip() == "----":
            i += 1
            while i < len(lines) and lines[i].strip():
                rows.append(lines[i].rstrip())
                i += 1
        yield start + 1, header, "\n".join(sql), rows


def main():
    verbose = "-v" in sys.argv
    files = [a for a in sys.argv[1:] if a != "-v"] or sorted(
        os.path.join(SLT, f) for f in os.listdir(SLT) if f.endswith(".slt"))
    con = connect()
    ok = bad = skipped = 0
    for path in files:
        for line, header, sql, expected in records(path):
            where = f"{os.path.relpath(path)}:{line}"
            if "db=" in header or re.search(r"\b(SHOW|information_schema|system\.)", sql):
                skipped += 1
                continue
            try:
                got = [" ".join(render(v) for v in row) for row in con.execute(sql).fetchall()]
            except Exception as e:  # noqa: BLE001 - any DuckDB failure means "cannot check"
                skipped += 1
                if verbose:
                    print(f"SKIP {where}: {str(e).splitlines()[0]}")
                continue
            want = list(expected)
            if "rowsort" in header.split():
                got.sort()
                want.sort()
            if got == want:
                ok += 1
            else:
                bad += 1
                print(f"DIFF {where}\n  {sql}\n  slt:    " + "\n          ".join(want)
                      + "\n  duckdb: " + "\n          ".join(got))
    print(f"{ok} agree with DuckDB, {bad} differ, {skipped} skipped")


if __name__ == "__main__":
    main()
