//! Configuration errors end the binary at start: exit code 2 and a message naming the
//! key, before anything is bound or opened (the checks themselves are unit tests in
//! `src/config.rs`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the gateway with the shipped config and `env` overrides; returns its exit code
/// and stderr. A gateway that starts serving instead is killed and reported as `None`.
fn run_gateway(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_danmaku-gateway"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GATEWAY_") {
            cmd.env_remove(k);
        }
    }
    let data = std::env::temp_dir().join(format!("danmaku-test-config-{}", std::process::id()));
    cmd.arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .env("GATEWAY_SERVER__LISTEN", "127.0.0.1:0")
        .env("GATEWAY_DATA__DIR", &data)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let _ = std::fs::remove_dir_all(&data);
    (code, stderr)
}

#[test]
fn an_invalid_value_exits_2_naming_the_key() {
    for (var, value, key) in [
        // A zero rate used to panic building the rate limiter.
        ("GATEWAY_RATELIMIT__CHAT__RATE", "0", "ratelimit.chat.rate"),
        // A zero sync period used to panic the presence timer (with Redis).
        ("GATEWAY_PRESENCE__SYNC_MS", "0", "presence.sync_ms"),
    ] {
        let (code, stderr) = run_gateway(&[(var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(&format!("`{key}`")),
            "{var}={value}: {stderr}"
        );
    }
}
