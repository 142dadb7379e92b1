//! The gateway binary: parse args, load config, bind, serve until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use danmaku_gateway::config::{self, Config};
use danmaku_gateway::{server, shutdown};
use tracing_subscriber::EnvFilter;

/// Real-time danmaku and live-chat WebSocket gateway.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Default: ./config.toml if present, else built-in defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.auth.secret == config::DEV_SECRET || cfg.api.token == config::DEV_API_TOKEN {
        tracing::warn!(
            "auth.secret or api.token is the shipped development value: set your own before going live"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.server.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding server.listen = {}: {e}", cfg.server.listen))?;
        server::run(listener, cfg, shutdown::signal()).await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
