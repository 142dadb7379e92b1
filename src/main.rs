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

/// Accept backlog: a storm of viewers arriving at once (the seed's 20k-viewer match)
/// must queue in the kernel, not be dropped into a 1 s SYN retry as with the default 128.
const BACKLOG: u32 = 4096;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
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
        let listener = bind(cfg.server.listen)
            .map_err(|e| anyhow::anyhow!("binding server.listen = {}: {e}", cfg.server.listen))?;
        server::run(listener, cfg, shutdown::signal()).await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // TLS files and the trust list are configuration too: exit 2 like a bad value.
            if e.downcast_ref::<server::ServerError>()
                .is_some_and(server::ServerError::is_config)
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
