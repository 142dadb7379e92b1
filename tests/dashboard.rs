//! The operations bundle stays true to the gateway: every metric that the Grafana dashboard
//! (`grafana/dashboard.json`) and the alert rules (`prometheus/alerts.yml`) query is one a
//! running gateway exports, every `danmaku_*` metric it exports has a panel, and the
//! deploy files (Dockerfile, docker-compose.yml, Prometheus/Grafana provisioning,
//! `deploy/kubernetes/`) say what the docs say.
//!
//! Metric names come from each query's PromQL (`danmaku_…` and `process_…` identifiers,
//! histogram series suffixes stripped); a metric counts as exported when its `# TYPE`
//! line or a sample of it is in `/metrics`. A series appears only once something touched
//! it, so the tests drive traffic first: chat, gifts, a bad frame, rate limits, a refused
//! upgrade, a red packet created and grabbed. Backplane and Redis metrics exist only with
//! `backplane = "redis"`: those are checked on two Redis nodes, through a Redis outage
//! (dropped envelopes, errors and reconnects are counted only then).

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use danmaku_gateway::config::{BackplaneKind, Config};
use serde_json::{Value, json};
use support::{
    Gateway, RedisServer, metric, metrics_text, redis_node, relax_rate_limits, wait_until_for,
};
use tokio_tungstenite::tungstenite::Message;

/// Rows the dashboard must have (case-insensitive prefixes of row titles).
const ROWS: [&str; 11] = [
    "traffic",
    "latency",
    "rooms",
    "abuse",
    "red packets",
    "backplane",
    "process",
    "moderation",
    "recovery",
    "event stream",
    "compression",
];

/// The process collector's metrics the dashboard's Process row relies on.
const PROCESS_METRICS: [&str; 3] = [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
];

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana/dashboard.json")).expect("dashboard.json is JSON")
}

/// `danmaku_*` and `process_*` metric names in a PromQL expression (or any text), with
/// the histogram series suffixes `_bucket`, `_sum`, `_count` stripped.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &text[i..];
        if at_word_start && (rest.starts_with("danmaku_") || rest.starts_with("process_")) {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
                .count();
            names.insert(base_name(&rest[..len]).to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

fn base_name(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| series.strip_suffix(s))
        .unwrap_or(series)
}

/// Every panel, rows' nested panels included (a collapsed row holds its panels).
fn all_panels(panels: &Value, out: &mut Vec<Value>) {
    for p in panels.as_array().expect("panels is an array") {
        out.push(p.clone());
        if let Some(nested) = p.get("panels") {
            all_panels(nested, out);
        }
    }
}

/// (panel title, expr) of every panel target.
fn panel_exprs(dash: &Value) -> Vec<(String, String)> {
    let mut panels = Vec::new();
    all_panels(&dash["panels"], &mut panels);
    panels
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect()
}

/// Every metric the dashboard queries: panel targets, annotations, template variables.
fn dashboard_metrics(dash: &Value) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = panel_exprs(dash)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    for a in dash["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            names.extend(metric_names(e));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(d) = v["definition"].as_str() {
            names.extend(metric_names(d));
        }
    }
    names
}

/// Metrics the alert rules query.
fn alert_metrics() -> BTreeSet<String> {
    metric_names(&read("prometheus/alerts.yml"))
}

/// Metrics the dashboard or the alert rules query.
fn queried_metrics() -> BTreeSet<String> {
    let mut names = dashboard_metrics(&dashboard());
    names.extend(alert_metrics());
    names
}

/// Metric names present in a Prometheus text exposition: `# TYPE` lines and samples.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            names.insert(name.to_string());
            names.insert(base_name(name).to_string());
        }
    }
    names
}

fn is_redis_only(name: &str) -> bool {
    name.starts_with("danmaku_backplane_") || name.starts_with("danmaku_redis_")
}

fn missing(want: impl IntoIterator<Item = String>, have: &BTreeSet<String>) -> Vec<String> {
    want.into_iter().filter(|n| !have.contains(n)).collect()
}

/// Every `danmaku_*` metric a gateway exports has a place on the dashboard.
fn assert_dashboard_covers(text: &str, dash_names: &BTreeSet<String>) {
    let unpanelled: Vec<String> = exported(text)
        .into_iter()
        .filter(|n| n.starts_with("danmaku_") && base_name(n) == n)
        .filter(|n| !dash_names.contains(n))
        .collect();
    assert!(
        unpanelled.is_empty(),
        "exported but on no dashboard panel (add them to grafana/dashboard.json): {unpanelled:?}"
    );
}

