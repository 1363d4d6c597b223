//! Runs the SQL golden files against the real server; `--complete` rewrites their
//! expected answers from the actual ones.
//!
//! ```text
//! cargo run -p citytsdb-tests --bin slt -- [--complete] [--layout memory|mixed|flushed]... [FILES...]
//! ```
//!
//! With no files, every `tests/slt/*.slt` runs; with no `--layout`, every layout.
//! Set `CITYTSDB_BIN=target/debug/citytsdb` to use a server binary already built
//! (without it the binary is built first with `cargo build -p citytsdb-server --bin
//! citytsdb`). The exit code is 1 when a record failed, 2 on bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use citytsdb_tests::slt::{self, Layout, Options};

const USAGE: &str =
    "usage: slt [--complete] [--layout memory|mixed|flushed]... [FILES...] (default: tests/slt/*.slt)";

fn main() -> ExitCode {
    let mut options = Options {
        complete: false,
        layouts: Vec::new(),
    };
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--complete" => options.complete = true,
            "--layout" => match args.next().as_deref().and_then(Layout::parse) {
                Some(layout) => options.layouts.push(layout),
                None => {
                    eprintln!("--layout takes memory, mixed or flushed\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            a if a.starts_with('-') => {
                eprintln!("unknown option {a}\n{USAGE}");
                return ExitCode::from(2);
            }
            file => files.push(PathBuf::from(file)),
        }
    }
    if options.layouts.is_empty() {
        options.layouts = Layout::ALL.to_vec();
    }
    if files.is_empty() {
        files = slt::default_files();
    }
    let report = slt::run(&files, &options);
    for file in &report.completed {
        println!("completed {}", file.display());
    }
    if report.failures.is_empty() {
        println!(
            "{} files, {} records ({} queries): all passed",
            files.len(),
            report.records,
            report.queries
        );
        ExitCode::SUCCESS
    } else {
        println!("{}", report.failures_text());
        ExitCode::FAILURE
    }
}
