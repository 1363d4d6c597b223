#!/usr/bin/env python3
"""How close plain Parquet can bring a float column to its entropy floor.

    python3 benches/float_layouts.py COLUMN SEGMENT.parquet... [--series device]
        [--pages 1024,4096,16384]

The column's values are scaled to integers (as the segments store them, DECIMAL at
the smallest exact scale), grouped by series and ordered by time, and written the
ways Parquet can store them, each with zstd 19, at several page sizes:

- `dbp`: DELTA_BINARY_PACKED as writers emit it (each 32-value miniblock
  bit-packed at its widest delta), written by pyarrow;
- `bss`: BYTE_STREAM_SPLIT, written by pyarrow;
- `dbp-bytes`: DELTA_BINARY_PACKED with every miniblock packed at a whole number
  of bytes and one shared minimum delta per page where it fits, encoded here (a
  legal page any reader decodes), so that zstd's Huffman stage sees each delta as
  one byte and can code it near its order-0 entropy;

next to the floor `entropy_floor.py` reports (the least pooled order-0 entropy of
the value, its first and its second difference within each series) and to the
entropy of the first differences with the series boundaries left out, compressed as
one byte stream (what `dbp-bytes` would reach with no series boundaries and no page
headers). Page headers are counted at 30 bytes each for the hand-encoded pages.
Needs pyarrow, numpy and zstandard.
"""

from __future__ import annotations

import argparse
import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

PAGE_HEADER = 30


def varint(u: int) -> bytes:
    out = bytearray()
    while True:
        b, u = u & 0x7F, u >> 7
        if u:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def zigzag(v: int) -> int:
    return ((v << 1) ^ (v >> 63)) & ((1 << 64) - 1)


def dbp_bytes(vals: np.ndarray, series: np.ndarray) -> bytes:
    """One DELTA_BINARY_PACKED page (blocks of 128, 4 miniblocks of 32) whose
    miniblocks are packed at 0, 8, 16, 32 or 64 bits; every block takes the page's
    least within-series delta as its minimum when its deltas allow it."""
    d = np.diff(vals)
    inner = d[series[1:] == series[:-1]]
    shared = int(inner.min()) if len(inner) else 0
    out = bytearray(varint(128) + varint(4) + varint(len(vals)) + varint(zigzag(int(vals[0]))))
    for b in range(0, len(d), 128):
        block = d[b:b + 128]
        low = int(block.min())
        low = shared if low >= shared else low
        out += varint(zigzag(low))
        widths, packed = [], []
        for m in range(4):
            mini = block[m * 32:(m + 1) * 32]
            if len(mini) == 0:
                widths.append(0)
                continue
            r = (mini - low).astype(np.uint64)
            bits = int(r.max()).bit_length()
            w = next(x for x in (0, 8, 16, 32, 64) if bits <= x)
            widths.append(w)
            if w:
                full = np.zeros(32, dtype=np.uint64)
                full[:len(r)] = r
                packed.append(full.astype({8: "<u1", 16: "<u2", 32: "<u4", 64: "<u8"}[w]).tobytes())
        out += bytes(widths)
        for p in packed:
            out += p
    return bytes(out)


def h0(sym: np.ndarray) -> float:
    _, c = np.unique(sym, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum() + (len(c) - 1) / (2 * c.sum() * math.log(2)))


def pyarrow_bytes(vals: np.ndarray, encoding: str, page_rows: int) -> int:
    """Compressed bytes of the column chunk pyarrow writes (page headers included)."""
    t = pa.table({"v": pa.array(vals, type=pa.int32() if np.abs(vals).max() < 2**31 else pa.int64())})
    buf = io.BytesIO()
    # A page is cut once the page holds more than data_page_size bytes, checked
    # after every write batch: with a 1-byte limit, every batch of rows is a page.
    pq.write_table(t, buf, compression="zstd", compression_level=19, use_dictionary=False,
                   column_encoding={"v": encoding}, write_statistics=False,
                   data_page_size=1, write_batch_size=page_rows, row_group_size=len(vals))
    md = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    return sum(md.row_group(g).column(0).total_compressed_size for g in range(md.num_row_groups))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("column")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--series", default="device")
    ap.add_argument("--time", default="time")
    ap.add_argument("--pages", default="1024,4096,16384")
    a = ap.parse_args()
    t = pa.concat_tables([pq.read_table(f, columns=[a.series, a.time, a.column]) for f in a.files])
    key = np.asarray(pc.cast(t[a.series], pa.string()).to_pylist(), dtype=object)
    order = np.lexsort((t[a.time].cast(pa.int64()).to_numpy(), key))
    f = pc.cast(t[a.column], pa.float64()).to_numpy(zero_copy_only=False)[order]
    key = key[order]
    keep = ~np.isnan(f)
    f, key = f[keep], key[keep]
    scale = next(d for d in range(10) if np.all(np.abs(np.rint(f * 10**d) / 10**d - f) <= 1e-9 * np.maximum(1, np.abs(f))))
    vals = np.rint(f * 10**scale).astype(np.int64)
    n = len(vals)
    same = key[1:] == key[:-1]
    starts = np.r_[True, ~same]
    d1 = np.diff(vals, prepend=vals[:1])
    d1[starts] = 0
    d2 = np.diff(d1, prepend=0)
    d2[starts] = 0
    floor = min(h0(vals), h0(d1), h0(d2)) / 8
    inner = np.diff(vals)[same]
    stream = (inner - inner.min()).astype(np.uint8 if inner.max() - inner.min() < 256 else np.uint16).tobytes()
    one_stream = len(zstandard.ZstdCompressor(level=19).compress(stream)) / max(1, len(inner))
    print(f"{a.column}: {n:,} values at scale {scale}, {int(starts.sum()):,} series; "
          f"floor {floor:.3f} B/v; first differences without series boundaries as one zstd stream "
          f"{one_stream:.3f} B/v")
    print(f"{'page rows':>10s} {'dbp':>7s} {'bss':>7s} {'dbp-bytes':>10s}   (B/v; ratio to floor)")
    z = zstandard.ZstdCompressor(level=19)
    for rows in [int(x) for x in a.pages.split(",")]:
        hand = sum(len(z.compress(dbp_bytes(vals[s:s + rows], key[s:s + rows]))) + PAGE_HEADER
                   for s in range(0, n, rows))
        got = {"dbp": pyarrow_bytes(vals, "DELTA_BINARY_PACKED", rows) / n,
               "bss": pyarrow_bytes(vals, "BYTE_STREAM_SPLIT", rows) / n,
               "dbp-bytes": hand / n}
        print(f"{rows:10,d} " + " ".join(f"{got[k]:.3f} ({got[k] / floor:.2f})".rjust(14 if k == 'dbp-bytes' else 13)
                                         for k in got))


if __name__ == "__main__":
    main()
