//! Join, chat, batches, history, presence — the main path, in both formats.

mod support;

use serde_json::json;
use support::Gateway;

#[tokio::test]
async fn hello_then_join_chat_batch() {
    let gw = Gateway::start().await;
    let mut a = gw.user("alice", "").await;
    assert_eq!(a.hello["node"], "test-node");
    assert_eq!(a.hello["user"], json!({"id":"alice","name":"alice"}));
    assert!(a.hello["conn"].is_string());
    assert!(a.hello["heartbeat_ms"].as_u64().unwrap() > 0);
    let joined = a.call(json!({"op":"join","room":"r1"}), 1).await;
    assert_eq!(joined["op"], "joined");
    assert_eq!(joined["room"], "r1");
    assert_eq!(joined["online"], 1);
    assert_eq!(joined["history"], json!([]));
    assert_eq!(joined["redpackets"], json!([]));
    let ack = a
        .call(json!({"op":"chat","room":"r1","text":"hi"}), 2)
        .await;
    assert_eq!(ack, json!({"op":"ack","ref":2}));
    let events = a
        .events_until("r1", |e| e.iter().any(|e| e["type"] == "chat"))
        .await;
    let chat = events.iter().find(|e| e["type"] == "chat").unwrap();
    assert_eq!(chat["text"], "hi");
    assert_eq!(chat["user"], json!({"id":"alice","name":"alice"}));
    assert!(chat["id"].is_string() && chat["ts"].is_u64());
    gw.stop().await;
}

#[tokio::test]
async fn msgpack_client_sees_the_same_schema() {
    let gw = Gateway::start().await;
    let mut a = gw.user("bob", "format=msgpack&room=r2").await;
    assert_eq!(a.hello["op"], "hello");
    let joined = a.reply().await;
    assert_eq!(joined["op"], "joined");
    assert!(joined.get("ref").is_none());
    let ack = a
        .call(json!({"op":"chat","room":"r2","text":"mp"}), 5)
        .await;
    assert_eq!(ack["op"], "ack");
    let events = a
        .events_until("r2", |e| e.iter().any(|e| e["type"] == "chat"))
        .await;
    assert!(events.iter().any(|e| e["text"] == "mp"));
    gw.stop().await;
}
