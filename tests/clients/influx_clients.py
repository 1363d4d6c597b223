#!/usr/bin/env python3
"""Writes through InfluxDB's own Python clients, for the compatibility tests.

Usage: influx_clients.py URL TOKEN_OR_EMPTY

- `influxdb-client` (InfluxDB 2.x's official client): three points to bucket
  `city2` through POST /api/v2/write, with second precision, synchronously.
- `influxdb` (the 1.x client): three points to database `city1` through
  POST /write, with `precision=s` and the token as the password (`p=`).

Prints "ok" when both clients reported success; any client error ends the
script non-zero with the error, so the test fails.
"""

import sys
from urllib.parse import urlparse

from influxdb import InfluxDBClient
from influxdb_client import InfluxDBClient as InfluxDB2Client, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

url, token = sys.argv[1], sys.argv[2]
start = 1764547200

with InfluxDB2Client(url=url, token=token or "none", org="city-brain") as client:
    write_api = client.write_api(write_options=SYNCHRONOUS)
    points = [
        Point("manhole").tag("device", f"mh-{i}").tag("district", "金水区")
        .field("tilt_deg", 1.5 * i).field("battery_pct", 90 - i)
        .time(start + 60 * i, WritePrecision.S)
        for i in range(3)
    ]
    write_api.write(bucket="city2", record=points, write_precision=WritePrecision.S)

parsed = urlparse(url)
client = InfluxDBClient(host=parsed.hostname, port=parsed.port, username="city", password=token or "", database="city1")
body = [
    {"measurement": "manhole", "tags": {"device": f"mh-{i}", "district": "二七区"},
     "time": start + 60 * i, "fields": {"tilt_deg": 2.5 * i, "cover_open": i == 1}}
    for i in range(3)
]
if not client.write_points(body, time_precision="s"):
    sys.exit("the 1.x client reported failure")
print("ok")
