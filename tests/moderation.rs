//! Moderation on one node (PROTOCOL.md v1.1, *Moderation*): every endpoint, every error
//! path, the check order, and the state surviving a restart in the data dir.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Gateway, http, metric, relax_rate_limits, token, wait_until};

fn mute_path(room: &str, user: &str) -> String {
    format!("/api/v1/rooms/{room}/mutes/{user}")
}

async fn chat(c: &mut Client, room: &str, text: &str, reference: i64) -> Value {
    c.call(json!({"op":"chat","room":room,"text":text}), reference)
        .await
}

/// Chats from `c` until the text `marker` shows in `watcher`'s batches; returns the
/// events `watcher` saw on the way.
async fn seen_by(watcher: &mut Client, room: &str, marker: &str) -> Vec<Value> {
    watcher
        .events_until(room, |evs| evs.iter().any(|e| e["text"] == marker))
        .await
}

#[tokio::test]
async fn a_muted_user_cannot_chat_or_send_gifts_in_that_room_until_lifted() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    let mut alice = gw.user("alice", "room=r1").await;
    let mut bob = gw.user("bob", "room=r1").await;
    alice.recv_op("joined").await;
    bob.recv_op("joined").await;

    let (st, body) = gw
        .api(
            "PUT",
            &mute_path("r1", "alice"),
            Some(&json!({"reason":"spam"})),
        )
        .await;
    assert_eq!(st, 204, "{body}");

    let r = chat(&mut alice, "r1", "hello", 1).await;
    assert_eq!(r["code"], "muted", "{r}");
    assert!(r.get("retry_after_ms").is_none(), "no end, no retry: {r}");
    let r = alice
        .call(json!({"op":"gift","room":"r1","gift":"rose"}), 2)
        .await;
    assert_eq!(r["code"], "muted", "{r}");
    // Only alice: bob chats on, and alice still receives the room.
    assert_eq!(chat(&mut bob, "r1", "from bob", 3).await["op"], "ack");
    let seen = seen_by(&mut alice, "r1", "from bob").await;
    assert!(seen.iter().all(|e| e["text"] != "hello"), "{seen:?}");
    // A mute is per room.
    assert_eq!(alice.join("r2").await["op"], "joined");
    assert_eq!(chat(&mut alice, "r2", "elsewhere", 4).await["op"], "ack");

    let (st, v) = gw.api("GET", "/api/v1/rooms/r1/mutes", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        json!({"mutes":[{"user":"alice","until":null,"reason":"spam"}]})
    );
    let (st, v) = gw.api("GET", "/api/v1/rooms/r2/mutes", None).await;
    assert_eq!((st, v), (200, json!({"mutes":[]})));

    let (st, _) = gw.api("DELETE", &mute_path("r1", "alice"), None).await;
    assert_eq!(st, 204);
    let (st, v) = gw.api("DELETE", &mute_path("r1", "alice"), None).await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["code"], "not_found");
    assert_eq!(chat(&mut alice, "r1", "back", 5).await["op"], "ack");
    gw.stop().await;
}

#[tokio::test]
async fn a_timed_mute_answers_retry_after_and_ends_by_itself() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    let mut alice = gw.user("alice", "room=r1").await;
    alice.recv_op("joined").await;
    let (st, _) = gw
        .api(
            "PUT",
            &mute_path("r1", "alice"),
            Some(&json!({"duration_s":1})),
        )
        .await;
    assert_eq!(st, 204);
    let r = chat(&mut alice, "r1", "too soon", 1).await;
    assert_eq!(r["code"], "muted", "{r}");
    let retry = r["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((1..=1000).contains(&retry), "{r}");
    let (_, v) = gw.api("GET", "/api/v1/rooms/r1/mutes", None).await;
    let until = v["mutes"][0]["until"].as_u64().expect("until in unix ms");
    assert!(until > danmaku_gateway::protocol::now_ms(), "{v}");

    tokio::time::sleep(Duration::from_millis(retry + 50)).await;
    assert_eq!(chat(&mut alice, "r1", "now", 2).await["op"], "ack");
    let (_, v) = gw.api("GET", "/api/v1/rooms/r1/mutes", None).await;
    assert_eq!(v, json!({"mutes":[]}));
    let (st, _) = gw.api("DELETE", &mute_path("r1", "alice"), None).await;
    assert_eq!(st, 404, "an ended mute is not in force");
    gw.stop().await;
}

