//! Gifts: the free-gift op (ack, `gift` event, `count` default), merging of one user's
//! same gift inside one batch window, the refusals (`bad_request`, `forbidden`,
//! `unauthorized`, `not_joined`, `rate_limited`) and their order, and paid gifts posted by
//! the backend through `POST /api/v1/rooms/{room}/events`.

mod support;

use danmaku_gateway::config::{Config, Rate};
use serde_json::{Value, json};
use support::{Client, Gateway, metric, relax_rate_limits};

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

fn q(fmt: &str, extra: &str) -> String {
    if extra.is_empty() {
        format!("format={fmt}")
    } else {
        format!("format={fmt}&{extra}")
    }
}

fn user(id: &str) -> Value {
    json!({"id": id, "name": id})
}

/// Asserts `reply` is an `error` with `code`, echoing `reference`.
fn assert_error(reply: &Value, code: &str, reference: i64) {
    assert_eq!(reply["op"], "error", "expected error {code}: {reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert_eq!(reply["ref"], reference, "{reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {reply}"
    );
    if code != "rate_limited" {
        assert!(
            reply.get("retry_after_ms").is_none(),
            "retry_after_ms comes with rate_limited only: {reply}"
        );
    }
}

/// Posts a `system` event with `marker` and collects `room`'s events on `c` up to and
/// including it: everything the room saw before the marker has then arrived.
async fn events_through_marker(
    gw: &Gateway,
    c: &mut Client,
    room: &str,
    marker: &str,
) -> Vec<Value> {
    let (status, body) = gw
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/events"),
            Some(&json!({"type":"system","text": marker})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    c.events_until(room, |evs| {
        evs.iter()
            .any(|e| e["type"] == "system" && e["text"] == marker)
    })
    .await
}

/// Waits for a batch boundary of `room`: a `system` event is posted and its batch
/// awaited, so a fresh window (of `room.batch_ms`) has just begun when this returns.
async fn align_to_window(gw: &Gateway, c: &mut Client, room: &str) {
    events_through_marker(gw, c, room, "window-sync").await;
}

fn gifts_in(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == "gift")
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------
// The basic path, in both formats

macro_rules! both_formats {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn json() {
                super::$name("json").await
            }
            #[tokio::test]
            async fn msgpack() {
                super::$name("msgpack").await
            }
        }
    )*};
}

both_formats!(
    free_gift_is_acked_and_broadcast,
    gift_count_defaults_to_one,
    paid_gift_via_api_reaches_members,
);

async fn free_gift_is_acked_and_broadcast(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    let mut b = gw.user("bob", &q(fmt, "")).await;
    a.join("g").await;
    b.join("g").await;
    let before = danmaku_gateway::protocol::now_ms();
    let ack = a
        .call(json!({"op":"gift","room":"g","gift":"rose","count":3}), 1)
        .await;
    assert_eq!(ack, json!({"op":"ack","ref":1}), "a gift ack has no amount");
    for c in [&mut a, &mut b] {
        let events = c
            .events_until("g", |e| e.iter().any(|e| e["type"] == "gift"))
            .await;
        let gifts = gifts_in(&events);
        assert_eq!(gifts.len(), 1, "{events:?}");
        let g = &gifts[0];
        assert_eq!(g["user"], user("alice"), "{g}");
        assert_eq!(g["gift"], "rose", "{g}");
        assert_eq!(g["count"], 3, "{g}");
        assert!(g["id"].as_str().is_some_and(|s| !s.is_empty()), "{g}");
        let ts = g["ts"].as_u64().expect("ts is unix ms");
        assert!(ts + 60_000 > before && ts <= danmaku_gateway::protocol::now_ms());
    }
    // Without a ref: the ack has none either.
    a.send(json!({"op":"gift","room":"g","gift":"heart"})).await;
    let ack = a.reply().await;
    assert_eq!(ack, json!({"op":"ack"}));
    gw.stop().await;
}