// ----------------------------------------------------------------------------------------
// The dashboard's shape

#[test]
fn dashboard_has_datasource_variable_node_variable_and_rows() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "danmaku-gateway");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        dash["id"].is_null(),
        "an importable dashboard has no fixed id"
    );

    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource template variable");
    assert_eq!(ds["query"], "prometheus", "{ds}");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    let node = vars
        .iter()
        .find(|v| v["name"] == "instance" || v["name"] == "node")
        .expect("an instance/node variable");
    assert_eq!(node["type"], "query");
    assert_eq!(node["datasource"]["uid"], ds_ref.as_str());

    let mut panels = Vec::new();
    all_panels(&dash["panels"], &mut panels);
    let rows: Vec<String> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap_or("").to_lowercase())
        .collect();
    for want in ROWS {
        assert!(
            rows.iter().any(|r| r.starts_with(want)),
            "no row titled {want:?} in {rows:?}"
        );
    }

    let mut ids = BTreeSet::new();
    let node_sel = format!("instance=~\"${}\"", node["name"].as_str().unwrap());
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "dup id");
        let pos = &p["gridPos"];
        let (x, w) = (pos["x"].as_u64().unwrap(), pos["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && pos["h"].as_u64().unwrap() > 0,
            "{title}: {pos}"
        );
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(!expr.trim().is_empty(), "{title}: empty expr");
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{title}");
            assert!(
                metric_names(expr).is_empty() || expr.contains(&node_sel),
                "{title}: query ignores the node variable: {expr}"
            );
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{title}: unbalanced parentheses: {expr}"
            );
        }
    }

    // The histograms are read as histograms, the latency ones with quantiles.
    let exprs: Vec<String> = panel_exprs(&dash).into_iter().map(|(_, e)| e).collect();
    for h in [
        "danmaku_broadcast_latency_seconds",
        "danmaku_redpacket_grab_seconds",
        "danmaku_backplane_lag_seconds",
        "danmaku_batch_events",
    ] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains("histogram_quantile(") && e.contains(&format!("{h}_bucket"))),
            "no histogram_quantile over {h}_bucket"
        );
    }
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("danmaku_connections_closed_total") && e.contains("\"4010\"")),
        "no panel for slow-consumer closes (4010)"
    );
    for p in PROCESS_METRICS {
        assert!(
            dashboard_metrics(&dash).contains(p),
            "{p} not on the dashboard"
        );
    }
}

#[test]
fn metric_name_extraction() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(danmaku_batch_events_bucket{x="danmaku"}[1m])))
           / rate(process_cpu_seconds_total[1m]) + my_process_x + danmaku_rooms"#,
    );
    let want: BTreeSet<String> = [
        "danmaku_batch_events",
        "process_cpu_seconds_total",
        "danmaku_rooms",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
}

// ----------------------------------------------------------------------------------------
// Every queried metric is exported

async fn expect_error(c: &mut support::Client, code: &str) {
    let r = c.reply().await;
    assert_eq!(r["op"], "error", "{r}");
    assert_eq!(r["code"], code, "{r}");
}