#[tokio::test]
async fn muted_comes_after_forbidden_and_before_rate_limited() {
    let gw = Gateway::start().await;
    let mut alice = gw.user("alice", "room=r1").await;
    alice.recv_op("joined").await;
    let mut anon = gw.client("room=r1").await;
    anon.recv_op("joined").await;
    gw.api("PUT", &mute_path("r1", "alice"), None).await;

    // not_joined before muted.
    let r = chat(&mut alice, "elsewhere", "x", 1).await;
    assert_eq!(r["code"], "not_joined", "{r}");
    // forbidden (a paid gift) before muted.
    let r = alice
        .call(json!({"op":"gift","room":"r1","gift":"rocket"}), 2)
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    // unauthorized before muted (and an anonymous viewer has no mute to find).
    let r = chat(&mut anon, "r1", "x", 3).await;
    assert_eq!(r["code"], "unauthorized", "{r}");
    // muted before rate_limited: the default chat budget (burst 5) is not spent by
    // muted chats, and far more of them than the burst all answer muted.
    for i in 0..12 {
        let r = chat(&mut alice, "r1", "x", 10 + i).await;
        assert_eq!(r["code"], "muted", "{r}");
    }
    gw.api("DELETE", &mute_path("r1", "alice"), None).await;
    assert_eq!(chat(&mut alice, "r1", "first after", 30).await["op"], "ack");
    gw.stop().await;
}

