//! Reading the pruning counters out of `EXPLAIN ANALYZE` plan text.
//!
//! The scan over a table prints one line containing `CityScanExec:` followed by
//! space-separated `key=value` pairs, e.g.
//! `CityScanExec: table=manhole segments_total=30 segments_opened=1 rows_total=720000 ...`.

use std::collections::HashMap;

/// The numeric `key=value` pairs of the first line containing `CityScanExec:`,
/// or `None` when the plan has no such line.
///
/// Values that are not plain unsigned integers (`table=manhole`, `elapsed=1.2ms`)
/// are left out; separators DataFusion puts around metrics (`[`, `]`, `,`) are
/// tolerated.
pub fn scan_metrics(plan_text: &str) -> Option<HashMap<String, u64>> {
    let line = plan_text
        .lines()
        .find(|line| line.contains("CityScanExec:"))?;
    let (_, after) = line.split_once("CityScanExec:")?;
    let cleaned: String = after
        .chars()
        .map(|c| if matches!(c, '[' | ']' | ',') { ' ' } else { c })
        .collect();
    let metrics = cleaned
        .split_whitespace()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let value = value.parse::<u64>().ok()?;
            Some((key.to_string(), value))
        })
        .collect();
    Some(metrics)
}

/// The value of `key` (`table=manhole` gives `manhole`) on the `CityScanExec:`
/// line, numeric or not.
pub fn scan_attribute(plan_text: &str, key: &str) -> Option<String> {
    let line = plan_text
        .lines()
        .find(|line| line.contains("CityScanExec:"))?;
    let (_, after) = line.split_once("CityScanExec:")?;
    after
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_scan_line_among_others() {
        let plan = "ProjectionExec: expr=[time@0 as time], metrics=[output_rows=24]\n  \
                    CityScanExec: table=manhole segments_total=30 segments_opened=1 rows_total=720000 \
                    rows_selected=24 rows_decoded=1024, metrics=[output_rows=24, elapsed_compute=1.5ms]\n";
        let m = scan_metrics(plan).expect("scan line");
        assert_eq!(m["segments_total"], 30);
        assert_eq!(m["segments_opened"], 1);
        assert_eq!(m["rows_total"], 720_000);
        assert_eq!(m["rows_selected"], 24);
        assert_eq!(m["rows_decoded"], 1024);
        assert_eq!(m["output_rows"], 24);
        assert!(!m.contains_key("table"));
        assert!(!m.contains_key("elapsed_compute"));
        assert_eq!(scan_attribute(plan, "table").as_deref(), Some("manhole"));
    }

    #[test]
    fn no_scan_line_is_none() {
        assert!(scan_metrics("ProjectionExec: expr=[1]").is_none());
    }
}
