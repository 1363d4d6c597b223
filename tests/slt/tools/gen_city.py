#!/usr/bin/env python3
"""Generates tests/slt/data/city.lp, the fixed dataset of the SQL golden files.

Run once by hand (`python3 tests/slt/tools/gen_city.py > tests/slt/data/city.lp`);
the build never runs it and the output is checked in. Everything is a formula of
the reading's index, so the output is the same on every run.

Times are unix seconds (the runner writes with precision=s), from
2025-12-01T00:00:00Z up to (not including) 06:00:00Z, with gaps. A line
`# @flush` splits the file in two chunks: the runner's `flushed` and `mixed`
passes write the first chunk, flush it into Parquet segments, then write the
second (late readings, and re-writes of a series+time already written, which
merge field-wise: the later write's fields win, fields it lacks keep theirs).
"""

T0 = 1_764_547_200  # 2025-12-01T00:00:00Z


def esc(tag):
    """A tag value escaped for line protocol."""
    out = []
    for c in tag:
        if c in ", =\\":
            out.append("\\")
        out.append(c)
    return "".join(out)


def fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, float):
        s = repr(round(v, 6))
        return s
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(v)


def line(table, tags, fields, t):
    tag_s = "".join(f",{k}={esc(v)}" for k, v in tags)
    field_s = ",".join(f"{k}={fmt(v)}" for k, v in fields if v is not None)
    assert field_s, (table, tags, t)
    return f"{table}{tag_s} {field_s} {t}"


