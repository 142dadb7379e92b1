//! `loadtest`: load generator for the danmaku WebSocket gateway.
//!
//! Three scenarios, each a bounded run that ends by itself and prints one report
//! (a table, or one JSON object with `--json`) on stdout, with a progress line on stderr
//! every second:
//!
//! - `fanout`: receivers and senders in rooms; chat delivery ratio and latency.
//! - `idle`: hold N idle viewers; with `--pid`, the gateway's RSS per connection.
//! - `storm`: open N connections as fast as a concurrency allows; time to all joined.
//!
//! Exit status: 0 when the run met its criteria, 1 when it did not (a connection failed
//! in `idle`/`storm`, the delivery ratio was below `--min-delivery-ratio` in `fanout`),
//! 2 on a setup error.
//!
//! Modules: [`client`] (connect, bind, WebSocket config), [`proto`] (wire frames),
//! [`auth`] (JWT minting), [`report`] (histograms, tallies, output), [`progress`]
//! (stderr ticker), [`sys`] (rlimit, RSS), [`scenarios`] (the runs themselves).

mod auth;
mod client;
mod progress;
mod proto;
mod report;
mod scenarios;
mod sys;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use report::Report;
use scenarios::fanout::FanoutArgs;
use scenarios::idle::IdleArgs;
use scenarios::storm::StormArgs;

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load generator for the danmaku gateway"
)]
struct Cli {
    /// Print the final report as one JSON object on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Tokio worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Chat fan-out: receivers + senders over rooms; delivery ratio and latency.
    Fanout(FanoutArgs),
    /// Hold N idle anonymous viewers; measure the gateway's RSS per connection (--pid).
    Idle(IdleArgs),
    /// Connect storm: N connections at concurrency C; time to all joined.
    Storm(StormArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = cli.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the chosen scenario and prints its report; true if it passed.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let nofile = sys::raise_nofile_limit();
    scenarios::watch_ctrl_c();
    let json = cli.json;
    match cli.command {
        Command::Fanout(args) => Ok(finish(&scenarios::fanout::run(args, nofile).await?, json)),
        Command::Idle(args) => Ok(finish(&scenarios::idle::run(args, nofile).await?, json)),
        Command::Storm(args) => Ok(finish(&scenarios::storm::run(args, nofile).await?, json)),
    }
}

fn finish<R: Report>(report: &R, json: bool) -> bool {
    report::emit(report, json);
    report.passed()
}