#[tokio::test]
async fn a_ban_closes_the_users_connections_with_4030_and_refuses_new_ones() {
    let gw = Gateway::start().await;
    let mut a1 = gw.user("mallory", "room=r1").await;
    let mut a2 = gw.user("mallory", "").await;
    let mut bob = gw.user("bob", "room=r1").await;
    a1.recv_op("joined").await;
    bob.recv_op("joined").await;

    let (st, v) = gw
        .api(
            "PUT",
            "/api/v1/bans/mallory",
            Some(&json!({"reason":"abuse"})),
        )
        .await;
    assert_eq!(st, 204, "{v}");
    assert_eq!(a1.closed().await, 4030);
    assert_eq!(a2.closed().await, 4030);
    // Others stay.
    assert_eq!(chat(&mut bob, "r1", "still here", 1).await["op"], "ack");

    let err = gw
        .connect(&format!("token={}", token("mallory", "m")))
        .await
        .err()
        .expect("a banned user's upgrade is refused");
    let (status, body) = support::refusal(err);
    assert_eq!(status, 403);
    assert_eq!(body["code"], "banned", "{body}");

    let (st, v) = gw.api("GET", "/api/v1/bans/mallory", None).await;
    assert_eq!(st, 200);
    assert_eq!(v, json!({"user":"mallory","until":null,"reason":"abuse"}));
    let (st, v) = gw.api("GET", "/api/v1/bans/bob", None).await;
    assert_eq!((st, v["code"].clone()), (404, json!("not_found")));

    let (st, _) = gw.api("DELETE", "/api/v1/bans/mallory", None).await;
    assert_eq!(st, 204);
    let (st, _) = gw.api("DELETE", "/api/v1/bans/mallory", None).await;
    assert_eq!(st, 404);
    let mut back = gw.user("mallory", "room=r1").await;
    back.recv_op("joined").await;
    assert!(metric(gw.addr, "danmaku_connections_closed_total{code=\"4030\"}").await >= 2.0);
    assert!(
        metric(
            gw.addr,
            "danmaku_connections_refused_total{reason=\"banned\"}"
        )
        .await
            >= 1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_timed_ban_ends_by_itself() {
    let gw = Gateway::start().await;
    let (st, _) = gw
        .api("PUT", "/api/v1/bans/eve", Some(&json!({"duration_s":1})))
        .await;
    assert_eq!(st, 204);
    let (_, v) = gw.api("GET", "/api/v1/bans/eve", None).await;
    assert!(v["until"].as_u64().is_some(), "{v}");
    assert!(
        gw.connect(&format!("token={}", token("eve", "e")))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _eve = gw.user("eve", "").await;
    let (st, _) = gw.api("GET", "/api/v1/bans/eve", None).await;
    assert_eq!(st, 404);
    gw.stop().await;
}

#[tokio::test]
async fn closed_chat_answers_muted_to_clients_but_lets_the_backend_post() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    let mut alice = gw.user("alice", "room=r1").await;
    alice.recv_op("joined").await;

    let (st, v) = gw.api("GET", "/api/v1/rooms/r1/settings", None).await;
    assert_eq!((st, v), (200, json!({"chat":"open","slow_mode_s":0})));
    let (st, v) = gw
        .api(
            "PUT",
            "/api/v1/rooms/r1/settings",
            Some(&json!({"chat":"closed"})),
        )
        .await;
    assert_eq!((st, v), (200, json!({"chat":"closed","slow_mode_s":0})));

    let r = chat(&mut alice, "r1", "hi", 1).await;
    assert_eq!(r["code"], "muted", "{r}");
    let r = alice
        .call(json!({"op":"gift","room":"r1","gift":"rose"}), 2)
        .await;
    assert_eq!(r["code"], "muted", "{r}");
    let (st, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/r1/events",
            Some(&json!({"type":"chat","user":{"id":"host","name":"Host"},"text":"from the host"})),
        )
        .await;
    assert_eq!(st, 202);
    seen_by(&mut alice, "r1", "from the host").await;

    // A field left out keeps its value.
    let (_, v) = gw
        .api(
            "PUT",
            "/api/v1/rooms/r1/settings",
            Some(&json!({"slow_mode_s":5})),
        )
        .await;
    assert_eq!(v, json!({"chat":"closed","slow_mode_s":5}));
    let (_, v) = gw
        .api(
            "PUT",
            "/api/v1/rooms/r1/settings",
            Some(&json!({"chat":"open"})),
        )
        .await;
    assert_eq!(v, json!({"chat":"open","slow_mode_s":5}));
    gw.stop().await;
}

#[tokio::test]
async fn slow_mode_lets_a_user_chat_once_per_period() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    let mut alice = gw.user("alice", "room=r1").await;
    let mut bob = gw.user("bob", "room=r1").await;
    alice.recv_op("joined").await;
    bob.recv_op("joined").await;
    gw.api(
        "PUT",
        "/api/v1/rooms/r1/settings",
        Some(&json!({"slow_mode_s":1})),
    )
    .await;

    assert_eq!(chat(&mut alice, "r1", "one", 1).await["op"], "ack");
    let r = chat(&mut alice, "r1", "two", 2).await;
    assert_eq!(r["code"], "rate_limited", "{r}");
    let retry = r["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((1..=1000).contains(&retry), "{r}");
    // Per user: bob is not slowed by alice.
    assert_eq!(chat(&mut bob, "r1", "bob one", 3).await["op"], "ack");
    tokio::time::sleep(Duration::from_millis(retry + 20)).await;
    assert_eq!(chat(&mut alice, "r1", "three", 4).await["op"], "ack");
    // Off again.
    gw.api(
        "PUT",
        "/api/v1/rooms/r1/settings",
        Some(&json!({"slow_mode_s":0})),
    )
    .await;
    assert_eq!(chat(&mut alice, "r1", "four", 5).await["op"], "ack");
    assert_eq!(chat(&mut alice, "r1", "five", 6).await["op"], "ack");
    assert!(
        metric(
            gw.addr,
            "danmaku_moderation_refused_total{reason=\"slow_mode\"}"
        )
        .await
            >= 1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_recall_reaches_every_member_and_leaves_the_history() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    let mut alice = gw.user("alice", "room=r1").await;
    let mut bob = gw.user("bob", "room=r1").await;
    alice.recv_op("joined").await;
    bob.recv_op("joined").await;
    chat(&mut alice, "r1", "regrettable", 1).await;
    chat(&mut alice, "r1", "fine", 2).await;
    let seen = seen_by(&mut bob, "r1", "fine").await;
    let target = seen
        .iter()
        .find(|e| e["text"] == "regrettable")
        .expect("the chat")["id"]
        .as_str()
        .unwrap()
        .to_string();

    let (st, v) = gw
        .api("DELETE", &format!("/api/v1/rooms/r1/events/{target}"), None)
        .await;
    assert_eq!(st, 202, "{v}");
    let recall_id = v["id"].as_str().expect("the recall's id").to_string();
    let events = bob
        .events_until("r1", |evs| evs.iter().any(|e| e["type"] == "recall"))
        .await;
    let recall = events.iter().find(|e| e["type"] == "recall").unwrap();
    assert_eq!(recall["target"], target.as_str(), "{recall}");
    assert_eq!(recall["id"], recall_id.as_str());
    assert!(recall["ts"].as_u64().is_some());

    // A viewer joining now gets a history without the recalled chat.
    let mut carol = gw.client("").await;
    let joined = carol
        .call(json!({"op":"join","room":"r1","history":50}), 7)
        .await;
    let history = joined["history"].as_array().unwrap();
    assert!(history.iter().any(|e| e["text"] == "fine"), "{joined}");
    assert!(
        history.iter().all(|e| e["id"] != target.as_str()),
        "recalled event still in history: {joined}"
    );
    assert!(
        metric(
            gw.addr,
            "danmaku_moderation_actions_total{action=\"recall\"}"
        )
        .await
            >= 1.0
    );
    // Ids are checked, not looked up.
    let long = "x".repeat(200);
    let (st, _) = gw
        .api("DELETE", &format!("/api/v1/rooms/r1/events/{long}"), None)
        .await;
    assert_eq!(st, 400);
    let (st, _) = gw
        .api("DELETE", "/api/v1/rooms/r1/events/never-seen", None)
        .await;
    assert_eq!(st, 202);
    gw.stop().await;
}

#[tokio::test]
async fn block_words_refuse_a_chat_and_mask_words_rewrite_it() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    let mut alice = gw.user("alice", "room=r1").await;
    let mut bob = gw.user("bob", "room=r1").await;
    alice.recv_op("joined").await;
    bob.recv_op("joined").await;

    let (st, v) = gw
        .api(
            "PUT",
            "/api/v1/filters",
            Some(&json!({"block":["badword","坏词"],"mask":["darn"]})),
        )
        .await;
    assert_eq!((st, v), (200, json!({"block":2,"mask":1})));
    let (_, v) = gw.api("GET", "/api/v1/filters", None).await;
    assert_eq!(v, json!({"block":["badword","坏词"],"mask":["darn"]}));

    // Case, full-width forms (NFKC) and zero-width characters do not hide a word.
    for (i, text) in ["a BadWord here", "ＢＡＤ\u{200B}WORD", "这是坏\u{200D}词"]
        .into_iter()
        .enumerate()
    {
        let r = chat(&mut alice, "r1", text, 10 + i as i64).await;
        assert_eq!(r["code"], "filtered", "{text}: {r}");
    }
    let r = chat(&mut alice, "r1", "oh DARN it", 20).await;
    assert_eq!(r["op"], "ack", "{r}");
    chat(&mut alice, "r1", "marker", 21).await;
    let seen = seen_by(&mut bob, "r1", "marker").await;
    let texts: Vec<&str> = seen.iter().filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(texts, ["oh **** it", "marker"], "blocked chat broadcast?");

    assert!(metric(gw.addr, "danmaku_moderation_filtered_total{list=\"block\"}").await >= 3.0);
    assert!(metric(gw.addr, "danmaku_moderation_filtered_total{list=\"mask\"}").await >= 1.0);
    // Replacing the lists replaces both.
    let (st, _) = gw
        .api(
            "PUT",
            "/api/v1/filters",
            Some(&json!({"block":[],"mask":[]})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(chat(&mut alice, "r1", "badword", 30).await["op"], "ack");
    gw.stop().await;
}

#[tokio::test]
async fn bad_moderation_requests_are_400_and_need_the_api_token() {
    let gw = Gateway::start().await;
    let cases: [(&str, &str, Option<&str>); 12] = [
        ("PUT", "/api/v1/rooms/bad room/mutes/u", None),
        (
            "PUT",
            "/api/v1/rooms/r1/mutes/u",
            Some(r#"{"duration_s":0}"#),
        ),
        (
            "PUT",
            "/api/v1/rooms/r1/mutes/u",
            Some(r#"{"duration_s":-1}"#),
        ),
        ("PUT", "/api/v1/rooms/r1/mutes/u", Some(r#"{"until":5}"#)),
        ("PUT", "/api/v1/rooms/r1/mutes/u", Some(r#"{} x"#)),
        (
            "PUT",
            "/api/v1/bans/u",
            Some(r#"{"duration_s":999999999999}"#),
        ),
        (
            "PUT",
            "/api/v1/rooms/r1/settings",
            Some(r#"{"chat":"maybe"}"#),
        ),
        (
            "PUT",
            "/api/v1/rooms/r1/settings",
            Some(r#"{"slow_mode_s":100000}"#),
        ),
        ("PUT", "/api/v1/filters", Some(r#"{"block":["ok"]}"#)),
        (
            "PUT",
            "/api/v1/filters",
            Some(r#"{"block":["  "],"mask":[]}"#),
        ),
        ("PUT", "/api/v1/filters", Some(r#"{"block":[],"mask":[1]}"#)),
        ("PUT", "/api/v1/bans/u", Some(r#"{"reason":5}"#)),
    ];
    for (method, path, body) in cases {
        let path = path.replace(' ', "%20");
        let (st, v) = http(gw.addr, method, &path, Some(support::API_TOKEN), body).await;
        assert_eq!(st, 400, "{method} {path} {body:?}: {v}");
        assert_eq!(v["code"], "bad_request", "{v}");
    }
    let reason = "r".repeat(300);
    let (st, _) = gw
        .api("PUT", "/api/v1/bans/u", Some(&json!({"reason": reason})))
        .await;
    assert_eq!(st, 400);
    let long_word = "w".repeat(65);
    let (st, _) = gw
        .api(
            "PUT",
            "/api/v1/filters",
            Some(&json!({"block":[long_word],"mask":[]})),
        )
        .await;
    assert_eq!(st, 400);
    for (method, path) in [
        ("PUT", "/api/v1/bans/u"),
        ("GET", "/api/v1/filters"),
        ("GET", "/api/v1/rooms/r1/mutes"),
        ("DELETE", "/api/v1/rooms/r1/events/x"),
    ] {
        let (st, v) = http(gw.addr, method, path, None, None).await;
        assert_eq!(st, 401, "{method} {path}: {v}");
    }
    // Nothing of it took effect.
    let (_, v) = gw.api("GET", "/api/v1/bans/u", None).await;
    assert_eq!(v["code"], "not_found");
    gw.stop().await;
}

#[tokio::test]
async fn moderation_state_survives_a_restart_in_the_data_dir() {
    let dir = support::temp_dir("moderation");
    let d = dir.clone();
    let gw = Gateway::start_with(move |c| c.data.dir = d).await;
    gw.api(
        "PUT",
        &mute_path("r1", "alice"),
        Some(&json!({"reason":"spam"})),
    )
    .await;
    gw.api("PUT", "/api/v1/bans/mallory", None).await;
    gw.api(
        "PUT",
        "/api/v1/rooms/r1/settings",
        Some(&json!({"slow_mode_s":30})),
    )
    .await;
    gw.api(
        "PUT",
        "/api/v1/filters",
        Some(&json!({"block":["badword"],"mask":["darn"]})),
    )
    .await;
    gw.stop().await;
    assert!(dir.join("moderation.json").exists());

    let d = dir.clone();
    let gw = Gateway::start_with(move |c| {
        c.data.dir = d;
        relax_rate_limits(c);
    })
    .await;
    let (_, v) = gw.api("GET", "/api/v1/rooms/r1/mutes", None).await;
    assert_eq!(v["mutes"][0]["user"], "alice", "{v}");
    let (st, _) = gw.api("GET", "/api/v1/bans/mallory", None).await;
    assert_eq!(st, 200);
    let (_, v) = gw.api("GET", "/api/v1/rooms/r1/settings", None).await;
    assert_eq!(v["slow_mode_s"], 30);
    let (_, v) = gw.api("GET", "/api/v1/filters", None).await;
    assert_eq!(v, json!({"block":["badword"],"mask":["darn"]}));
    // And it is enforced, not only listed.
    let mut bob = gw.user("bob", "room=r1").await;
    bob.recv_op("joined").await;
    assert_eq!(chat(&mut bob, "r1", "badword", 1).await["code"], "filtered");
    let mut alice = gw.user("alice", "room=r1").await;
    alice.recv_op("joined").await;
    assert_eq!(chat(&mut alice, "r1", "hi", 2).await["code"], "muted");
    gw.stop().await;
}

#[tokio::test]
async fn a_corrupt_state_file_stops_the_start_with_its_name() {
    let dir = support::temp_dir("moderation-corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("moderation.json"), b"{not json").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = support::test_config();
    cfg.data.dir = dir;
    let err = danmaku_gateway::server::run(listener, cfg, std::future::pending())
        .await
        .expect_err("a corrupt moderation file must not be ignored");
    assert!(err.to_string().contains("moderation.json"), "{err}");
}

#[tokio::test]
async fn moderation_gauges_count_bans_and_mutes_in_force() {
    let gw = Gateway::start().await;
    gw.api("PUT", "/api/v1/bans/g1", None).await;
    gw.api("PUT", &mute_path("r9", "g2"), None).await;
    wait_until("the gauges", async || {
        metric(gw.addr, "danmaku_moderation_active_bans").await >= 1.0
            && metric(gw.addr, "danmaku_moderation_active_mutes").await >= 1.0
    })
    .await;
    assert!(metric(gw.addr, "danmaku_moderation_actions_total{action=\"ban\"}").await >= 1.0);
    assert!(metric(gw.addr, "danmaku_moderation_actions_total{action=\"mute\"}").await >= 1.0);
    gw.stop().await;
}