def manhole():
    out = []
    # mh-001, every 10 minutes, silent 02:00-02:59; lid open 01:20-01:40 (tilted
    # past 15 degrees) and again 05:00-05:10 (open but barely tilted).
    for k in range(36):
        if 12 <= k <= 17:
            continue
        tilt = round(0.4 + (k % 5) * 0.1, 2)
        open_ = False
        if k in (8, 9, 10):
            tilt = {8: 16.5, 9: 18.0, 10: 15.5}[k]
            open_ = True
        if k in (30, 31):
            tilt = 12.0
            open_ = True
        out.append(line("manhole", [("device", "mh-001"), ("district", "金水区")],
                        [("tilt_deg", tilt), ("water_level_cm", -180.0 + k * 1.5),
                         ("battery_pct", 97 - k // 12), ("cover_open", open_)],
                        T0 + 600 * k))
        if k == 3:
            # A retry of the 00:30 reading carrying only a corrected tilt.
            out.append(line("manhole", [("device", "mh-001"), ("district", "金水区")],
                            [("tilt_deg", 9.9)], T0 + 600 * k))
    # mh-002, every 10 minutes, silent 04:00-04:59; water level missing now and then,
    # lid state missing now and then.
    for k in range(36):
        if 24 <= k <= 29:
            continue
        out.append(line("manhole", [("device", "mh-002"), ("district", "二七区")],
                        [("tilt_deg", 1.0 + (k % 3) * 0.25),
                         ("water_level_cm", None if k % 7 == 3 else -60.0 + (k % 9) * 2.5),
                         ("battery_pct", 88 - k // 10),
                         ("cover_open", None if k % 11 == 5 else False)],
                        T0 + 600 * k))
    # mh-003 in "high tech" (a space to escape), every 15 minutes; battery missing
    # every fifth reading; lid open and tilted at 02:30.
    for j in range(24):
        open_ = j == 10
        out.append(line("manhole", [("device", "mh-003"), ("district", "high tech")],
                        [("tilt_deg", 22.5 if open_ else 2.0 + (j % 4) * 0.5),
                         ("water_level_cm", -120.0 + j * 2.25),
                         ("battery_pct", None if j % 5 == 4 else 75 - j),
                         ("cover_open", open_)],
                        T0 + 900 * j))
    # mh-004, four sparse readings, a low battery, never a lid state.
    for n, (minute, tilt, level) in enumerate(
            [(5, 3.0, -150.0), (65, 3.5, -149.25), (185, 4.0, None), (335, 4.5, None)]):
        out.append(line("manhole", [("device", "mh-004"), ("district", "中原区")],
                        [("tilt_deg", tilt), ("water_level_cm", level),
                         ("battery_pct", 15 - n)],
                        T0 + 60 * minute))
    return out


def parking():
    out = []
    for j in range(24):
        t = T0 + 900 * j
        out.append(line("parking", [("device", "pk-001"), ("district", "金水区"),
                                    ("street", "Huayuan Rd, north")],
                        [("occupied", min(120, 30 + j * 4)), ("capacity", 120)], t))
        out.append(line("parking", [("device", "pk-002"), ("district", "二七区"),
                                    ("street", "Jiefang Rd")],
                        [("occupied", 80 - abs(12 - j) * 5), ("capacity", 80)], t))
        if not 8 <= j <= 11:
            out.append(line("parking", [("device", "pk-003"), ("district", "中原区"),
                                        ("street", "Zhongyuan Rd")],
                            [("occupied", None if j % 6 == 0 else 10 + (j * 13) % 50),
                             ("capacity", 60)], t))
    # pk-004, a temporary car park reporting hourly without a street tag (NULL), and
    # not in the registry.
    for h in range(4):
        out.append(line("parking", [("device", "pk-004"), ("district", "金水区")],
                        [("occupied", None if h == 3 else 5 + h), ("capacity", 10)],
                        T0 + 3600 * h))
    return out


def traffic():
    out = []
    for i in range(72):
        t = T0 + 300 * i
        out.append(line("traffic", [("device", "tr-001"), ("district", "金水区")],
                        [("flow", 20 + (i * 7) % 30), ("speed_kmh", 45.0 - (i % 12) * 1.25)], t))
        if not 36 <= i <= 47:
            out.append(line("traffic", [("device", "tr-002"), ("district", "二七区")],
                            [("flow", 50 + (i * 11) % 40), ("speed_kmh", 30.0 + (i % 8) * 0.5)], t))
        out.append(line("traffic", [("device", "tr-003"), ("district", "high tech")],
                        [("flow", 5 + i % 10),
                         ("speed_kmh", None if i % 9 == 0 else 60.0 - (i % 6) * 2.5)], t))
    return out


def sewage():
    out = []
    for m in range(18):
        t = T0 + 1200 * m
        out.append(line("sewage", [("device", "sw-001"), ("district", "金水区")],
                        [("flow_lps", 12.5 + (m % 6) * 0.75), ("cod_mgl", 180.0 + m * 3.5)], t))
        out.append(line("sewage", [("device", "sw-002"), ("district", "惠济区")],
                        [("flow_lps", 8.0 + (m % 4) * 0.5),
                         ("cod_mgl", None if m % 5 == 2 else 95.0 + (m % 3) * 10.0)], t))
    return out


def devices():
    # The registry: one row per device, all at T0. sw-002 is missing from it, mh-009
    # has no readings, mh-004 has no street.
    rows = [
        ("mh-001", "金水区", "Jinshui Rd", "2023-04-01"),
        ("mh-002", "二七区", "Jiefang Rd", "2023-05-12"),
        ("mh-003", "high tech", "Kexue Ave", "2024-01-20"),
        ("mh-004", "中原区", None, "2024-07-07"),
        ("mh-009", "金水区", "Nongye Rd", "2025-11-30"),
        ("pk-001", "金水区", "Huayuan Rd, north", "2022-09-01"),
        ("pk-002", "二七区", "Jiefang Rd", "2022-09-01"),
        ("pk-003", "中原区", "Zhongyuan Rd", "2023-02-14"),
        ("tr-001", "金水区", "Jinshui Rd", "2021-06-30"),
        ("tr-002", "二七区", "Jiefang Rd", "2021-06-30"),
        ("tr-003", "high tech", "Kexue Ave", "2024-03-03"),
        ("sw-001", "金水区", "Jinshui Rd", "2020-10-10"),
    ]
    return [line("devices", [("device", d)],
                 [("district", dist), ("street", street), ("installed_at", inst)], T0)
            for d, dist, street, inst in rows]


def late():
    """The second chunk: late readings and re-writes of rows already written."""
    return [
        # Retry of mh-002's 00:50 reading: new water level and lid state, the
        # tilt and battery of the first write stay.
        line("manhole", [("device", "mh-002"), ("district", "二七区")],
             [("water_level_cm", -55.5), ("cover_open", True)], T0 + 3000),
        # A late reading of mh-004 at 04:05.
        line("manhole", [("device", "mh-004"), ("district", "中原区")],
             [("tilt_deg", 4.2), ("battery_pct", 14)], T0 + 14700),
        # pk-003's installation date corrected in the registry.
        line("devices", [("device", "pk-003")], [("installed_at", "2023-02-15")], T0),
        # pk-004 (no street tag): a corrected 01:00 count and a late 04:00 reading.
        line("parking", [("device", "pk-004"), ("district", "金水区")],
             [("occupied", 9)], T0 + 3600),
        line("parking", [("device", "pk-004"), ("district", "金水区")],
             [("occupied", 10), ("capacity", 10)], T0 + 4 * 3600),
        # A re-sent traffic reading, identical to the first.
        line("traffic", [("device", "tr-001"), ("district", "金水区")],
             [("flow", 20 + (10 * 7) % 30), ("speed_kmh", 45.0 - (10 % 12) * 1.25)],
             T0 + 3000),
    ]


def main():
    print("# The fixed dataset of the SQL golden files (tests/slt/*.slt), database `city`.")
    print("# Generated by tests/slt/tools/gen_city.py; timestamps in seconds (precision=s),")
    print("# 2025-12-01T00:00:00Z .. 05:59:59Z. `# @flush` splits it in two chunks.")
    for name, rows in [("manhole", manhole()), ("parking", parking()),
                       ("traffic", traffic()), ("sewage", sewage()),
                       ("devices", devices())]:
        print(f"# {name}")
        for r in rows:
            print(r)
    print("# @flush")
    for r in late():
        print(r)


if __name__ == "__main__":
    main()
