//! `loadtest`: load generator for the danmaku WebSocket gateway.
//!
//! Eight scenarios, each a bounded run that ends by itself and prints one report
//! (a table, or one JSON object with `--json`) on stdout, with a progress line on stderr
//! every second:
//!
//! - `fanout`: receivers and senders in rooms; chat delivery ratio and latency.
//! - `rooms`: the same engine over many small rooms (10k viewers / 1k rooms by default).
//! - `soak`: steady mixed traffic: chat, free gifts, viewers leaving/rejoining.
//! - `redpacket`: a grab storm on one packet; latency, exact sums, server and journal.
//! - `idle`: hold N idle viewers; with `--pid`, the gateway's RSS per connection.
//! - `storm`: open N connections as fast as a concurrency allows; time to all joined.
//! - `slowloris`: N silent TCP connections; time until the gateway has shed them all, and
//!   `/healthz` latency and failures meanwhile.
//! - `reconnect`: viewers in a hot room lose their connections (gateway restart, node
//!   killed, the tool's own blink) and come back with `join` + `since`; reconnect time,
//!   `recovered` answers, and per viewer missing and duplicate chats.
//!
//! Exit status: 0 when the run met its criteria, 1 when it did not (a connection failed
//! in `idle`/`storm`, a grab failed or a sum mismatched in `redpacket`, the delivery
//! ratio was below `--min-delivery-ratio`, a silent connection was never shed or a health
//! check failed in `slowloris`, a viewer that never disconnected or always recovered
//! missed or duplicated a chat in `reconnect`, or an `--slo` was missed), 2 on a setup
//! error.
//!
//! Compression: `--compress` (every scenario but `slowloris`) makes each connection offer
//! permessage-deflate and inflate what arrives compressed; `fanout`/`rooms`/`soak` then
//! report how many upgrades agreed and how many `batch` frames arrived compressed, and
//! `idle` the agreement (the gateway's RSS per connection with compression on). Every
//! `fanout`/`rooms`/`soak` report has `wire_bytes_in` (bytes read from the sockets, first
//! chat to end of drain) and `wire_bytes_per_delivered_event`. `--corpus mixed` (`fanout`,
//! `rooms`, `soak`, `reconnect`) appends a live-room phrase to every chat's stamp.
//! Usage in detail: `loadtest/README.md`.
//!
//! Modules: [`client`] (connect, bind, WebSocket config, the permessage-deflate upgrade,
//! round-robin targets), [`wire`] (socket byte counting, RSV1 scan), [`proto`] (wire
//! frames, chat stamps), [`corpus`] (live-room chat texts), [`http`] (the backend API),
//! [`auth`] (JWT minting), [`report`] (histograms, tallies, output), [`slo`]
//! (objectives), [`progress`] (stderr ticker), [`sys`] (rlimit, RSS), [`scenarios`] (the
//! runs themselves).

mod auth;
mod client;
mod corpus;
mod http;
mod progress;
mod proto;
mod report;
mod scenarios;
mod slo;
mod sys;
mod wire;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use report::Report;
use scenarios::fanout::{FanoutArgs, RoomsArgs, SoakArgs};
use scenarios::idle::IdleArgs;
use scenarios::reconnect::ReconnectArgs;
use scenarios::redpacket::RedpacketArgs;
use scenarios::slowloris::SlowlorisArgs;
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
    /// Many small rooms: fan-out with 10k receivers over 1k rooms (by default).
    Rooms(RoomsArgs),
    /// Steady mixed traffic: chat, free gifts, viewers leaving/rejoining, reconnects.
    Soak(SoakArgs),
    /// Red-packet grab storm: N users grab one packet at once; sums checked end to end.
    Redpacket(RedpacketArgs),
    /// Hold N idle anonymous viewers; measure the gateway's RSS per connection (--pid).
    Idle(IdleArgs),
    /// Connect storm: N connections at concurrency C; time to all joined.
    Storm(StormArgs),
    /// N silent TCP connections: time until the gateway shed them all; /healthz meanwhile.
    Slowloris(SlowlorisArgs),
    /// Viewers lose their connections (restart, node killed, blink) and resume with
    /// `join` + `since`; reconnect time, recovered answers, missing/duplicate chats.
    Reconnect(ReconnectArgs),
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
    let outcome = runtime.block_on(run(cli));
    // Tasks still running (a stuck reader, say) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
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
        Command::Fanout(args) => Ok(finish(
            &scenarios::fanout::run_fanout(args, nofile).await?,
            json,
        )),
        Command::Rooms(args) => Ok(finish(
            &scenarios::fanout::run_rooms(args, nofile).await?,
            json,
        )),
        Command::Soak(args) => Ok(finish(
            &scenarios::fanout::run_soak(args, nofile).await?,
            json,
        )),
        Command::Redpacket(args) => Ok(finish(
            &scenarios::redpacket::run(args, nofile).await?,
            json,
        )),
        Command::Idle(args) => Ok(finish(&scenarios::idle::run(args, nofile).await?, json)),
        Command::Storm(args) => Ok(finish(&scenarios::storm::run(args, nofile).await?, json)),
        Command::Slowloris(args) => Ok(finish(
            &scenarios::slowloris::run(args, nofile).await?,
            json,
        )),
        Command::Reconnect(args) => Ok(finish(
            &scenarios::reconnect::run(args, nofile).await?,
            json,
        )),
    }
}