async fn gift_count_defaults_to_one(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    a.join("g").await;
    let ack = a
        .call(json!({"op":"gift","room":"g","gift":"heart"}), 2)
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let events = a
        .events_until("g", |e| e.iter().any(|e| e["type"] == "gift"))
        .await;
    let gifts = gifts_in(&events);
    assert_eq!(gifts.len(), 1, "{events:?}");
    assert_eq!(gifts[0]["gift"], "heart");
    assert_eq!(gifts[0]["count"], 1, "count defaults to 1: {}", gifts[0]);
    // The largest count is accepted as is.
    let ack = a
        .call(
            json!({"op":"gift","room":"g","gift":"rose","count":9999}),
            3,
        )
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let events = a
        .events_until("g", |e| e.iter().any(|e| e["gift"] == "rose"))
        .await;
    let rose = events.iter().find(|e| e["gift"] == "rose").unwrap();
    assert_eq!(rose["count"], 9999);
    gw.stop().await;
}

async fn paid_gift_via_api_reaches_members(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    let mut viewer = gw.client(&q(fmt, "")).await;
    a.join("paid").await;
    viewer.join("paid").await;
    let (status, body) = gw
        .api(
            "POST",
            "/api/v1/rooms/paid/events",
            Some(
                &json!({"type":"gift","user":{"id":"whale","name":"Big Spender"},
                         "gift":"rocket","count":2}),
            ),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("202 carries the event id");
    for c in [&mut a, &mut viewer] {
        let events = c
            .events_until("paid", |e| e.iter().any(|e| e["type"] == "gift"))
            .await;
        let g = gifts_in(&events).remove(0);
        assert_eq!(g["id"], id, "{g}");
        assert_eq!(g["user"], json!({"id":"whale","name":"Big Spender"}));
        assert_eq!(g["gift"], "rocket");
        assert_eq!(g["count"], 2);
    }
    // `count` defaults to 1 through the API too.
    let (status, body) = gw
        .api(
            "POST",
            "/api/v1/rooms/paid/events",
            Some(&json!({"type":"gift","user":user("whale2"),"gift":"yacht"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let events = a
        .events_until("paid", |e| e.iter().any(|e| e["gift"] == "yacht"))
        .await;
    let y = events.iter().find(|e| e["gift"] == "yacht").unwrap();
    assert_eq!(y["count"], 1, "{y}");
    assert_eq!(y["user"], user("whale2"));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Merging

#[tokio::test]
async fn same_users_same_gift_in_one_window_is_merged() {
    let gw = gateway(|c| c.room.batch_ms = 400).await;
    let mut a = gw.user("alice", "").await;
    let mut b = gw.user("bob", "format=msgpack").await;
    a.join("m").await;
    b.join("m").await;
    let merged_before = metric(gw.addr, "danmaku_gifts_merged_total").await;

    align_to_window(&gw, &mut a, "m").await;
    // All of these land in one window (acks come back in well under batch_ms).
    let mut clients = [a, b];
    let sends: [(usize, &str, Option<u32>); 7] = [
        (0, "rose", Some(1)),
        (0, "rose", Some(2)),
        (0, "heart", None),
        (1, "rose", Some(4)),
        (0, "rose", None),
        (1, "rose", Some(1)),
        (0, "rose", Some(5)),
    ];
    for (r, (who, gift, count)) in sends.into_iter().enumerate() {
        let mut op = json!({"op":"gift","room":"m","gift":gift});
        if let Some(n) = count {
            op["count"] = json!(n);
        }
        let reply = clients[who].call(op, r as i64).await;
        assert_eq!(reply["op"], "ack", "{reply}");
    }
    let [mut a, mut b] = clients;

    for c in [&mut a, &mut b] {
        let events = c
            .events_until("m", |e| e.iter().any(|e| e["type"] == "gift"))
            .await;
        let gifts = gifts_in(&events);
        let summary: Vec<(Value, Value, Value)> = gifts
            .iter()
            .map(|g| {
                (
                    g["user"]["id"].clone(),
                    g["gift"].clone(),
                    g["count"].clone(),
                )
            })
            .collect();
        // One event per (user, gift), counts summed, in order of first occurrence.
        assert_eq!(
            summary,
            vec![
                (json!("alice"), json!("rose"), json!(1 + 2 + 1 + 5)),
                (json!("alice"), json!("heart"), json!(1)),
                (json!("bob"), json!("rose"), json!(4 + 1)),
            ],
            "{events:?}"
        );
        let ids: std::collections::HashSet<_> = gifts.iter().map(|g| g["id"].clone()).collect();
        assert_eq!(ids.len(), 3, "distinct events have distinct ids");
    }
    // Nothing more follows for those gifts.
    let rest = events_through_marker(&gw, &mut a, "m", "after-merge").await;
    assert!(gifts_in(&rest).is_empty(), "{rest:?}");
    let merged_after = metric(gw.addr, "danmaku_gifts_merged_total").await;
    assert!(
        merged_after - merged_before >= 4.0,
        "4 gifts were merged: {merged_before} -> {merged_after}"
    );

    // A later window starts afresh: the same gift is a new event, not added to the old.
    let ack = a
        .call(json!({"op":"gift","room":"m","gift":"rose"}), 99)
        .await;
    assert_eq!(ack["op"], "ack");
    let events = a
        .events_until("m", |e| e.iter().any(|e| e["type"] == "gift"))
        .await;
    let g = gifts_in(&events);
    assert_eq!(g.len(), 1, "{events:?}");
    assert_eq!((&g[0]["gift"], &g[0]["count"]), (&json!("rose"), &json!(1)));
    gw.stop().await;
}

#[tokio::test]
async fn api_gifts_merge_like_client_gifts() {
    let gw = gateway(|c| c.room.batch_ms = 400).await;
    let mut a = gw.user("alice", "").await;
    a.join("m2").await;
    align_to_window(&gw, &mut a, "m2").await;
    let post = |gift: &'static str, who: &'static str, count: u32| {
        let body = json!({"type":"gift","user":user(who),"gift":gift,"count":count});
        let gw = &gw;
        async move {
            let (status, body) = gw.api("POST", "/api/v1/rooms/m2/events", Some(&body)).await;
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_string()
        }
    };
    let id1 = post("rocket", "whale", 2).await;
    let id2 = post("rocket", "whale", 3).await;
    let id3 = post("rocket", "other", 1).await;
    // A client's free gift merges with the backend's gift of the same user and gift.
    let id4 = post("rose", "alice", 2).await;
    assert_eq!(
        a.call(json!({"op":"gift","room":"m2","gift":"rose"}), 1)
            .await["op"],
        "ack"
    );
    assert_eq!(id1, id2, "a merged gift answers the id it was merged into");
    assert_ne!(id1, id3);
    let events = a
        .events_until("m2", |e| e.iter().any(|e| e["type"] == "gift"))
        .await;
    let gifts = gifts_in(&events);
    let summary: Vec<_> = gifts
        .iter()
        .map(|g| (g["id"].clone(), g["user"]["id"].clone(), g["count"].clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (json!(id1), json!("whale"), json!(5)),
            (json!(id3), json!("other"), json!(1)),
            (json!(id4), json!("alice"), json!(3)),
        ],
        "{events:?}"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Refusals

#[tokio::test]
async fn unknown_gift_is_bad_request() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    a.join("g").await;
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"unicorn"}), 1)
        .await;
    assert_error(&e, "bad_request", 1);
    assert!(e["message"].as_str().unwrap().contains("gift"), "{e}");
    for (i, bad) in [
        json!({"op":"gift","room":"g","gift":"rose","count":0}),
        json!({"op":"gift","room":"g","gift":"rose","count":10000}),
        json!({"op":"gift","room":"g","gift":"rose","count":-1}),
        json!({"op":"gift","room":"g","gift":"rose","count":"3"}),
        json!({"op":"gift","room":"g","gift":""}),
        json!({"op":"gift","room":"g"}),
        json!({"op":"gift","room":"g","gift":7}),
    ]
    .into_iter()
    .enumerate()
    {
        let r = 10 + i as i64;
        let e = a.call(bad.clone(), r).await;
        assert_error(&e, "bad_request", r);
    }
    // None of it was broadcast, and the connection is still fine.
    let events = events_through_marker(&gw, &mut a, "g", "after-bad").await;
    assert!(gifts_in(&events).is_empty(), "{events:?}");
    assert_eq!(
        a.call(json!({"op":"gift","room":"g","gift":"rose"}), 50)
            .await["op"],
        "ack"
    );
    gw.stop().await;
}

#[tokio::test]
async fn paid_gift_from_a_client_is_forbidden() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    a.join("g").await;
    for (r, gift) in [(1, "rocket"), (2, "yacht")] {
        let e = a
            .call(json!({"op":"gift","room":"g","gift":gift,"count":1}), r)
            .await;
        assert_error(&e, "forbidden", r);
    }
    let events = events_through_marker(&gw, &mut a, "g", "after-paid").await;
    assert!(gifts_in(&events).is_empty(), "{events:?}");
    gw.stop().await;
}

#[tokio::test]
async fn anonymous_gift_is_unauthorized() {
    let gw = gateway(|_| {}).await;
    let mut anon = gw.client("").await;
    anon.join("g").await;
    let e = anon
        .call(json!({"op":"gift","room":"g","gift":"rose"}), 1)
        .await;
    assert_error(&e, "unauthorized", 1);
    let events = events_through_marker(&gw, &mut anon, "g", "after-anon").await;
    assert!(gifts_in(&events).is_empty(), "{events:?}");
    gw.stop().await;
}

#[tokio::test]
async fn gift_without_join_is_not_joined() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let mut watcher = gw.user("watcher", "").await;
    watcher.join("g").await;
    a.join("other").await;
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"rose"}), 1)
        .await;
    assert_error(&e, "not_joined", 1);
    let events = events_through_marker(&gw, &mut watcher, "g", "after-nj").await;
    assert!(gifts_in(&events).is_empty(), "{events:?}");
    gw.stop().await;
}

