#!/usr/bin/env python3
"""DuckDB oracle for the citytsdb end-to-end tests.

Usage: duckdb_oracle.py ROWS.csv QUERIES.json

ROWS.csv holds the rows the server must hold, with a header line; `time` is
`YYYY-MM-DD HH:MM:SS` in UTC and an empty cell is NULL. They are loaded into the
DuckDB table `manhole` (time TIMESTAMP). QUERIES.json is a JSON list of SQL
strings. Prints one JSON list with, per query, the list of its rows as objects,
timestamps written as the server writes them (`2025-12-01T00:05:00Z`, fraction
digits only as needed), DECIMAL as float.

Exits non-zero, with a message on stderr, if DuckDB is missing or a query fails:
the tests then fail rather than pass without an oracle.
"""

import datetime
import decimal
import json
import math
import sys

try:
    import duckdb
except ImportError:
    sys.stderr.write(
        "duckdb_oracle: the Python package `duckdb` is not installed, so the "
        "oracle cannot answer. Run the test command in README.md, which installs "
        "it (python3 -m pip install -r tests/requirements.txt).\n"
    )
    sys.exit(3)

# Column types of the tables the tests load; a CSV column not named here fails.
COLUMN_TYPES = {
    "time": "TIMESTAMP",
    "device": "VARCHAR",
    "district": "VARCHAR",
    "tilt_deg": "DOUBLE",
    "water_level_cm": "DOUBLE",
    "battery_pct": "BIGINT",
    "cover_open": "BOOLEAN",
}


def sql_string(text):
    return "'" + text.replace("'", "''") + "'"


def format_timestamp(value):
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += "." + ("%06d" % value.microsecond).rstrip("0")
    return text + "Z"


def to_json(value):
    if isinstance(value, datetime.datetime):
        return format_timestamp(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("non-finite float %r in an answer" % value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def load(con, csv_path):
    with open(csv_path, encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    unknown = [c for c in header if c not in COLUMN_TYPES]
    if unknown:
        raise SystemExit("duckdb_oracle: no type known for CSV columns %s" % unknown)
    columns = ", ".join("%s: %s" % (sql_string(c), sql_string(COLUMN_TYPES[c])) for c in header)
    con.execute(
        "CREATE TABLE manhole AS SELECT * FROM read_csv(%s, header = true, delim = ',', "
        "quote = '\"', auto_detect = false, nullstr = '', columns = {%s})"
        % (sql_string(csv_path), columns)
    )


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    csv_path, queries_path = argv[1], argv[2]
    with open(queries_path, encoding="utf-8") as f:
        queries = json.load(f)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    load(con, csv_path)
    answers = []
    for i, sql in enumerate(queries):
        try:
            cursor = con.execute(sql)
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        except Exception as e:  # the failing query is what the reader needs
            sys.stderr.write("duckdb_oracle: query %d failed: %s\n  %s\n" % (i, e, sql))
            return 1
        answers.append([{n: to_json(v) for n, v in zip(names, row)} for row in rows])
    json.dump(answers, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
