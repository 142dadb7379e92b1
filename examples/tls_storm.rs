//! TLS benchmark for the gateway's edge: a handshake storm and memory per idle `wss://`
//! connection, against a running gateway (release build) on loopback.
//!
//! ```sh
//! cargo run --release --example tls_storm -- gen-cert /tmp/tls        # ca.pem cert.pem key.pem
//! GATEWAY_SERVER__LISTEN=127.0.0.1:9443 \
//!   GATEWAY_SERVER__TLS__CERT=/tmp/tls/cert.pem GATEWAY_SERVER__TLS__KEY=/tmp/tls/key.pem \
//!   target/release/danmaku-gateway &
//! cargo run --release --example tls_storm -- storm --addr 127.0.0.1:9443 --ca /tmp/tls/ca.pem \
//!   --conns 5000 --concurrency 200 --pid $!
//! cargo run --release --example tls_storm -- idle --addr 127.0.0.1:9443 --ca /tmp/tls/ca.pem \
//!   --conns 15000 --pid $!
//! ```
//!
//! `storm`: each of `--concurrency` workers connects, does the TLS handshake (full, no
//! resumption unless `--resume`), upgrades to WebSocket, reads `hello` and closes, until
//! `--conns` are done. Reports time, failures, connect→hello latency and the gateway's CPU
//! seconds per connection (utime + stime from `/proc/PID/stat`). `idle`: opens `--conns`
//! connections, holds them, and reports the gateway's resident memory per connection
//! (`VmRSS` from `/proc/PID/status`). `--plain` runs either against a plain `ws://`
//! gateway for comparison. Loopback only; every loop is bounded by `--conns`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// Gateway address (loopback).
    #[arg(long, default_value = "127.0.0.1:9443")]
    addr: SocketAddr,
    /// CA certificate (PEM) to trust; not needed with --plain.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Plain ws:// instead of wss://.
    #[arg(long)]
    plain: bool,
    /// Let the client resume TLS sessions (default: every handshake is a full one).
    #[arg(long)]
    resume: bool,
    /// Gateway process id, for its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Connections in total.
    #[arg(long, default_value_t = 5000)]
    conns: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes ca.pem, cert.pem (leaf for localhost/127.0.0.1, ECDSA P-256) and key.pem.
    GenCert { dir: PathBuf },
    /// Connect, handshake, upgrade, hello, close; repeated --conns times.
    Storm(Target),
    /// Opens --conns connections and holds them; memory per connection.
    Idle {
        #[command(flatten)]
        target: Target,
        /// Seconds to hold the connections before measuring.
        #[arg(long, default_value_t = 5)]
        settle_s: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.cmd {
        Cmd::GenCert { dir } => gen_cert(&dir),
        Cmd::Storm(t) => rt.block_on(storm(t)),
        Cmd::Idle { target, settle_s } => rt.block_on(idle(target, settle_s)),
    }
}

fn gen_cert(dir: &std::path::Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "tls_storm CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?
        .signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("cert.pem"), leaf.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    println!("wrote {}/{{ca,cert,key}}.pem", dir.display());
    Ok(())
}

fn connector(t: &Target) -> anyhow::Result<Option<TlsConnector>> {
    if t.plain {
        return Ok(None);
    }
    let ca =
        t.ca.as_ref()
            .ok_or_else(|| anyhow::anyhow!("--ca is needed for wss://"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !t.resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Some(TlsConnector::from(Arc::new(cfg))))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection up to `hello`; the open WebSocket.
async fn open(
    addr: SocketAddr,
    tls: &Option<TlsConnector>,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>> {
    let tcp = TcpStream::connect(addr).await?;
    let (io, url): (Box<dyn Io>, _) = match tls {
        None => (Box::new(tcp), format!("ws://{addr}/ws")),
        Some(c) => (
            Box::new(c.connect(ServerName::try_from("localhost")?, tcp).await?),
            "wss://localhost/ws".to_string(),
        ),
    };
    let (mut ws, _) = tokio_tungstenite::client_async(url, io).await?;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(m))) if m.is_text() && m.to_text()?.contains("\"hello\"") => Ok(ws),
        other => anyhow::bail!("no hello: {other:?}"),
    }
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn storm(t: Target) -> anyhow::Result<()> {
    let tls = Arc::new(connector(&t)?);
    let left = Arc::new(AtomicUsize::new(t.conns));
    let failures = Arc::new(AtomicUsize::new(0));
    let cpu_before = t.pid.and_then(cpu_seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..t.concurrency.max(1) {
        let (tls, left, failures) = (Arc::clone(&tls), Arc::clone(&left), Arc::clone(&failures));
        let addr = t.addr;
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let t0 = Instant::now();
                match open(addr, &tls).await {
                    Ok(mut ws) => {
                        lat.push(t0.elapsed());
                        let _ = ws.close(None).await;
                    }
                    Err(e) => {
                        if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("failure: {e:#}");
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await?);
    }
    let elapsed = started.elapsed();
    lat.sort();
    let ok = lat.len();
    println!(
        "{} storm: {} connections at concurrency {} in {:.2} s ({:.0}/s), {} failed",
        if t.plain { "ws://" } else { "wss://" },
        t.conns,
        t.concurrency,
        elapsed.as_secs_f64(),
        ok as f64 / elapsed.as_secs_f64(),
        failures.load(Ordering::Relaxed)
    );
    println!(
        "connect -> hello: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        quantile(&lat, 0.5).as_secs_f64() * 1e3,
        quantile(&lat, 0.99).as_secs_f64() * 1e3,
        quantile(&lat, 1.0).as_secs_f64() * 1e3
    );
    if let (Some(pid), Some(before)) = (t.pid, cpu_before) {
        // Let the gateway finish the closes before reading its CPU time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let used = cpu_seconds(pid).unwrap_or(before) - before;
        println!(
            "gateway CPU: {:.2} s total, {:.0} us per connection",
            used,
            used / ok.max(1) as f64 * 1e6
        );
    }
    Ok(())
}

async fn idle(t: Target, settle_s: u64) -> anyhow::Result<()> {
    let pid = t
        .pid
        .ok_or_else(|| anyhow::anyhow!("--pid is needed to read the gateway's memory"))?;
    let tls = Arc::new(connector(&t)?);
    let rss_before = rss_kib(pid).unwrap_or(0);
    let sem = Arc::new(tokio::sync::Semaphore::new(t.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(t.conns);
    for _ in 0..t.conns {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let tls = Arc::clone(&tls);
        let addr = t.addr;
        tasks.push(tokio::spawn(async move {
            let r = open(addr, &tls).await;
            drop(permit);
            r
        }));
    }
    let mut open_ws = Vec::with_capacity(t.conns);
    let mut failures = 0;
    for task in tasks {
        match task.await? {
            Ok(ws) => open_ws.push(ws),
            Err(e) => {
                failures += 1;
                if failures <= 5 {
                    eprintln!("failure: {e:#}");
                }
            }
        }
    }
    println!(
        "opened {} {} connections in {:.1} s ({failures} failed); holding {settle_s} s",
        open_ws.len(),
        if t.plain { "ws://" } else { "wss://" },
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(settle_s)).await;
    let rss_after = rss_kib(pid).unwrap_or(0);
    let n = open_ws.len().max(1);
    println!(
        "gateway RSS: {:.1} MiB before, {:.1} MiB with {} open: {:.2} KiB per connection",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        open_ws.len(),
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64
    );
    drop(open_ws);
    Ok(())
}
