//! ringcast: the engine binary.

use clap::Parser;
use ringcast::{boot, cli};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = cli::Cli::parse();
    boot::init_logging();
    let code = match cli.command {
        Some(cli::Command::CheckConfig { path }) => boot::check_config(&path),
        Some(cli::Command::Repair { dir }) => boot::repair(&dir),
        None => boot::run(&cli),
    };
    std::process::exit(code);
}
