//! Random analyst SQL over the `manhole` table, for differential testing against
//! DuckDB.
//!
//! [`generate`] draws queries from a seeded [`XorShift`]: filters on tags (`=`,
//! `<>`, `IN`, `LIKE`, ranges, `IS [NOT] NULL`), on float, integer and boolean
//! fields (comparisons, `BETWEEN`, `IS [NOT] NULL`, arithmetic), on time
//! (timestamp literals on either side, `BETWEEN`, `IN`, truncated times),
//! combined with `AND`/`OR`/`NOT`; projections with arithmetic and string and
//! date functions; aggregates (`count`, `count(DISTINCT)`, `sum`, `avg`, `min`,
//! `max`, `stddev`, `median`, `FILTER`, first/last by time, ...); time buckets
//! (`date_bin`, `date_trunc`, `date_part`); `GROUP BY`, `HAVING`, `ORDER BY`,
//! `LIMIT`/`OFFSET`; subqueries, CTEs, joins, unions, `DISTINCT [ON]` and window
//! functions.
//!
//! Every query is spelled twice, for citytsdb and for DuckDB, and the two
//! spellings mean the same thing; the generator writes around the dialect
//! differences rather than leaving them to the comparison:
//!
//! - `date_bin(I, time)` (origin 1970-01-01) is DuckDB's
//!   `time_bucket(I, time, TIMESTAMP '1970-01-01 00:00:00')` (DuckDB's own default
//!   origin is 2000-01-03, which only agrees for widths dividing a day);
//! - integer `/` is DuckDB's `//` (DuckDB's `/` divides as floats);
//! - `CAST(float AS BIGINT)` truncates in citytsdb and rounds in DuckDB, so DuckDB
//!   gets `CAST(trunc(x) AS BIGINT)`;
//! - NULLs sort last in DuckDB whichever the direction, but first for `DESC` in
//!   citytsdb (PostgreSQL's rule), so every `ORDER BY` on a nullable column says
//!   `NULLS FIRST` or `NULLS LAST`;
//! - a timestamp literal with a non-UTC offset (`'...T20:00:00+08:00'`) means that
//!   instant in citytsdb, but DuckDB drops the offset when it compares the literal
//!   with a `TIMESTAMP` column, so DuckDB gets the same instant in UTC;
//! - `first_value(x ORDER BY time)` is DuckDB's `first(x ORDER BY time)`;
//! - `stddev` and `var_*` of equal values: citytsdb's accumulator leaves rounding
//!   noise (2.8e-17) where DuckDB gives exactly 0, which no relative tolerance
//!   absorbs, so both spell out 0 for a constant column.
//!
//! Answers are deterministic by construction: every computed column has an alias;
//! a query whose row order is part of its answer ([`GenQuery::ordered`]) sorts by
//! a total order over exact values (group keys, or device and time, which name a
//! row); `LIMIT` and `OFFSET` appear only with such an order; nothing sorts by a
//! float aggregate (its last bits depend on the order of addition). Unordered
//! answers are compared as multisets ([`compare_answers`]).
//!
//! [`sparse_writes`] adds covers that send only some fields, so that NULLs (and
//! merges of partial writes) take part in every filter and aggregate; a reading
//! with an empty district is written without that tag ([`line`]), so NULL tags
//! do too.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt::Display;

use serde_json::Value;

use crate::oracle::{compare_rows, Query};
use crate::workload::{device_name, rfc3339, round_to, seed_of, sql_timestamp, Expected, Reading};
use crate::workload::{Workload, XorShift, DISTRICTS};
use crate::Row;

/// Salt of the sparse devices' random streams.
const SALT_SPARSE: u64 = 0x5_9A25;

/// Writes of covers whose gateways send only some fields: devices
/// `first_device .. first_device + count`, one reading every `stride` steps of
/// `workload` at a device-specific offset of 0 to 299 seconds (so not on the other
/// devices' 5-minute grid). Each reading is sent with a random subset of its fields
/// (at least one); about a third are later sent again with another subset and
/// changed values, after every first send, so the merge of partial writes decides
/// the row. Apply them in order (with [`crate::workload::apply`]) for the expected
/// rows.
pub fn sparse_writes(
    workload: &Workload,
    first_device: u32,
    count: u32,
    stride: u64,
    seed: u64,
) -> Vec<Reading> {
    let mut first = Vec::new();
    let mut again = Vec::new();
    for device in first_device..first_device + count {
        let mut rng = XorShift::new(seed_of(&[seed, SALT_SPARSE, u64::from(device)]));
        let offset = rng.below(300) as i64;
        for step in (0..workload.steps()).step_by(stride.max(1) as usize) {
            let full = workload.reading(device, step);
            let time = full.time + offset;
            first.push(Reading {
                time,
                ..masked(&full, &mut rng)
            });
            if rng.below(3) == 0 {
                let changed = Reading {
                    time,
                    tilt_deg: full.tilt_deg.map(|v| round_to(v + 0.03, 2)),
                    water_level_cm: full.water_level_cm.map(|v| round_to(v + 2.5, 1)),
                    battery_pct: full.battery_pct.map(|v| v - 1),
                    cover_open: full.cover_open.map(|v| !v),
                    ..full
                };
                again.push(masked(&changed, &mut rng));
            }
        }
    }
    first.extend(again);
    first
}

/// `reading` with each field kept with probability 1/2, at least one kept.
fn masked(reading: &Reading, rng: &mut XorShift) -> Reading {
    let bits = rng.below(15) + 1; // 1..=15: never no field at all
    Reading {
        tilt_deg: reading.tilt_deg.filter(|_| bits & 1 != 0),
        water_level_cm: reading.water_level_cm.filter(|_| bits & 2 != 0),
        battery_pct: reading.battery_pct.filter(|_| bits & 4 != 0),
        cover_open: reading.cover_open.filter(|_| bits & 8 != 0),
        ..*reading
    }
}

/// `reading` as a line of line protocol, without the district tag when its
/// district is empty (the row's district is then NULL).
pub fn line(reading: &Reading) -> String {
    let line = reading.line();
    if reading.district.is_empty() {
        line.replacen(",district= ", " ", 1)
    } else {
        line
    }
}

/// Line-protocol request bodies of at most `lines_per_chunk` lines each, in
/// order, rendered by [`line`].
pub fn chunks(writes: &[Reading], lines_per_chunk: usize) -> Vec<String> {
    writes
        .chunks(lines_per_chunk.max(1))
        .map(|chunk| chunk.iter().map(|w| line(w) + "\n").collect())
        .collect()
}

/// Later partial writes over existing rows of devices `first_device` and up
/// whose time is at least `from_time`: about half of those rows get one, carrying a
/// random subset of the fields (at least one) with changed values, so fields
/// missing from a row may appear and present ones change, while the others keep
/// their values. Apply them in order for the expected rows.
pub fn partial_overwrites(
    expected: &Expected,
    first_device: u32,
    from_time: i64,
    seed: u64,
) -> Vec<Reading> {
    let mut rng = XorShift::new(seed_of(&[seed, SALT_SPARSE, 1]));
    let mut writes = Vec::new();
    for row in expected.values() {
        if row.device < first_device || row.time < from_time || rng.below(2) == 0 {
            continue;
        }
        let bump = rng.below(50) as f64;
        let changed = Reading {
            tilt_deg: Some(round_to(row.tilt_deg.unwrap_or(0.4) + bump / 100.0, 2)),
            water_level_cm: Some(round_to(
                row.water_level_cm.unwrap_or(40.0) + bump / 10.0,
                1,
            )),
            battery_pct: Some(row.battery_pct.unwrap_or(70) - 1 - rng.below(3) as i64),
            cover_open: Some(!row.cover_open.unwrap_or(true)),
            ..*row
        };
        writes.push(masked(&changed, &mut rng));
    }
    writes
}