/// PROTOCOL.md: frame validity, `unauthorized`, `not_joined`, `forbidden`,
/// `rate_limited`, then the op's own; the first that fails is the answer.
#[tokio::test]
async fn refusals_come_in_protocol_order() {
    let gw = gateway(|c| {
        c.ratelimit.gift = Rate {
            rate: 0.01,
            burst: 2,
        };
    })
    .await;
    let mut anon = gw.client("").await;
    let mut a = gw.user("alice", "").await;

    // Not joined anywhere: an unknown gift is a bad frame before anything else.
    let e = anon
        .call(json!({"op":"gift","room":"g","gift":"unicorn"}), 1)
        .await;
    assert_error(&e, "bad_request", 1);
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"unicorn"}), 2)
        .await;
    assert_error(&e, "bad_request", 2);
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"rose","count":0}), 3)
        .await;
    assert_error(&e, "bad_request", 3);
    // unauthorized beats not_joined (and forbidden).
    let e = anon
        .call(json!({"op":"gift","room":"g","gift":"rose"}), 4)
        .await;
    assert_error(&e, "unauthorized", 4);
    let e = anon
        .call(json!({"op":"gift","room":"g","gift":"rocket"}), 5)
        .await;
    assert_error(&e, "unauthorized", 5);
    // not_joined beats forbidden.
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"rocket"}), 6)
        .await;
    assert_error(&e, "not_joined", 6);

    a.join("g").await;
    // None of the refusals above spent the gift budget (burst 2): two gifts pass.
    for r in [7, 8] {
        let ack = a
            .call(json!({"op":"gift","room":"g","gift":"rose"}), r)
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    // Budget spent: a free gift is rate_limited, a paid one still forbidden.
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"heart"}), 9)
        .await;
    assert_error(&e, "rate_limited", 9);
    assert!(e["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{e}");
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"yacht"}), 10)
        .await;
    assert_error(&e, "forbidden", 10);
    // ... and an unknown gift is still a bad frame, whatever the budget says.
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"unicorn"}), 11)
        .await;
    assert_error(&e, "bad_request", 11);
    // Leaving: not_joined again beats rate_limited.
    assert_eq!(
        a.call(json!({"op":"leave","room":"g"}), 12).await["op"],
        "ack"
    );
    let e = a
        .call(json!({"op":"gift","room":"g","gift":"rose"}), 13)
        .await;
    assert_error(&e, "not_joined", 13);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// HTTP API refusals

