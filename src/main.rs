//! ringcast: the engine binary.

mod boot;
mod cli;
mod config;
mod control;
mod metrics;
mod stream;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for "could not start": bad config, port in use, locked-memory limit.
const EXIT_START_FAILED: i32 = 2;

fn main() {
    let cli = cli::Cli::parse();
    boot::init_logging();
    let code = match cli.command {
        Some(cli::Command::CheckConfig { path }) => boot::check_config(&path),
        None => boot::run(&cli),
    };
    std::process::exit(code);
}
