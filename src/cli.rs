//! Command line of the `ringcast` binary.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// ringcast: a thread-per-core engine for the iii worker protocol and iii streams.
///
/// Without --config, ringcast reads ./config.yaml when it exists, else an embedded default
/// (workers on 127.0.0.1:49134, streams on 127.0.0.1:3112, in-memory store). Logs go to stderr;
/// set RUST_LOG (e.g. RUST_LOG=debug or RUST_LOG=ringcast=trace) to change what is logged.
/// SIGINT/SIGTERM stop the engine gracefully. Exit code 2 means it could not start (config,
/// port in use, locked-memory limit): the error line says what to do.
#[derive(Debug, Parser)]
#[command(name = "ringcast", version, about, long_about)]
pub struct Cli {
    /// iii engine config file (`workers:` list; `${VAR}` and `${VAR:default}` are expanded).
    #[arg(long, short = 'c', value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,

    /// Number of shard executors that own stream groups [default: CPUs - 1, at least 1].
    /// More shards than CPUs is allowed: shards then share CPUs.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,

    /// CPU that runs the control core (worker protocol) [default: the first allowed CPU].
    #[arg(long, value_name = "K")]
    pub control_core: Option<usize>,

    /// How long an idle core keeps polling before it sleeps in the kernel, in microseconds.
    /// Work arriving within the window is served without a wake-up; raise it where waking a
    /// sleeping CPU is slow (virtual machines), at the cost of that much busy CPU per idle spell.
    #[arg(long, value_name = "MICROS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub spin_us: u64,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file and print the effective configuration, then exit.
    CheckConfig {
        /// The config file to check.
        path: PathBuf,
    },
    /// Salvage every intact record of a damaged file-store shard directory (e.g.
    /// ./data/stream_store/shard-0) into fresh segments; damaged segments are kept aside.
    Repair {
        /// The shard directory to repair.
        dir: PathBuf,
    },
}