/// A single node (`backplane = "local"`) after a bit of everything: every dashboard and
/// alert metric that is not Redis-only is exported, and everything it exports is on
/// the dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_metrics_are_exported_by_a_node() {
    let gw = Gateway::start_with(|c| {
        // Sampling, merging and a refused upgrade need small limits.
        c.room.max_chat_per_s = 1;
        c.room.batch_ms = 100;
        c.limits.max_conns = 3;
        c.server.drain_s = 0;
    })
    .await;

    let mut alice = gw.user("alice", "").await;
    let mut bob = gw.user("bob", "").await;
    let mut viewer = gw.client("").await;
    for c in [&mut alice, &mut bob, &mut viewer] {
        c.join("r1").await;
    }
    // The node is full (limits.max_conns = 3): refused before the upgrade.
    let refused = gw.connect("").await;
    assert!(refused.is_err(), "a 4th connection over max_conns = 3");

    // Chat: the burst (5) is acked, all but one per second sampled out of the broadcast
    // (room.max_chat_per_s = 1); past the burst, rate limited.
    let mut limited = false;
    for i in 0..20 {
        let r = alice
            .call(json!({"op":"chat","room":"r1","text":format!("hi {i}")}), i)
            .await;
        if r["op"] == "error" {
            assert_eq!(r["code"], "rate_limited", "{r}");
            limited = true;
            break;
        }
        assert_eq!(r["op"], "ack", "{r}");
    }
    assert!(limited, "20 chats at once never hit the chat rate limit");

    // Gifts: the same free gift several times inside one window is merged.
    for _ in 0..4 {
        bob.send(json!({"op":"gift","room":"r1","gift":"rose"}))
            .await;
    }
    for _ in 0..4 {
        let r = bob.reply().await;
        assert_eq!(r["op"], "ack", "{r}");
    }
    // An error: a frame that is not JSON.
    viewer.send_raw(Message::Text("not json".into())).await;
    expect_error(&mut viewer, "bad_request").await;

    // A red packet through the API, grabbed twice by the same user.
    let (status, body) = gw
        .api(
            "POST",
            "/api/v1/rooms/r1/redpackets",
            Some(&json!({"total": 1000, "shares": 2, "sender": {"id":"boss","name":"Boss"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let packet = body["packet"].as_str().expect("packet id").to_string();
    let r = alice
        .call(json!({"op":"grab","room":"r1","packet":packet}), 100)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    alice
        .send(json!({"op":"grab","room":"r1","packet":packet}))
        .await;
    expect_error(&mut alice, "already_grabbed").await;
    // The grab reaches the room: a frame written, the broadcast latency recorded.
    bob.events_until("r1", |evs| evs.iter().any(|e| e["type"] == "grab"))
        .await;

    wait_until_for(
        "the counters to show the traffic",
        Duration::from_secs(10),
        async || {
            let text = metrics_text(gw.addr).await;
            support::metric_in(&text, "danmaku_gifts_merged_total") > 0.0
                && support::metric_in(&text, "danmaku_chat_sampled_out_total") > 0.0
                && support::metric_in(&text, "danmaku_broadcast_latency_seconds_count") > 0.0
        },
    )
    .await;

    let text = metrics_text(gw.addr).await;
    let have = exported(&text);
    let dash = dashboard_metrics(&dashboard());
    let want = queried_metrics()
        .into_iter()
        .filter(|n| n.starts_with("danmaku_") && !is_redis_only(n));
    let absent = missing(want, &have);
    assert!(
        absent.is_empty(),
        "queried by grafana/dashboard.json or prometheus/alerts.yml but not in /metrics: {absent:?}"
    );
    assert_dashboard_covers(&text, &dash);

    for c in [alice, bob, viewer] {
        c.close().await;
    }
    gw.stop().await;
}

/// The process collector's metrics (CPU, resident memory, open fds) the Process row and
/// the fd alert use.
#[tokio::test]
async fn process_metrics_are_exported() {
    let gw = Gateway::start_with(|c| c.server.drain_s = 0).await;
    let have = exported(&metrics_text(gw.addr).await);
    let mut want: BTreeSet<String> = PROCESS_METRICS.iter().map(|s| s.to_string()).collect();
    want.extend(
        queried_metrics()
            .into_iter()
            .filter(|n| n.starts_with("process_")),
    );
    let absent = missing(want, &have);
    assert!(
        absent.is_empty(),
        "process metrics not in /metrics: {absent:?}"
    );
    gw.stop().await;
}

/// Two Redis nodes, a room across them, then a Redis outage: every backplane and Redis
/// metric the dashboard and alerts query is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backplane_metrics_are_exported_by_redis_nodes() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let a = redis_node(&url, "dash-a", |c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        // A tiny publish queue, so the outage below drops envelopes at once.
        c.redis.publish_queue = 1;
    })
    .await;
    let b = redis_node(&url, "dash-b", |c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
    })
    .await;
    let mut on_a = a.user("ann", "").await;
    let mut on_b = b.user("ben", "").await;
    on_a.join("rb").await;
    on_b.join("rb").await;

    // Across the backplane: published on A, received (with its lag) on B.
    let mut n = 0;
    wait_until_for(
        "a chat from A to reach B",
        Duration::from_secs(15),
        async || {
            n += 1;
            on_a.send(json!({"op":"chat","room":"rb","text":format!("x{n}")}))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            metric(b.addr, "danmaku_backplane_received_total").await > 0.0
                && metric(b.addr, "danmaku_backplane_lag_seconds_count").await > 0.0
        },
    )
    .await;

    // Outage: the subscriber loses its connection (errors), publishing cannot keep up
    // (dropped); after the restart both connections come back (reconnects).
    redis.kill();
    wait_until_for(
        "backplane drops and errors",
        Duration::from_secs(20),
        async || {
            n += 1;
            on_a.send(json!({"op":"chat","room":"rb","text":format!("x{n}")}))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            metric(a.addr, "danmaku_backplane_dropped_total").await > 0.0
                && metric(a.addr, "danmaku_backplane_errors_total").await > 0.0
        },
    )
    .await;
    redis.restart();
    wait_until_for("redis reconnects", Duration::from_secs(30), async || {
        metric(a.addr, "danmaku_redis_reconnects_total").await > 0.0
    })
    .await;

    let dash = dashboard_metrics(&dashboard());
    for node in [&a, &b] {
        let text = metrics_text(node.addr).await;
        let have = exported(&text);
        let want = queried_metrics().into_iter().filter(|n| is_redis_only(n));
        let absent = missing(want, &have);
        assert!(
            absent.is_empty(),
            "Redis-mode metrics queried by the dashboard/alerts but not in /metrics of {}: {absent:?}",
            node.cfg.server.node_id
        );
        assert_dashboard_covers(&text, &dash);
    }

    on_a.close().await;
    on_b.close().await;
    a.stop().await;
    b.stop().await;
}

