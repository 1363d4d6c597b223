//! The SQL golden files: every `tests/slt/*.slt` run against the real server over
//! HTTP, on the dataset `tests/slt/data/city.lp`, in every layout of that dataset
//! (all in the write buffer, partly flushed, all in Parquet segments).
//!
//! `CITYTSDB_SLT_COMPLETE=1` rewrites the expected answers from the actual ones
//! instead of checking them (completion mode; review the diff before committing).
//! `CITYTSDB_SLT_FILES=basics.slt,time.slt` runs only the named files.
//! The format is described in `tests/slt/README.md` and `citytsdb_tests::slt`.

use std::path::PathBuf;

use citytsdb_tests::slt::{self, Options};

#[test]
fn sql_golden_files_answer_as_recorded() {
    let complete = std::env::var("CITYTSDB_SLT_COMPLETE").is_ok_and(|v| v == "1");
    let files: Vec<PathBuf> = match std::env::var("CITYTSDB_SLT_FILES") {
        Ok(names) if !names.trim().is_empty() => names
            .split(',')
            .map(|n| slt::slt_dir().join(n.trim()))
            .collect(),
        _ => slt::default_files(),
    };
    assert!(
        !files.is_empty(),
        "no .slt files in {}",
        slt::slt_dir().display()
    );
    let report = slt::run(
        &files,
        &Options {
            complete,
            ..Options::default()
        },
    );
    for file in &report.completed {
        eprintln!("slt: completed {}", file.display());
    }
    assert!(report.failures.is_empty(), "{}", report.failures_text());
    eprintln!(
        "slt: {} files, {} records ({} queries) over all layouts passed",
        files.len(),
        report.records,
        report.queries
    );
}