/// What the generator knows of the data, to draw literals that hit it.
#[derive(Debug, Clone, Copy)]
pub struct Universe {
    /// Devices written are `mh-00001` up to `mh-<devices>`.
    pub devices: u32,
    /// First reading time, unix seconds.
    pub start: i64,
    /// End of the covered time range (exclusive), unix seconds.
    pub end: i64,
}

/// One generated question.
#[derive(Debug, Clone)]
pub struct GenQuery {
    /// The template it was drawn from (`rows_limit`, `group`, ...).
    pub kind: &'static str,
    /// The question in citytsdb's SQL and in DuckDB's.
    pub query: Query,
    /// Whether the row order is part of the answer: the query ends in an
    /// `ORDER BY` that is a total order over exact values.
    pub ordered: bool,
}

/// `count` queries drawn from `seed`; the same arguments give the same queries.
pub fn generate(universe: &Universe, seed: u64, count: usize) -> Vec<GenQuery> {
    let mut gen = Gen {
        rng: XorShift::new(seed),
        u: *universe,
        columns_used: 0,
    };
    (0..count).map(|_| gen.query()).collect()
}

/// Compares a server answer with the oracle's: in order when `ordered`, else as
/// multisets. Unordered answers are sorted by their exact values first (strings,
/// integers, booleans, times) and only then by floats, so float noise in the last
/// bits cannot reorder rows differently on the two sides.
pub fn compare_answers(got: &[Row], want: &[Row], ordered: bool) -> Result<(), String> {
    if ordered {
        return compare_rows(got, want, true);
    }
    let (mut got, mut want) = (got.to_vec(), want.to_vec());
    got.sort_by(compare_exact_first);
    want.sort_by(compare_exact_first);
    compare_rows(&got, &want, true)
}

/// Orders rows by their non-float values (in column-name order), then by their
/// floats.
fn compare_exact_first(a: &Row, b: &Row) -> Ordering {
    fn parts(row: &Row) -> (Vec<String>, Vec<f64>) {
        let mut exact = Vec::new();
        let mut floats = Vec::new();
        for (column, value) in row {
            match value {
                Value::Number(n) if n.is_f64() => floats.push(n.as_f64().unwrap_or_default()),
                other => exact.push(format!("{column}={other}")),
            }
        }
        (exact, floats)
    }
    let (ea, fa) = parts(a);
    let (eb, fb) = parts(b);
    ea.cmp(&eb).then_with(|| {
        fa.iter()
            .zip(&fb)
            .map(|(x, y)| x.total_cmp(y))
            .find(|o| o.is_ne())
            .unwrap_or_else(|| fa.len().cmp(&fb.len()))
    })
}

/// SQL text for both engines.
#[derive(Debug, Clone, Default, PartialEq)]
struct Pair {
    city: String,
    duck: String,
}

impl Pair {
    /// Text both engines read the same way.
    fn same(text: impl Into<String>) -> Pair {
        let text = text.into();
        Pair {
            city: text.clone(),
            duck: text,
        }
    }

    /// Text spelled differently for citytsdb and DuckDB.
    fn two(city: impl Into<String>, duck: impl Into<String>) -> Pair {
        Pair {
            city: city.into(),
            duck: duck.into(),
        }
    }

    /// `parts` joined by `sep` on both sides.
    fn join(parts: &[Pair], sep: &str) -> Pair {
        Pair {
            city: parts
                .iter()
                .map(|p| p.city.as_str())
                .collect::<Vec<_>>()
                .join(sep),
            duck: parts
                .iter()
                .map(|p| p.duck.as_str())
                .collect::<Vec<_>>()
                .join(sep),
        }
    }
}

/// A value usable in [`sql!`]: a [`Pair`] gives each engine its spelling, anything
/// printable is the same text for both.
trait Spell {
    fn city(&self) -> String;
    fn duck(&self) -> String;
}

impl Spell for Pair {
    fn city(&self) -> String {
        self.city.clone()
    }
    fn duck(&self) -> String {
        self.duck.clone()
    }
}

impl<T: Display + ?Sized> Spell for T {
    fn city(&self) -> String {
        self.to_string()
    }
    fn duck(&self) -> String {
        self.to_string()
    }
}

/// `format!` for both engines: each argument (a variable, evaluated twice) is a
/// [`Pair`] or anything printable.
macro_rules! sql {
    ($fmt:literal $(, $arg:expr)* $(,)?) => {
        Pair {
            city: format!($fmt $(, Spell::city(&$arg))*),
            duck: format!($fmt $(, Spell::duck(&$arg))*),
        }
    };
}

/// A GROUP BY key: what is selected, how it is grouped by and sorted.
#[derive(Debug, Clone)]
struct Key {
    /// The select item, `device` or `date_bin(...) AS bucket`.
    select: Pair,
    /// The GROUP BY spelling when not by alias or position.
    expr: Pair,
    /// The output column name.
    name: String,
    /// Whether the key can be NULL (then every sort on it names NULLS FIRST/LAST).
    nullable: bool,
    /// Roughly how many distinct values it takes.
    cardinality: u64,
}

/// Bucket widths for `date_bin`: some divide a day, some (7, 25 minutes) do not,
/// which only agree with DuckDB because its origin is spelled out.
const BUCKETS: [(&str, i64); 11] = [
    ("5 minutes", 300),
    ("7 minutes", 420),
    ("10 minutes", 600),
    ("15 minutes", 900),
    ("25 minutes", 1_500),
    ("30 minutes", 1_800),
    ("1 hour", 3_600),
    ("90 minutes", 5_400),
    ("2 hours", 7_200),
    ("6 hours", 21_600),
    ("1 day", 86_400),
];

/// Units for `date_trunc` and how many values each takes over one day.
const TRUNC_UNITS: [(&str, u64); 3] = [("minute", 1_440), ("hour", 24), ("day", 2)];

/// Raw columns of the manhole table.
const COLUMNS: [&str; 7] = [
    "time",
    "device",
    "district",
    "tilt_deg",
    "water_level_cm",
    "battery_pct",
    "cover_open",
];

/// The field columns, all nullable.
const FIELDS: [&str; 4] = ["tilt_deg", "water_level_cm", "battery_pct", "cover_open"];

struct Gen {
    rng: XorShift,
    u: Universe,
    /// A counter for unique aliases within one query.
    columns_used: usize,
}

