//! The parser's promise that parsing allocates nothing per line, measured with a
//! counting global allocator.
//!
//! `stats_alloc` supplies the allocator, since the workspace forbids `unsafe` and an
//! allocator cannot be written without it. It counts every thread's allocations,
//! so this file holds a single test: the harness runs nothing beside it.

use std::alloc::System;
use std::collections::BTreeMap;

use citytsdb_ingest::line_protocol::parse_lines;
use citytsdb_ingest::{parse_body, validate, Precision};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// `lines` lines of the city's four tables, none needing escapes, with comments and
/// blank lines between them.
fn body(lines: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..lines {
        let device = i % 1000;
        let t = 1_764_547_200 + (i / 1000) * 300;
        let line = match i % 4 {
            0 => format!("manhole,device=mh-{device:05},district=金水区 tilt_deg=1.{device},water_level_cm=-145.5,battery_pct=99i,cover_open=false {t}"),
            1 => format!("parking,device=pk-{device:05},district=zhengdong,street=Jinshui occupied=25i,capacity=87i {t}"),
            2 => format!("traffic,device=tr-{device:05},district=二七区 flow=27i,speed_kmh=67.3 {t}"),
            _ => format!("sewage,device=sw-{device:05},district=中原区 flow_lps=31.13,cod_mgl=212.8,note=\"ok\" {t}"),
        };
        out.push_str(&line);
        out.push_str(if i % 100 == 0 {
            "\n# gateway 7\n\n"
        } else {
            "\n"
        });
    }
    out.into_bytes()
}

/// Allocations and reallocations `f` makes.
fn allocations(f: impl FnOnce()) -> usize {
    let region = Region::new(GLOBAL);
    f();
    let change = region.change();
    change.allocations + change.reallocations
}

#[test]
fn allocations_do_not_grow_with_the_number_of_lines() {
    let small = body(1_000);
    let large = body(100_000);

    // The parser alone: nothing at all per line.
    let parse = |b: &[u8]| {
        allocations(|| {
            let mut fields = 0;
            for line in parse_lines(b) {
                fields += line.expect("the body is valid").fields.len();
            }
            assert!(fields > 0);
        })
    };
    let (a_small, a_large) = (parse(&small), parse(&large));
    assert_eq!(
        (a_small, a_large),
        (0, 0),
        "parse_lines allocated (1,000 lines, 100,000 lines)"
    );

    // A whole body: one list of lines, however many there are.
    let body_allocs = |b: &[u8]| {
        allocations(|| {
            let parsed = parse_body(b);
            assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected[0]);
        })
    };
    let (b_small, b_large) = (body_allocs(&small), body_allocs(&large));
    assert_eq!(
        b_small, b_large,
        "parse_body allocations grew from 1,000 to 100,000 lines"
    );
    assert!(b_small <= 1, "parse_body allocated {b_small} times");

    // A regression case: the list was sized by the body's line count, each entry
    // hundreds of bytes, so a body of newlines reserved hundreds of times its size
    // (64 MiB of them: tens of GB, and the process aborted).
    let blank = vec![b'\n'; 100_000];
    let region = Region::new(GLOBAL);
    let parsed = parse_body(&blank);
    let bytes = region.change().bytes_allocated;
    assert_eq!(parsed.data_lines, 0);
    let entry = std::mem::size_of::<(&[u8], citytsdb_ingest::ParsedLine<'_>)>();
    assert!(
        bytes <= blank.len() * 100,
        "parse_body reserved {bytes} bytes for {} blank lines ({entry} bytes a line)",
        blank.len()
    );

    // Validation against known tables: only the four per-table lists of accepted
    // lines grow, by doubling, so 100 times the lines add about 7 reallocations each
    // (measured: 109 for 1,000 lines, 137 for 100,000). One allocation per line
    // would add 99,000.
    let validated = |b: &[u8]| {
        let parsed = parse_body(b);
        let mut schemas = BTreeMap::new();
        // The first write creates the tables and columns; the measured one finds them.
        let _ = validate(parsed.lines.clone(), Precision::Second, &mut schemas);
        allocations(|| {
            let v = validate(parsed.lines, Precision::Second, &mut schemas);
            assert!(v.rejected.is_empty(), "{:?}", v.rejected[0]);
            assert_eq!(v.tables.len(), 4);
        })
    };
    let (v_small, v_large) = (validated(&small), validated(&large));
    assert!(
        v_large <= v_small + 4 * 8,
        "validate allocated {v_small} times for 1,000 lines and {v_large} for 100,000"
    );
}