#[tokio::test]
async fn api_gift_validation() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    a.join("api").await;
    let cases = [
        (
            json!({"type":"gift","user":user("u"),"gift":"unicorn"}),
            "gift",
        ),
        (
            json!({"type":"gift","user":user("u"),"gift":"rocket","count":0}),
            "count",
        ),
        (
            json!({"type":"gift","user":user("u"),"gift":"rocket","count":10000}),
            "count",
        ),
        (json!({"type":"gift","gift":"rocket"}), "user"),
        (
            json!({"type":"gift","user":{"id":"","name":"x"},"gift":"rocket"}),
            "user.id",
        ),
        (json!({"type":"gift","user":user("u")}), "gift"),
    ];
    for (body, field) in cases {
        let (status, reply) = gw
            .api("POST", "/api/v1/rooms/api/events", Some(&body))
            .await;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert_eq!(reply["code"], "bad_request", "{reply}");
        let msg = reply["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(field),
            "message should name `{field}`: {reply}"
        );
    }
    // Without the bearer token: 401.
    let (status, reply) = support::http(
        gw.addr,
        "POST",
        "/api/v1/rooms/api/events",
        None,
        Some(&json!({"type":"gift","user":user("u"),"gift":"rocket"}).to_string()),
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    let (status, reply) = support::http(
        gw.addr,
        "POST",
        "/api/v1/rooms/api/events",
        Some("wrong-token"),
        Some(&json!({"type":"gift","user":user("u"),"gift":"rocket"}).to_string()),
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    // Nothing refused reached the room.
    let events = events_through_marker(&gw, &mut a, "api", "after-api").await;
    assert!(gifts_in(&events).is_empty(), "{events:?}");
    gw.stop().await;
}

/// PROTOCOL.md: a body that fails to parse is 400 `bad_request` "with a message naming
/// the field". The events endpoint parses an internally tagged enum, which loses the path
/// of a wrongly typed field: the message says `body: invalid type: ...` instead.
#[tokio::test]
async fn api_gift_wrong_type_message_names_the_field() {
    let gw = gateway(|_| {}).await;
    for (body, field) in [
        (
            json!({"type":"gift","user":user("u"),"gift":"rocket","count":"2"}),
            "count",
        ),
        (
            json!({"type":"gift","user":user("u"),"gift":"rocket","count":-1}),
            "count",
        ),
        (json!({"type":"gift","user":"bob","gift":"rocket"}), "user"),
    ] {
        let (status, reply) = gw
            .api("POST", "/api/v1/rooms/api/events", Some(&body))
            .await;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert_eq!(reply["code"], "bad_request", "{reply}");
        let msg = reply["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(field),
            "message should name `{field}`: {reply}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn backend_gifts_do_not_spend_client_budgets() {
    let gw = gateway(|c| {
        c.ratelimit.gift = Rate {
            rate: 0.01,
            burst: 1,
        };
    })
    .await;
    let mut a = gw.user("alice", "").await;
    a.join("b").await;
    // Reads the room's events (a client waiting for replies skips batches).
    let mut watcher = gw.client("").await;
    watcher.join("b").await;
    for i in 0..5 {
        let (status, body) = gw
            .api(
                "POST",
                "/api/v1/rooms/b/events",
                Some(&json!({"type":"gift","user":user("alice"),"gift":"rocket","count":1})),
            )
            .await;
        assert_eq!(status, 202, "post {i}: {body}");
    }
    // The user's own free-gift budget (burst 1) is untouched.
    let ack = a
        .call(json!({"op":"gift","room":"b","gift":"rose"}), 1)
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let e = a
        .call(json!({"op":"gift","room":"b","gift":"rose"}), 2)
        .await;
    assert_error(&e, "rate_limited", 2);
    let events = events_through_marker(&gw, &mut watcher, "b", "after-budget").await;
    let sum = |gift: &str| -> u64 {
        gifts_in(&events)
            .iter()
            .filter(|g| g["gift"] == gift)
            .map(|g| g["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("rocket"), 5, "{events:?}");
    let roses = sum("rose");
    assert_eq!(roses, 1, "the refused rose was not broadcast");
    gw.stop().await;
}