impl Gen {
    fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        self.rng.unit() < p
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }

    /// A fresh alias `prefix<n>`.
    fn alias(&mut self, prefix: &str) -> String {
        self.columns_used += 1;
        format!("{prefix}{}", self.columns_used)
    }

    fn query(&mut self) -> GenQuery {
        self.columns_used = 0;
        match self.below(100) {
            0..=17 => self.rows_limit(),
            18..=25 => self.rows_bounded(),
            26..=38 => self.aggregate(),
            39..=69 => self.group(),
            70..=74 => self.nested(),
            75..=78 => self.distinct(),
            79..=82 => self.distinct_on(),
            83..=86 => self.window(),
            87..=90 => self.limit_count(),
            91..=94 => self.union(),
            _ => self.join(),
        }
    }

    // ---- literals ----

    fn device_number(&mut self) -> u32 {
        1 + self.below(u64::from(self.u.devices)) as u32
    }

    /// A quoted device name; now and then one that no row has.
    fn device(&mut self) -> String {
        if self.chance(0.03) {
            return "'mh-99999'".into();
        }
        let d = self.device_number();
        format!("'{}'", device_name(d))
    }

    /// A quoted district; now and then one that no row has.
    fn district(&mut self) -> String {
        if self.chance(0.03) {
            return "'新区'".into();
        }
        format!("'{}'", self.pick(&DISTRICTS))
    }

    /// A time near the data: on the 5-minute grid mostly (where rows are), else
    /// any second, from an hour before the first reading to an hour after the last.
    fn time_point(&mut self) -> i64 {
        if self.chance(0.02) {
            // Far from the data: 1970, 2000 and 2100.
            return self.pick(&[0, 946_684_800, 4_102_444_800]);
        }
        let span = self.u.end - self.u.start + 7_200;
        let t = self.u.start - 3_600 + self.below(span as u64) as i64;
        match self.below(10) {
            0..=5 => t - t.rem_euclid(300),
            6..=7 => t - t.rem_euclid(3_600),
            _ => t,
        }
    }

    /// A timestamp literal for `t`, in one of the spellings both engines read
    /// the same way, or in Zhengzhou's local time (`+08:00`) for citytsdb, which
    /// DuckDB gets in UTC (it drops the offset of a literal compared with a
    /// `TIMESTAMP` column). Rarely the literal is a quarter second after `t` (no
    /// row is there).
    fn time_literal(&mut self, t: i64) -> Pair {
        let text = match self.below(22) {
            0..=5 => format!("TIMESTAMP '{}'", sql_timestamp(t)),
            6..=9 => format!("'{}'", sql_timestamp(t)),
            10..=14 => format!("'{}'", rfc3339(t)),
            15 => format!("'{}+00:00'", rfc3339(t).trim_end_matches('Z')),
            16 => format!("'{}.25Z'", rfc3339(t).trim_end_matches('Z')),
            17 => format!(
                "(TIMESTAMP '{}' + INTERVAL '30 minutes')",
                sql_timestamp(t - 1_800)
            ),
            18 => format!(
                "(TIMESTAMP '{}' - INTERVAL '2 hours')",
                sql_timestamp(t + 7_200)
            ),
            _ => {
                let local = rfc3339(t + 8 * 3_600);
                return Pair::two(
                    format!("'{}+08:00'", local.trim_end_matches('Z')),
                    format!("'{}'", rfc3339(t)),
                );
            }
        };
        Pair::same(text)
    }

    fn time_lit(&mut self) -> Pair {
        let t = self.time_point();
        self.time_literal(t)
    }

    /// A literal for numeric field `column`, in its range (and often a value rows
    /// hold exactly).
    fn number(&mut self, column: &str) -> String {
        match column {
            "tilt_deg" => {
                if self.chance(0.15) {
                    format!("{}", 15 + self.below(20))
                } else {
                    format!("{:.2}", 0.33 + self.below(35) as f64 / 100.0)
                }
            }
            "water_level_cm" => format!("{:.1}", self.below(1_300) as f64 / 10.0),
            _ => format!("{}", 55 + self.below(46)),
        }
    }

    fn comparison_op(&mut self) -> &'static str {
        self.pick(&["=", "<>", "<", "<=", ">", ">="])
    }

    fn numeric_field(&mut self) -> &'static str {
        self.pick(&["tilt_deg", "water_level_cm", "battery_pct"])
    }

    // ---- predicates ----

    /// A WHERE condition: atoms combined with AND, OR and NOT, at most `depth`
    /// levels deep.
    fn predicate(&mut self, depth: u32) -> Pair {
        let roll = if depth == 0 { 0 } else { self.below(10) };
        match roll {
            0..=4 => self.atom(),
            5..=6 => {
                let (a, b) = (self.predicate(depth - 1), self.predicate(depth - 1));
                sql!("({} AND {})", a, b)
            }
            7..=8 => {
                let (a, b) = (self.predicate(depth - 1), self.predicate(depth - 1));
                sql!("({} OR {})", a, b)
            }
            _ => {
                let a = self.predicate(depth - 1);
                sql!("NOT ({})", a)
            }
        }
    }

    fn atom(&mut self) -> Pair {
        match self.below(24) {
            20 => {
                let column = self.pick(&["device", "district"]);
                let not = if self.chance(0.7) { " NOT" } else { "" };
                Pair::same(format!("{column} IS{not} NULL"))
            }
            21 => {
                // Disjunctions of one tag (the scan prunes by their union).
                let (a, b, c) = (self.device(), self.device(), self.device());
                match self.below(3) {
                    0 => Pair::same(format!("(device = {a} OR device = {b})")),
                    1 => Pair::same(format!("(device = {a} OR device IN ({b}, {c}))")),
                    _ => {
                        let (x, y) = (self.district(), self.district());
                        Pair::same(format!(
                            "(district = {x} OR district = {y} OR district = {a})"
                        ))
                    }
                }
            }
            22 => {
                // Conjunctions of one tag (the scan prunes by their intersection).
                let (a, b) = (self.device(), self.device());
                match self.below(3) {
                    0 => Pair::same(format!("(device = {a} AND device = {b})")),
                    1 => Pair::same(format!("(device IN ({a}, {b}) AND device IN ({b}))")),
                    // Not `device IN ({a}, NULL)`: under a NOT (which any atom may
                    // get) it meets citytsdb bug "IN AND NOT IN with NULL": the
                    // simplifier rewrites `x IN (l1) AND x NOT IN (l2)` to
                    // `x IN (l1 - l2)` even when l2 holds a NULL, which makes
                    // `x NOT IN (l2)` never true. `SELECT d FROM (VALUES ('a'),
                    // ('b')) AS t(d) WHERE d IN ('a', 'b') AND d NOT IN ('zz', NULL)`
                    // answers a and b; DuckDB and PostgreSQL answer no rows.
                    _ => Pair::same(format!("(device IN ({a}, {b}) AND device <> {a})")),
                }
            }
            23 => {
                // A tag and a field in one disjunction: no tag pruning allowed.
                let d = self.device();
                let v = self.number("water_level_cm");
                Pair::same(format!("(device = {d} OR water_level_cm > {v})"))
            }
            0..=1 => {
                let (column, value) = if self.chance(0.5) {
                    ("device", self.device())
                } else {
                    ("district", self.district())
                };
                let op = self.pick(&["=", "=", "<>"]);
                Pair::same(format!("{column} {op} {value}"))
            }
            2..=3 => {
                let n = 1 + self.below(5);
                let (column, values): (&str, Vec<String>) = if self.chance(0.6) {
                    ("device", (0..n).map(|_| self.device()).collect())
                } else {
                    ("district", (0..n).map(|_| self.district()).collect())
                };
                let not = if self.chance(0.25) { "NOT " } else { "" };
                Pair::same(format!("{column} {not}IN ({})", values.join(", ")))
            }
            4 => {
                let pattern = self.pick(&[
                    "device LIKE 'mh-000%'",
                    "device LIKE 'mh-001%'",
                    "device LIKE 'mh-00%7'",
                    "device LIKE 'mh-0_1_5'",
                    "device LIKE '%0'",
                    "device NOT LIKE 'mh-000%'",
                    "district LIKE '%区'",
                    "district LIKE 'high%'",
                    "district LIKE '%e%'",
                    "district LIKE '_七区'",
                    "district NOT LIKE '%区'",
                    "district LIKE 'high tech'",
                ]);
                Pair::same(pattern)
            }
            5 => {
                let (a, b) = (self.device_number(), self.device_number());
                let (lo, hi) = (a.min(b), a.max(b));
                match self.below(3) {
                    0 => Pair::same(format!(
                        "device BETWEEN '{}' AND '{}'",
                        device_name(lo),
                        device_name(hi)
                    )),
                    1 => Pair::same(format!("device < '{}'", device_name(hi))),
                    _ => Pair::same(format!("district >= '{}'", self.pick(&DISTRICTS))),
                }
            }
            6..=8 => {
                let column = self.numeric_field();
                let op = self.comparison_op();
                let value = self.number(column);
                if self.chance(0.2) {
                    Pair::same(format!("{value} {} {column}", swap(op)))
                } else {
                    Pair::same(format!("{column} {op} {value}"))
                }
            }
            9 => {
                let column = self.numeric_field();
                let (a, b) = (self.number(column), self.number(column));
                let (lo, hi) = order_numbers(&a, &b);
                let not = if self.chance(0.25) { "NOT " } else { "" };
                Pair::same(format!("{column} {not}BETWEEN {lo} AND {hi}"))
            }
            10 => {
                let form = self.pick(&[
                    "cover_open",
                    "NOT cover_open",
                    "cover_open = true",
                    "cover_open = false",
                    "cover_open <> true",
                    "cover_open IS TRUE",
                    "cover_open IS NOT FALSE",
                ]);
                Pair::same(form)
            }
            11 => {
                let column = self.pick(&FIELDS);
                let not = if self.chance(0.5) { " NOT" } else { "" };
                Pair::same(format!("{column} IS{not} NULL"))
            }
            12..=15 => self.time_atom(),
            16..=17 => {
                let form = match self.below(5) {
                    0 => format!(
                        "water_level_cm + tilt_deg > {}",
                        self.number("water_level_cm")
                    ),
                    1 => format!("water_level_cm * 2 < {}", 2 * (20 + self.below(100))),
                    2 => format!("battery_pct % 10 = {}", self.below(10)),
                    3 => format!("battery_pct - 50 >= {}", 10 + self.below(40)),
                    _ => format!("abs(tilt_deg - 0.5) < {:.2}", self.below(20) as f64 / 100.0),
                };
                Pair::same(form)
            }
            18 => {
                let n = 1 + self.below(4);
                let values: Vec<String> =
                    (0..n).map(|_| format!("{}", 55 + self.below(46))).collect();
                Pair::same(format!("battery_pct IN ({})", values.join(", ")))
            }
            _ => {
                let unit = self.pick(&["hour", "day"]);
                let t = self.time_point();
                let t = t - t.rem_euclid(if unit == "hour" { 3_600 } else { 86_400 });
                let lit = self.time_literal(t);
                sql!("date_trunc('{}', time) = {}", unit, lit)
            }
        }
    }

    fn time_atom(&mut self) -> Pair {
        match self.below(6) {
            0..=2 => {
                let op = self.pick(&["<", "<=", ">", ">=", ">=", "<", "=", "<>"]);
                let lit = self.time_lit();
                if self.chance(0.25) {
                    sql!("{} {} time", lit, swap(op))
                } else {
                    sql!("time {} {}", op, lit)
                }
            }
            3 => {
                let (a, b) = (self.time_point(), self.time_point());
                let (lo, hi) = (self.time_literal(a.min(b)), self.time_literal(a.max(b)));
                let not = if self.chance(0.2) { "NOT " } else { "" };
                sql!("time {}BETWEEN {} AND {}", not, lo, hi)
            }
            4 => {
                let n = 1 + self.below(4);
                let values: Vec<Pair> = (0..n).map(|_| self.time_lit()).collect();
                let values = Pair::join(&values, ", ");
                sql!("time IN ({})", values)
            }
            _ => {
                let (a, b) = (self.time_point(), self.time_point());
                let (lo, hi) = (self.time_literal(a.min(b)), self.time_literal(a.max(b)));
                sql!("(time >= {} AND time < {})", lo, hi)
            }
        }
    }

    /// ` WHERE ...` or nothing.
    fn maybe_where(&mut self, p: f64) -> Pair {
        if self.chance(p) {
            let depth = self.below(3) as u32;
            let pred = self.predicate(depth);
            sql!(" WHERE {}", pred)
        } else {
            Pair::default()
        }
    }

    // ---- expressions ----

    /// `date_bin(width, time)` and its DuckDB spelling, sometimes with an origin.
    fn bucket_expr(&mut self) -> (Pair, i64) {
        let (width, secs) = self.pick(&BUCKETS);
        if self.chance(0.07) {
            // Days (or hours) from Zhengzhou's midnight: an origin at +08:00.
            let origin = self.u.start - self.u.start.rem_euclid(86_400) - 8 * 3_600;
            let local = rfc3339(origin + 8 * 3_600);
            return (
                Pair::two(
                    format!(
                        "date_bin(INTERVAL '{width}', time, '{}+08:00')",
                        local.trim_end_matches('Z')
                    ),
                    format!(
                        "time_bucket(INTERVAL '{width}', time, TIMESTAMP '{}')",
                        sql_timestamp(origin)
                    ),
                ),
                secs,
            );
        }
        if self.chance(0.2) {
            let origin = self.u.start + 60 * self.below(60) as i64;
            let origin = format!("TIMESTAMP '{}'", sql_timestamp(origin));
            (
                Pair::two(
                    format!("date_bin(INTERVAL '{width}', time, {origin})"),
                    format!("time_bucket(INTERVAL '{width}', time, {origin})"),
                ),
                secs,
            )
        } else {
            (
                Pair::two(
                    format!("date_bin(INTERVAL '{width}', time)"),
                    format!(
                        "time_bucket(INTERVAL '{width}', time, TIMESTAMP '1970-01-01 00:00:00')"
                    ),
                ),
                secs,
            )
        }
    }

    /// A computed select item over one row, with a fresh alias.
    fn computed_item(&mut self) -> Pair {
        let expr = match self.below(19) {
            0 => Pair::same("water_level_cm / 100.0"),
            1 => Pair::two("battery_pct / 3", "battery_pct // 3"),
            2 => Pair::same("battery_pct % 7"),
            3 => Pair::same("tilt_deg * 2 + 1"),
            4 => Pair::two(
                "CAST(water_level_cm AS BIGINT)",
                "CAST(trunc(water_level_cm) AS BIGINT)",
            ),
            5 => Pair::same("abs(water_level_cm - 50)"),
            6 => Pair::same("CASE WHEN cover_open THEN 'open' ELSE 'shut' END"),
            7 => self.bucket_expr().0,
            8 => {
                let unit = self.pick(&TRUNC_UNITS).0;
                Pair::same(format!("date_trunc('{unit}', time)"))
            }
            9 => Pair::same("device || '/' || district"),
            10 => Pair::same("coalesce(tilt_deg, -1.0)"),
            11 => Pair::same("water_level_cm > 60"),
            12 => Pair::same("time + INTERVAL '90 minutes'"),
            13 => Pair::same("100 - battery_pct"),
            14 => Pair::same("length(district)"),
            15 => Pair::same("substr(device, 4)"),
            16 => Pair::same("upper(district)"),
            17 => Pair::same("date_part('hour', time)"),
            _ => Pair::same("extract(minute FROM time)"),
        };
        let alias = self.alias("c");
        sql!("{} AS {}", expr, alias)
    }

    /// 1 to 5 select items over one row: distinct raw columns and computed ones.
    fn row_items(&mut self) -> Pair {
        if self.chance(0.1) {
            return Pair::same("*");
        }
        let n = 1 + self.below(5);
        let mut raw = BTreeSet::new();
        let mut items = Vec::new();
        for _ in 0..n {
            if self.chance(0.7) {
                let column = self.pick(&COLUMNS);
                if raw.insert(column) {
                    items.push(Pair::same(column));
                }
            } else {
                items.push(self.computed_item());
            }
        }
        if items.is_empty() {
            items.push(Pair::same("device"));
        }
        Pair::join(&items, ", ")
    }

    /// A total order over rows (device and time name a row), sometimes led by a
    /// raw field (exact values) or the district.
    fn row_order(&mut self) -> String {
        let dir = |g: &mut Gen| if g.chance(0.3) { " DESC" } else { "" };
        let (d1, d2) = (dir(self), dir(self));
        let base = if self.chance(0.5) {
            format!("time{d1}, device{d2}")
        } else {
            format!("device{d1}, time{d2}")
        };
        match self.below(4) {
            0 => {
                let field = self.pick(&FIELDS);
                let d = dir(self);
                let nulls = self.pick(&["NULLS FIRST", "NULLS LAST"]);
                format!("{field}{d} {nulls}, {base}")
            }
            1 => {
                let nulls = self.pick(&["NULLS FIRST", "NULLS LAST"]);
                format!("district{} {nulls}, {base}", dir(self))
            }
            _ => base,
        }
    }

    /// ` LIMIT n [OFFSET m]`.
    fn limit(&mut self, max: u64) -> String {
        let n = if self.chance(0.03) {
            0
        } else {
            1 + self.below(max)
        };
        if self.chance(0.4) {
            let offset = self.pick(&[1, 3, 10, 50, 200, 5_000]);
            format!(" LIMIT {n} OFFSET {offset}")
        } else {
            format!(" LIMIT {n}")
        }
    }

    // ---- aggregates ----

    /// An aggregate select item with a fresh alias; the first element says
    /// whether its value is an exact integer (usable in ORDER BY).
    fn aggregate_item(&mut self) -> (Pair, bool) {
        let (expr, exact) = match self.below(25) {
            22 => {
                let column = self.pick(&["tilt_deg", "water_level_cm"]);
                // Median of integers is an integer in citytsdb, a float in DuckDB.
                (Pair::same(format!("median({column})")), false)
            }
            23 => (Pair::same("sum(DISTINCT battery_pct)"), true),
            24 => (Pair::same("avg(DISTINCT water_level_cm)"), false),
            0..=2 => (Pair::same("count(*)"), true),
            3 => (Pair::same(format!("count({})", self.pick(&COLUMNS))), true),
            4 => {
                let column = self.pick(&["device", "district", "battery_pct", "cover_open"]);
                (Pair::same(format!("count(DISTINCT {column})")), true)
            }
            5..=6 => (Pair::same(format!("sum({})", self.numeric_field())), false),
            7..=8 => (Pair::same(format!("avg({})", self.numeric_field())), false),
            9..=10 => {
                let f = self.pick(&["min", "max"]);
                let column = self.pick(&[
                    "tilt_deg",
                    "water_level_cm",
                    "battery_pct",
                    "time",
                    "device",
                    "district",
                ]);
                (Pair::same(format!("{f}({column})")), false)
            }
            11..=12 => {
                // Of equal values citytsdb's (DataFusion's) accumulator leaves
                // rounding noise (stddev 2.8e-17 of 1,943 values 0.49) where DuckDB
                // gives exactly 0, and no relative tolerance absorbs noise around
                // zero: both engines say 0 for a constant column themselves.
                let f = self.pick(&["stddev", "stddev_pop", "var_samp", "var_pop"]);
                let column = self.numeric_field();
                (
                    Pair::same(format!(
                        "CASE WHEN count({column}) > 1 AND min({column}) = max({column}) THEN 0.0 ELSE {f}({column}) END"
                    )),
                    false,
                )
            }
            13 => (
                Pair::same("sum(CASE WHEN cover_open THEN 1 ELSE 0 END)"),
                true,
            ),
            14 => {
                let atom = self.atom();
                (sql!("count(*) FILTER (WHERE {})", atom), true)
            }
            15 => {
                let f = self.pick(&["bool_or", "bool_and"]);
                (Pair::same(format!("{f}(cover_open)")), false)
            }
            16 => (
                Pair::same("max(water_level_cm) - min(water_level_cm)"),
                false,
            ),
            17 => (
                Pair::two("avg(battery_pct / 2)", "avg(battery_pct // 2)"),
                false,
            ),
            18 => (Pair::same("sum(water_level_cm * tilt_deg)"), false),
            19 => (Pair::same("min(battery_pct) + max(battery_pct)"), true),
            20 => (Pair::same("sum(battery_pct)"), true),
            _ => {
                let column = self.numeric_field();
                let lit = self.number(column);
                (
                    Pair::same(format!("sum(CASE WHEN {column} > {lit} THEN 1 ELSE 0 END)")),
                    true,
                )
            }
        };
        let alias = self.alias("a");
        (sql!("{} AS {}", expr, alias), exact)
    }

    /// 1 to 4 aggregate items; the alias of the first exact integer one, if any.
    fn aggregate_items(&mut self) -> (Pair, Option<String>) {
        let n = 1 + self.below(4);
        let mut items = Vec::new();
        let mut exact_alias = None;
        for _ in 0..n {
            let (item, exact) = self.aggregate_item();
            if exact && exact_alias.is_none() {
                exact_alias = Some(format!("a{}", self.columns_used));
            }
            items.push(item);
        }
        (Pair::join(&items, ", "), exact_alias)
    }

    /// A HAVING condition on aggregates (never on an inexact float equal to a
    /// threshold: thresholds of averages have digits no group average has).
    fn having(&mut self) -> Pair {
        let one = |g: &mut Gen| -> Pair {
            match g.below(6) {
                0..=1 => {
                    let k = g.pick(&[1, 2, 3, 10, 50, 100, 250, 287, 288, 289, 1_000, 5_000]);
                    let op = g.pick(&[">", ">=", "<", "<=", "=", "<>"]);
                    Pair::same(format!("count(*) {op} {k}"))
                }
                2 => {
                    let lit = g.number("water_level_cm");
                    Pair::same(format!("max(water_level_cm) > {lit}"))
                }
                3 => {
                    let lit = g.number("battery_pct");
                    Pair::same(format!("min(battery_pct) <= {lit}"))
                }
                4 => {
                    let column = g.pick(&["tilt_deg", "water_level_cm"]);
                    let lit = if column == "tilt_deg" {
                        format!("0.{}123457", 45 + g.below(10))
                    } else {
                        format!("{}.0123457", 20 + g.below(80))
                    };
                    Pair::same(format!("avg({column}) > {lit}"))
                }
                _ => {
                    let k = 1 + g.below(30);
                    Pair::same(format!("count(DISTINCT device) >= {k}"))
                }
            }
        };
        let a = one(self);
        match self.below(5) {
            0 => {
                let b = one(self);
                sql!("{} AND {}", a, b)
            }
            1 => {
                let b = one(self);
                sql!("({} OR {})", a, b)
            }
            _ => a,
        }
    }

    /// A GROUP BY key with a fresh alias where it is computed.
    fn key(&mut self) -> Key {
        match self.below(11) {
            10 => {
                let expr = Pair::same("date_part('hour', time)");
                let name = self.alias("hour_of_day");
                Key {
                    select: sql!("{} AS {}", expr, name),
                    expr,
                    name,
                    nullable: false,
                    cardinality: 24,
                }
            }
            9 => {
                let (expr, cardinality) = if self.chance(0.5) {
                    let v = self.number("water_level_cm");
                    (
                        Pair::same(format!(
                            "CASE WHEN water_level_cm > {v} THEN 'high' WHEN water_level_cm IS NULL THEN 'unknown' ELSE 'low' END"
                        )),
                        3,
                    )
                } else {
                    (Pair::same("coalesce(cover_open, false)"), 2)
                };
                let name = self.alias("class");
                Key {
                    select: sql!("{} AS {}", expr, name),
                    expr,
                    name,
                    nullable: false,
                    cardinality,
                }
            }
            0..=1 => Key {
                select: Pair::same("device"),
                expr: Pair::same("device"),
                name: "device".into(),
                nullable: false,
                cardinality: u64::from(self.u.devices),
            },
            2..=3 => Key {
                select: Pair::same("district"),
                expr: Pair::same("district"),
                name: "district".into(),
                // Covers written without a district tag have NULL there.
                nullable: true,
                cardinality: DISTRICTS.len() as u64 + 1,
            },
            4..=5 => {
                let (expr, secs) = self.bucket_expr();
                let name = self.alias("bucket");
                Key {
                    select: sql!("{} AS {}", expr, name),
                    expr,
                    name,
                    nullable: false,
                    cardinality: ((self.u.end - self.u.start) / secs + 1) as u64,
                }
            }
            6 => {
                let (unit, cardinality) = self.pick(&TRUNC_UNITS);
                let expr = Pair::same(format!("date_trunc('{unit}', time)"));
                let name = self.alias("trunc");
                Key {
                    select: sql!("{} AS {}", expr, name),
                    expr,
                    name,
                    nullable: false,
                    cardinality,
                }
            }
            7 => Key {
                select: Pair::same("cover_open"),
                expr: Pair::same("cover_open"),
                name: "cover_open".into(),
                nullable: true,
                cardinality: 3,
            },
            _ => {
                if self.chance(0.5) {
                    Key {
                        select: Pair::same("battery_pct"),
                        expr: Pair::same("battery_pct"),
                        name: "battery_pct".into(),
                        nullable: true,
                        cardinality: 50,
                    }
                } else {
                    let expr = Pair::two("battery_pct / 10", "battery_pct // 10");
                    let name = self.alias("decile");
                    Key {
                        select: sql!("{} AS {}", expr, name),
                        expr,
                        name,
                        nullable: true,
                        cardinality: 6,
                    }
                }
            }
        }
    }

    /// 1 to 3 distinct keys.
    fn keys(&mut self) -> Vec<Key> {
        let n = 1 + self.below(3);
        let mut keys: Vec<Key> = Vec::new();
        for _ in 0..n {
            let key = self.key();
            // One key per kind of column: two buckets, or device and device, would
            // only add duplicate names.
            let kind = |k: &Key| k.name.trim_end_matches(char::is_numeric).to_string();
            if keys.iter().all(|k| kind(k) != kind(&key)) {
                keys.push(key);
            }
        }
        keys
    }

    /// `ORDER BY` over every key (a total order on groups), each in a random
    /// direction, optionally led by an exact integer aggregate.
    fn key_order(&mut self, keys: &[Key], lead: Option<&str>) -> String {
        let mut order: Vec<&Key> = keys.iter().collect();
        // Shuffle: any permutation of the keys is a total order.
        for i in (1..order.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let mut parts = Vec::new();
        if let Some(lead) = lead {
            if self.chance(0.4) {
                // Exact, but NULL for a group without values (`sum(battery_pct)`).
                let d = if self.chance(0.5) { " DESC" } else { "" };
                let nulls = self.pick(&[" NULLS FIRST", " NULLS LAST"]);
                parts.push(format!("{lead}{d}{nulls}"));
            }
        }
        for key in order {
            let d = if self.chance(0.3) { " DESC" } else { "" };
            let nulls = if key.nullable {
                self.pick(&[" NULLS FIRST", " NULLS LAST"])
            } else {
                ""
            };
            parts.push(format!("{}{d}{nulls}", key.name));
        }
        format!(" ORDER BY {}", parts.join(", "))
    }

    // ---- query templates ----

    /// Rows under a total order, cut by LIMIT/OFFSET.
    fn rows_limit(&mut self) -> GenQuery {
        let items = self.row_items();
        let filter = self.maybe_where(0.85);
        let order = self.row_order();
        let limit = self.limit(100);
        let q = sql!(
            "SELECT {} FROM manhole{} ORDER BY {}{}",
            items,
            filter,
            order,
            limit
        );
        finish("rows_limit", q, true)
    }

    /// Rows with no order, bounded to a few devices or a short time window.
    fn rows_bounded(&mut self) -> GenQuery {
        let items = self.row_items();
        let bound = if self.chance(0.5) {
            let n = 1 + self.below(3);
            let devices: Vec<String> = (0..n).map(|_| self.device()).collect();
            Pair::same(format!("device IN ({})", devices.join(", ")))
        } else {
            let t = self.time_point();
            let width = self.pick(&[300, 600, 1_800, 3_600]);
            let (lo, hi) = (self.time_literal(t), self.time_literal(t + width));
            sql!("time >= {} AND time < {}", lo, hi)
        };
        let q = if self.chance(0.8) {
            let depth = self.below(3) as u32;
            let pred = self.predicate(depth);
            sql!("SELECT {} FROM manhole WHERE {} AND {}", items, bound, pred)
        } else {
            sql!("SELECT {} FROM manhole WHERE {}", items, bound)
        };
        finish("rows_bounded", q, false)
    }

    /// Aggregates over the whole (filtered) table: one row.
    fn aggregate(&mut self) -> GenQuery {
        let (items, _) = self.aggregate_items();
        let filter = self.maybe_where(0.8);
        let q = sql!("SELECT {} FROM manhole{}", items, filter);
        finish("aggregate", q, false)
    }

    /// GROUP BY keys, maybe HAVING, maybe ordered (and then maybe cut).
    fn group(&mut self) -> GenQuery {
        let keys = self.keys();
        let (mut aggs, exact) = self.aggregate_items();
        if keys.iter().any(|k| k.name == "device") && self.chance(0.3) {
            // Time names a row within a device, so its first and last are exact.
            let end = self.pick(&["first", "last"]);
            let column = self.pick(&FIELDS);
            let alias = self.alias("a");
            let item = Pair::two(
                format!("{end}_value({column} ORDER BY time) AS {alias}"),
                format!("{end}({column} ORDER BY time) AS {alias}"),
            );
            aggs = sql!("{}, {}", aggs, item);
        }
        let filter = self.maybe_where(0.7);
        let selects: Vec<Pair> = keys.iter().map(|k| k.select.clone()).collect();
        let select = Pair::join(&selects, ", ");
        let group_style = self.below(3);
        let group_by: Vec<Pair> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| match group_style {
                0 => Pair::same(k.name.clone()),
                1 => k.expr.clone(),
                _ => Pair::same(format!("{}", i + 1)),
            })
            .collect();
        let group_by = Pair::join(&group_by, ", ");
        let having = if self.chance(0.3) {
            let h = self.having();
            sql!(" HAVING {}", h)
        } else {
            Pair::default()
        };
        let groups: u64 = keys.iter().map(|k| k.cardinality).product();
        let (order, limit, ordered) = if groups > 2_000 || self.chance(0.5) {
            let order = self.key_order(&keys, exact.as_deref());
            let limit = if groups > 2_000 || self.chance(0.4) {
                self.limit(60)
            } else {
                String::new()
            };
            (order, limit, true)
        } else {
            (String::new(), String::new(), false)
        };
        let q = sql!(
            "SELECT {}, {} FROM manhole{} GROUP BY {}{}{}{}",
            select,
            aggs,
            filter,
            group_by,
            having,
            order,
            limit
        );
        finish("group", q, ordered)
    }

    /// Aggregates of per-device aggregates: a subquery in FROM or a CTE.
    fn nested(&mut self) -> GenQuery {
        let (bucket, secs) = self.bucket_expr();
        let bucket = if secs < 900 {
            // Keep the inner answer small: at least 15-minute buckets.
            Pair::two(
                "date_bin(INTERVAL '1 hour', time)",
                "time_bucket(INTERVAL '1 hour', time, TIMESTAMP '1970-01-01 00:00:00')",
            )
        } else {
            bucket
        };
        let column = self.numeric_field();
        let inner_agg = self.pick(&["max", "min", "count", "sum"]);
        let filter = self.maybe_where(0.6);
        let threshold = match inner_agg {
            "count" => format!("{}", self.below(4)),
            "sum" => format!("{}", 100 * self.below(20)),
            _ => self.number(column),
        };
        let inner = sql!(
            "SELECT device, district, {} AS bucket, {}({}) AS peak FROM manhole{} GROUP BY device, district, {}",
            bucket,
            inner_agg,
            column,
            filter,
            bucket
        );
        let group = self.pick(&["bucket", "district"]);
        let outer_agg = self.pick(&[
            "count(*)",
            "count(DISTINCT device)",
            "max(peak)",
            "min(peak)",
        ]);
        let q = if self.chance(0.5) {
            sql!(
                "SELECT {}, {} AS n FROM ({}) AS per_device WHERE peak > {} GROUP BY {} ORDER BY {} NULLS FIRST",
                group,
                outer_agg,
                inner,
                threshold,
                group,
                group
            )
        } else {
            sql!(
                "WITH per_device AS ({}) SELECT {}, {} AS n FROM per_device WHERE peak > {} GROUP BY {} ORDER BY {} NULLS LAST",
                inner,
                group,
                outer_agg,
                threshold,
                group,
                group
            )
        };
        finish("nested", q, true)
    }

    /// SELECT DISTINCT over exact columns.
    fn distinct(&mut self) -> GenQuery {
        let sets: [&[&str]; 5] = [
            &["district"],
            &["device"],
            &["district", "cover_open"],
            &["battery_pct"],
            &["device", "battery_pct"],
        ];
        let columns = self.pick(&sets);
        let filter = self.maybe_where(0.8);
        let list = columns.join(", ");
        if self.chance(0.5) {
            let order: Vec<String> = columns
                .iter()
                .map(|c| match *c {
                    "device" => format!("{c} DESC"),
                    _ => format!("{c} DESC NULLS LAST"),
                })
                .collect();
            let limit = if self.chance(0.5) {
                self.limit(30)
            } else {
                String::new()
            };
            let q = sql!(
                "SELECT DISTINCT {} FROM manhole{} ORDER BY {}{}",
                list,
                filter,
                order.join(", "),
                limit
            );
            finish("distinct", q, true)
        } else {
            let q = sql!("SELECT DISTINCT {} FROM manhole{}", list, filter);
            finish("distinct", q, false)
        }
    }

    /// The latest (or first) row per device.
    fn distinct_on(&mut self) -> GenQuery {
        let fields = self.pick(&[
            "water_level_cm",
            "tilt_deg, cover_open",
            "battery_pct, water_level_cm",
            "district, cover_open",
        ]);
        let filter = self.maybe_where(0.8);
        let dir = self.pick(&["DESC", "ASC"]);
        let limit = if self.chance(0.3) {
            self.limit(40)
        } else {
            String::new()
        };
        let q = sql!(
            "SELECT DISTINCT ON (device) device, time, {} FROM manhole{} ORDER BY device, time {}{}",
            fields,
            filter,
            dir,
            limit
        );
        finish("distinct_on", q, true)
    }

    /// Window functions over a few devices, ordered by device and time.
    fn window(&mut self) -> GenQuery {
        let n = 1 + self.below(3);
        let devices: Vec<String> = (0..n).map(|_| self.device()).collect();
        let column = self.pick(&["water_level_cm", "battery_pct", "tilt_deg"]);
        let window = "OVER (PARTITION BY device ORDER BY time)";
        let mut items = vec![Pair::same("device"), Pair::same("time"), Pair::same(column)];
        let m = 1 + self.below(3);
        for _ in 0..m {
            let expr = match self.below(8) {
                0 => format!("lag({column}) {window}"),
                1 => format!("lead({column}, 2) {window}"),
                2 => format!("row_number() {window}"),
                3 => format!("{column} - lag({column}) {window}"),
                4 => format!(
                    "max({column}) OVER (PARTITION BY device ORDER BY time ROWS BETWEEN 3 PRECEDING AND CURRENT ROW)"
                ),
                5 => "count(*) OVER (PARTITION BY district)".to_string(),
                6 => format!(
                    "sum({column}) OVER (PARTITION BY device ORDER BY time RANGE BETWEEN INTERVAL '15 minutes' PRECEDING AND CURRENT ROW)"
                ),
                _ => format!(
                    "count({column}) OVER (PARTITION BY device ORDER BY time ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"
                ),
            };
            let alias = self.alias("w");
            items.push(Pair::same(format!("{expr} AS {alias}")));
        }
        let items = Pair::join(&items, ", ");
        let extra = if self.chance(0.5) {
            let t = self.time_atom();
            sql!(" AND {}", t)
        } else {
            Pair::default()
        };
        let q = sql!(
            "SELECT {} FROM manhole WHERE device IN ({}){} ORDER BY device, time",
            items,
            devices.join(", "),
            extra
        );
        finish("window", q, true)
    }
}