// ----------------------------------------------------------------------------------------
// Deploy files

/// Every `GATEWAY_<SECTION>__<KEY>` (or top-level `GATEWAY_<KEY>`) variable named in
/// `text`.
fn env_overrides(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("GATEWAY_") {
        if i > 0
            && (text.as_bytes()[i - 1].is_ascii_alphanumeric() || text.as_bytes()[i - 1] == b'_')
        {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = name.trim_end_matches('_').to_string();
        if name.len() > "GATEWAY_".len() {
            out.insert(name);
        }
    }
    out
}

/// `GATEWAY_SERVER__NODE_ID` → TOML `[server]\nnode_id = …`; the gateway's own loader
/// refuses unknown keys, so a typo in a variable name fails here.
fn assert_env_override_is_a_config_key(var: &str, file: &str) {
    let path = var.strip_prefix("GATEWAY_").unwrap().to_lowercase();
    let toml = match path.split_once("__") {
        Some((section, key)) => format!("[{section}]\n{key} = \"x\"\n"),
        None => format!("{path} = \"x\"\n"),
    };
    // "x" may be the wrong type for the key; only an unknown key is a failure here.
    if let Err(e) = Config::from_toml(&toml) {
        let e = e.to_string();
        assert!(
            !e.contains("unknown field"),
            "{file}: {var} is not a config key: {e}"
        );
    }
}

/// The `config.toml: |` block of the ConfigMap, dedented.
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml.lines();
    let header = lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("config.toml: |"))
        .expect("config.toml block in configmap.yaml");
    let key_indent = header.len() - header.trim_start().len();
    let mut block = Vec::new();
    let mut indent = None;
    for l in lines {
        if l.trim().is_empty() {
            block.push(String::new());
            continue;
        }
        let ind = l.len() - l.trim_start().len();
        if ind <= key_indent {
            break;
        }
        let ind = *indent.get_or_insert(ind);
        block.push(l.get(ind..).unwrap_or("").to_string());
    }
    block.join("\n")
}

fn yaml_int(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no integer {key} in the manifest"))
}

