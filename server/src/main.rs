//! The `citytsdb` command.

use citytsdb_server::cli::QueryArgs;
use citytsdb_server::config::ServeArgs;
use citytsdb_server::gen::GenArgs;
use citytsdb_server::import::ImportArgs;
use clap::{Parser, Subcommand};

/// The allocator. glibc's hands the large buffers of a write (line protocol
/// bodies, Arrow arrays, sort keys) back to the kernel when they are freed and
/// faults them in again, zeroed, for the next write: a tenth of the server's time
/// under ingest went to page faults. mimalloc keeps them for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// citytsdb: the time-series store and query service of a city brain.
#[derive(Debug, Parser)]
#[command(name = "citytsdb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (with no flags: data under ./data, HTTP on 127.0.0.1:8181).
    // Boxed: its settings outweigh the other commands' several times over.
    Serve(Box<ServeArgs>),
    /// Run SQL against a running server and print the answer (an aligned table by default).
    Query(QueryArgs),
    /// Write the city workload as line protocol to stdout (deterministic for a seed).
    Gen(GenArgs),
    /// Load line protocol, CSV or JSON lines into a server or a data directory.
    Import(ImportArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CITYTSDB_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Planning deeply nested SQL recurses; give it room.
        .thread_stack_size(8 << 20)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        // Read again with the config file under the flags (`config.rs`).
        Command::Serve(_) => ServeArgs::load(std::env::args_os().skip(2))
            .and_then(|args| runtime.block_on(citytsdb_server::serve(args))),
        Command::Query(args) => citytsdb_server::cli::query(&args),
        // Import has exit codes of its own (2: some lines rejected).
        Command::Import(args) => return citytsdb_server::import::run(&args),
        Command::Gen(args) => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            citytsdb_server::gen::generate(&args, &mut out).map(|_| ())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