impl Gen {
    /// How many rows an unordered `LIMIT` passes: any rows may come, but exactly
    /// `min(limit, matching)` of them.
    fn limit_count(&mut self) -> GenQuery {
        let items = self.row_items();
        let filter = self.maybe_where(0.8);
        let n = self.pick(&[0, 1, 7, 100, 5_000, 100_000]);
        let offset = if self.chance(0.3) {
            format!(" OFFSET {}", self.pick(&[1, 10, 1_000, 60_000]))
        } else {
            String::new()
        };
        let q = sql!(
            "SELECT count(*) AS n FROM (SELECT {} FROM manhole{} LIMIT {}{}) AS s",
            items,
            filter,
            n,
            offset
        );
        finish("limit_count", q, false)
    }

    /// Two filtered scans of the table in one answer.
    fn union(&mut self) -> GenQuery {
        // Summed up over the union: the union itself may be most of the table.
        let (columns, outer) = self.pick(&[
            ("device, time", "device, count(*) AS n, max(time) AS last_time"),
            ("device, district", "district, count(*) AS n"),
            (
                "time, water_level_cm",
                "count(*) AS n, count(DISTINCT time) AS times, max(water_level_cm) AS top, sum(water_level_cm) AS total",
            ),
            (
                "device, battery_pct, cover_open",
                "battery_pct, count(*) AS n, count(DISTINCT device) AS devices",
            ),
        ]);
        let group = match outer.split_once(", count") {
            Some((key, _)) if !key.is_empty() && !outer.starts_with("count") => {
                format!(" GROUP BY {key}")
            }
            _ => String::new(),
        };
        let (a, b) = (self.predicate(1), self.predicate(2));
        let bound = self.device();
        let all = if self.chance(0.6) { " ALL" } else { "" };
        let until = self.time_lit();
        let q = sql!(
            "SELECT {} FROM (SELECT {} FROM manhole WHERE device <= {} AND {} UNION{} SELECT {} FROM manhole WHERE {} AND time < {}) AS u{}",
            outer,
            columns,
            bound,
            a,
            all,
            columns,
            b,
            until,
            group
        );
        finish("union", q, false)
    }