#[test]
fn kubernetes_manifests_exist_and_agree_with_the_config() {
    let dir = "deploy/kubernetes";
    for (file, kind) in [
        ("namespace.yaml", "Namespace"),
        ("configmap.yaml", "ConfigMap"),
        ("secret.example.yaml", "Secret"),
        ("deployment.yaml", "Deployment"),
        ("service.yaml", "Service"),
        ("service-internal.yaml", "Service"),
        ("pdb.yaml", "PodDisruptionBudget"),
        ("hpa.yaml", "HorizontalPodAutoscaler"),
        ("servicemonitor.yaml", "ServiceMonitor"),
        ("kustomization.yaml", "Kustomization"),
    ] {
        let text = read(&format!("{dir}/{file}"));
        assert!(
            text.lines().any(|l| l.trim() == format!("kind: {kind}")),
            "{file}: no `kind: {kind}`"
        );
    }
    let kustomization = read(&format!("{dir}/kustomization.yaml"));
    for file in [
        "namespace.yaml",
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "hpa.yaml",
    ] {
        assert!(
            kustomization.contains(&format!("  - {file}")),
            "kustomization.yaml does not list {file}"
        );
    }
    assert!(read(&format!("{dir}/README.md")).contains("redis.cluster"));

    // The ConfigMap is a valid config for this gateway, on Redis.
    let cfg = Config::from_toml(&configmap_toml(&read(&format!("{dir}/configmap.yaml"))))
        .expect("configmap.yaml's config.toml loads");
    assert_eq!(cfg.backplane, BackplaneKind::Redis);

    // Grace period: preStop sleep + drain window + the server's grace, with room to spare.
    let deploy = read(&format!("{dir}/deployment.yaml"));
    let grace = yaml_int(&deploy, "terminationGracePeriodSeconds");
    let sleep: u64 = deploy
        .split("command: [\"sleep\", \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .expect("a preStop sleep");
    assert!(
        grace >= sleep + cfg.server.drain_s + 10,
        "terminationGracePeriodSeconds {grace} too short for preStop {sleep} s + drain {} s",
        cfg.server.drain_s
    );
    for needle in [
        "path: /readyz",
        "path: /healthz",
        "\"--config\", \"/etc/danmaku/config.toml\"",
        "mountPath: /etc/danmaku",
        "secretKeyRef",
        "GATEWAY_AUTH__SECRET",
        "GATEWAY_API__TOKEN",
        "prometheus.io/scrape: \"true\"",
    ] {
        assert!(deploy.contains(needle), "deployment.yaml lacks {needle:?}");
    }
    let service = read(&format!("{dir}/service.yaml"));
    assert!(service.contains("type: LoadBalancer") && service.contains("protocol: TCP"));
    assert!(read(&format!("{dir}/servicemonitor.yaml")).contains("monitoring.coreos.com/v1"));
    assert!(read(&format!("{dir}/hpa.yaml")).contains("name: cpu"));

    for file in ["deployment.yaml", "configmap.yaml", "secret.example.yaml"] {
        for var in env_overrides(&read(&format!("{dir}/{file}"))) {
            assert_env_override_is_a_config_key(&var, file);
        }
    }
}

#[test]
fn compose_prometheus_grafana_and_docker_files_agree() {
    let compose = read("docker-compose.yml");
    for needle in [
        "gateway-1:",
        "gateway-2:",
        "GATEWAY_BACKPLANE: redis",
        "GATEWAY_REDIS__URL: redis://redis:6379",
        "GATEWAY_SERVER__NODE_ID: gateway-1",
        "GATEWAY_SERVER__NODE_ID: gateway-2",
        "image: redis:7",
        "image: prom/prometheus",
        "image: grafana/grafana",
        "./grafana/dashboard.json:/var/lib/grafana/dashboards/",
        "./grafana/provisioning:/etc/grafana/provisioning",
        "stop_grace_period",
    ] {
        assert!(
            compose.contains(needle),
            "docker-compose.yml lacks {needle:?}"
        );
    }
    let vars = env_overrides(&compose);
    assert!(vars.len() >= 5, "{vars:?}");
    for var in vars {
        assert_env_override_is_a_config_key(&var, "docker-compose.yml");
    }

    let prom = read("prometheus/prometheus.yml");
    for needle in ["gateway-1:8080", "gateway-2:8080", "metrics_path: /metrics"] {
        assert!(prom.contains(needle), "prometheus.yml lacks {needle:?}");
    }
    assert!(
        read("grafana/provisioning/datasources/prometheus.yml").contains("http://prometheus:9090")
    );
    assert!(
        read("grafana/provisioning/dashboards/dashboards.yml")
            .contains("/var/lib/grafana/dashboards")
    );

    let dockerfile = read("Dockerfile");
    for needle in [
        "FROM rust:1-bookworm AS builder",
        "FROM debian:bookworm-slim",
        "COPY config.toml",
        "EXPOSE 8080",
        "USER 10001",
        "HEALTHCHECK",
        "/healthz",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle:?}");
    }
    let ignore = read(".dockerignore");
    for needle in ["target/", "web/node_modules", "data/"] {
        assert!(ignore.contains(needle), ".dockerignore lacks {needle:?}");
    }
    // What `include_str!` embeds must be in the build context.
    for line in ignore.lines().map(str::trim) {
        assert!(
            !["src/", "web/", "config.toml", "Cargo.lock"].contains(&line),
            ".dockerignore excludes {line}, which the build needs"
        );
    }
}