fn finish<R: Report>(report: &R, json: bool) -> bool {
    report::emit(report, json);
    report.passed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn targets_split_on_commas_and_url_is_an_alias() {
        let Command::Fanout(a) = parse(&["fanout"]).command else {
            panic!("not fanout")
        };
        assert_eq!(a.conn.targets, ["ws://127.0.0.1:8080/ws"]);
        let Command::Storm(a) = parse(&[
            "storm",
            "--target",
            "ws://10.0.0.1:8080/ws,ws://10.0.0.2:8080/ws",
        ])
        .command
        else {
            panic!("not storm")
        };
        assert_eq!(
            a.conn.targets,
            ["ws://10.0.0.1:8080/ws", "ws://10.0.0.2:8080/ws"]
        );
        assert_eq!(a.conn.url(), "ws://10.0.0.1:8080/ws,ws://10.0.0.2:8080/ws");
        let Command::Idle(a) =
            parse(&["idle", "--url", "ws://h:1/ws", "--url", "ws://h:2/ws"]).command
        else {
            panic!("not idle")
        };
        assert_eq!(a.conn.targets, ["ws://h:1/ws", "ws://h:2/ws"]);
    }

    #[test]
    fn slo_flags_parse_on_every_scenario() {
        for scenario in [
            "fanout",
            "rooms",
            "soak",
            "redpacket",
            "idle",
            "storm",
            "slowloris",
            "reconnect",
        ] {
            let cli = parse(&[
                scenario,
                "--slo",
                "delivery=0.999,p99_ms=100",
                "--slo-p99-ms",
                "80",
            ]);
            let conn = match cli.command {
                Command::Fanout(a) => a.conn,
                Command::Rooms(a) => a.conn,
                Command::Soak(a) => a.conn,
                Command::Redpacket(a) => a.conn,
                Command::Idle(a) => a.conn,
                Command::Storm(a) => a.conn,
                Command::Slowloris(a) => a.conn,
                Command::Reconnect(a) => a.conn,
            };
            let slo = conn.slo.slo();
            assert_eq!((slo.delivery, slo.p99_ms), (Some(0.999), Some(80.0)));
        }
        for bad in [
            &["fanout", "--slo", "delivery=2"][..],
            &["fanout", "--slo", "nope=1"],
            &["storm", "--slo-delivery", "1.1"],
            &["storm", "--slo-p99-ms", "-3"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("loadtest").chain(bad.iter().copied()))
                    .is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn compress_and_corpus_parse_where_they_apply() {
        let Command::Fanout(a) = parse(&["fanout"]).command else {
            panic!("not fanout")
        };
        assert!(!a.conn.compress);
        assert_eq!(a.corpus.corpus, corpus::CorpusKind::Stamp);
        assert!(a.corpus.chatter(0).is_none());
        let Command::Fanout(a) = parse(&[
            "fanout",
            "--compress",
            "--corpus",
            "mixed",
            "--corpus-seed",
            "7",
        ])
        .command
        else {
            panic!("not fanout")
        };
        assert!(a.conn.compress);
        assert_eq!(
            (a.corpus.corpus, a.corpus.corpus_seed),
            (corpus::CorpusKind::Mixed, 7)
        );
        assert!(a.corpus.chatter(3).is_some());
        let Command::Rooms(a) = parse(&["rooms", "--compress", "--corpus", "mixed"]).command else {
            panic!("not rooms")
        };
        let a = scenarios::fanout::FanoutArgs::from(a);
        assert!(a.conn.compress && a.corpus.corpus == corpus::CorpusKind::Mixed);
        let Command::Idle(a) = parse(&["idle", "--compress"]).command else {
            panic!("not idle")
        };
        assert!(a.conn.compress);
        for scenario in ["soak", "reconnect"] {
            parse(&[scenario, "--compress", "--corpus", "mixed"]);
        }
        for bad in [
            &["fanout", "--corpus", "klingon"][..],
            &["idle", "--corpus", "mixed"],
            &["fanout", "--compress=maybe"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("loadtest").chain(bad.iter().copied()))
                    .is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn scenario_defaults() {
        let Command::Rooms(a) = parse(&["rooms"]).command else {
            panic!("not rooms")
        };
        assert_eq!(
            (a.conns, a.rooms, a.senders, a.rate, a.duration),
            (10_000, 1000, 100, 100.0, 20.0)
        );
        let Command::Redpacket(a) =
            parse(&["redpacket", "--conns", "50", "--journal", "/tmp/d"]).command
        else {
            panic!("not redpacket")
        };
        assert_eq!((a.conns, a.shares, a.total), (50, None, None));
        assert_eq!(a.api_token, "dev-api-token-change-me");
        assert_eq!(a.journal.as_deref(), Some(std::path::Path::new("/tmp/d")));
        let Command::Soak(a) = parse(&["soak", "--duration", "5"]).command else {
            panic!("not soak")
        };
        assert_eq!((a.duration, a.gift.as_str()), (5.0, "rose"));
        let Command::Reconnect(a) = parse(&[
            "reconnect",
            "--conns",
            "50",
            "--blink-at",
            "3,7.5",
            "--target",
            "ws://h:1/ws,ws://h:2/ws",
        ])
        .command
        else {
            panic!("not reconnect")
        };
        assert_eq!((a.viewers, a.senders, a.rate), (50, 10, 10.0));
        assert_eq!(a.blink_at, [3.0, 7.5]);
        assert_eq!((a.backoff_ms, a.max_backoff_ms), (100, 5000));
        assert_eq!(a.conn.targets.len(), 2);
        assert!(a.room.is_none() && a.pid_file.is_none());
    }
}
