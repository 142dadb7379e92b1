//! The gateway binary: parse args, load config, bind, serve until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use danmaku_gateway::config::{self, Config, LimitsConfig};
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

/// Descriptors the gateway needs beyond its connections: the listener, Redis, the
/// journal, logs, `/metrics` scrapes, HTTP API calls.
const FD_HEADROOM: u64 = 1024;

/// Raises the soft open-file limit to the hard one, and warns when it still cannot hold
/// `limits.max_conns` sessions plus `limits.max_handshakes` connections waiting for
/// their first request plus [`FD_HEADROOM`]: past it, `accept` fails (EMFILE) and new
/// clients and health checks time out while the limits say there is room.
fn raise_open_files(limits: &LimitsConfig) {
    let needed = (limits.max_conns as u64)
        .saturating_add(limits.max_handshakes as u64)
        .saturating_add(FD_HEADROOM);
    // An unlimited hard limit cannot be the soft one for descriptors (the kernel caps
    // it at fs.nr_open); then ask for what is needed.
    let raised = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::increase_nofile_limit(needed))
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft));
    match raised {
        Ok(soft) if soft < needed => tracing::warn!(
            open_files = soft,
            needed,
            "the open-file limit (ulimit -n, or LimitNOFILE= under systemd) is below \
             limits.max_conns + limits.max_handshakes + {FD_HEADROOM}: raise it or lower \
             those limits, else running out of descriptors makes new clients and \
             /healthz fail"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)"),
    }
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
    raise_open_files(&cfg.limits);
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