    /// The table joined with an aggregate of itself, or filtered by a subquery
    /// (qualified columns, filters on both sides).
    fn join(&mut self) -> GenQuery {
        let filter = self.maybe_where(0.7);
        match self.below(3) {
            0 => {
                // Not battery_pct: a device's battery holds for hours, and its
                // peak matches most of its rows.
                let column = self.pick(&["water_level_cm", "tilt_deg"]);
                let f = self.pick(&["max", "min"]);
                let q = sql!(
                    "SELECT m.device, m.time, m.{} FROM manhole AS m JOIN (SELECT device, {}({}) AS peak FROM manhole{} GROUP BY device) AS p \
                     ON m.device = p.device AND m.{} = p.peak ORDER BY m.device, m.time",
                    column,
                    f,
                    column,
                    filter,
                    column
                );
                finish("join", q, true)
            }
            1 => {
                let inner = self.predicate(1);
                let items = self.pick(&[
                    "count(*) AS n",
                    "count(DISTINCT device) AS n, max(water_level_cm) AS top",
                ]);
                let not = if self.chance(0.3) { "NOT " } else { "" };
                // By district, the subquery may hold NULL (covers without one),
                // so NOT IN is never true then. DISTINCT there keeps the join's
                // build side small: a district matches thousands of rows, and a
                // hash join walking those chains takes seconds per query.
                let (column, distinct) = self.pick(&[("device", ""), ("district", "DISTINCT ")]);
                let q = sql!(
                    "SELECT district, {} FROM manhole{}{} {} {}IN (SELECT {}{} FROM manhole WHERE {}) GROUP BY district",
                    items,
                    filter,
                    if filter.city.is_empty() { " WHERE" } else { " AND" },
                    column,
                    not,
                    distinct,
                    column,
                    inner
                );
                finish("join", q, false)
            }
            _ => {
                let t = self.time_point();
                let lit = format!("TIMESTAMP '{}'", sql_timestamp(t));
                let q = sql!(
                    "SELECT a.device, a.time, a.water_level_cm, b.water_level_cm AS before \
                     FROM manhole AS a JOIN manhole AS b ON a.device = b.device AND b.time = a.time - INTERVAL '5 minutes' \
                     WHERE a.time >= {} AND a.time < {} + INTERVAL '20 minutes' AND b.device LIKE 'mh-000%' ORDER BY a.device, a.time",
                    lit,
                    lit
                );
                finish("join", q, true)
            }
        }
    }
}

fn finish(kind: &'static str, q: Pair, ordered: bool) -> GenQuery {
    GenQuery {
        kind,
        query: Query::pair(&q.city, &q.duck),
        ordered,
    }
}

/// The comparison with its operands swapped: `a < b` is `b > a`.
fn swap(op: &str) -> &str {
    match op {
        "<" => ">",
        "<=" => ">=",
        ">" => "<",
        ">=" => "<=",
        other => other,
    }
}

/// Two numeric literals, smaller first.
fn order_numbers<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    let (x, y) = (
        a.parse::<f64>().unwrap_or_default(),
        b.parse::<f64>().unwrap_or_default(),
    );
    if x <= y {
        (a, b)
    } else {
        (b, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn universe() -> Universe {
        Universe {
            devices: 210,
            start: crate::workload::DEFAULT_START,
            end: crate::workload::DEFAULT_START + crate::workload::DAY,
        }
    }

    #[test]
    fn generation_is_deterministic_and_seeded() {
        let a = generate(&universe(), 7, 300);
        let b = generate(&universe(), 7, 300);
        let c = generate(&universe(), 8, 300);
        let sqls = |qs: &[GenQuery]| qs.iter().map(|q| q.query.sql.clone()).collect::<Vec<_>>();
        assert_eq!(sqls(&a), sqls(&b));
        assert_ne!(sqls(&a), sqls(&c));
    }

    #[test]
    fn limits_come_with_a_total_order() {
        for q in generate(&universe(), 1, 2_000) {
            let sql = &q.query.sql;
            // `limit_count` counts the rows an unordered LIMIT passes, which is exact.
            if sql.contains(" LIMIT ") && q.kind != "limit_count" {
                assert!(q.ordered && sql.contains(" ORDER BY "), "{sql}");
            }
            assert!(
                !q.query.duckdb_sql.contains("date_bin("),
                "{}",
                q.query.duckdb_sql
            );
            assert!(!sql.contains("time_bucket("), "{sql}");
        }
    }

    #[test]
    fn unordered_answers_sort_by_exact_values_first() {
        let rows = |v: Value| -> Vec<Row> { serde_json::from_value(v).expect("rows") };
        let got = rows(json!([{"a": 1.0000000000001, "k": "x"}, {"a": 2.0, "k": "y"}]));
        let want = rows(json!([{"a": 2.0, "k": "y"}, {"a": 1.0, "k": "x"}]));
        assert!(compare_answers(&got, &want, false).is_ok());
        assert!(compare_answers(&got, &want, true).is_err());
    }

    #[test]
    fn an_empty_district_is_left_out_of_the_line() {
        let w = Workload::default();
        let r = Reading {
            district: "",
            ..w.reading(3, 0)
        };
        let text = line(&r);
        assert!(
            text.starts_with("manhole,device=mh-00003 tilt_deg="),
            "{text}"
        );
        let tagged = w.reading(3, 0);
        assert_eq!(line(&tagged), tagged.line());
    }

    #[test]
    fn sparse_writes_leave_fields_out() {
        let w = Workload {
            devices: 5,
            ..Workload::default()
        };
        let writes = sparse_writes(&w, 6, 3, 3, 1);
        assert!(writes.iter().any(|r| r.tilt_deg.is_none()));
        assert!(writes.iter().all(|r| r.tilt_deg.is_some()
            || r.water_level_cm.is_some()
            || r.battery_pct.is_some()
            || r.cover_open.is_some()));
        assert!(writes.iter().all(|r| (6..9).contains(&r.device)));
    }
}
