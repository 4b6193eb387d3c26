use super::*;

fn notice(user: &str, app: &str, client: &str, tables: &[&str]) -> Notice {
    Notice {
        user_id: user.into(),
        app_id: app.into(),
        client_id: client.into(),
        tables: Some(tables.iter().map(|t| t.to_string()).collect()),
        replica: None,
        seq: Some(1),
        committed_at: None,
        traceparent: None,
    }
}

#[test]
fn notices_reach_the_users_other_devices_only() {
    let hub = Hub::new(10, 100, Metrics::new(), Lifecycle::new());
    let mine = hub.subscribe("alice", Some("todo"), Some("laptop")).unwrap();
    let phone = hub.subscribe("alice", Some("todo"), Some("phone")).unwrap();
    let undeclared = hub.subscribe("alice", None, None).unwrap();
    let other_app = hub.subscribe("alice", Some("notes"), None).unwrap();
    let bob = hub.subscribe("bob", None, None).unwrap();
    assert_eq!(hub.publish(&notice("alice", "todo", "laptop", &["todos"])), 2);
    assert!(mine.subscriber.take().tables.is_empty());
    assert!(other_app.subscriber.take().tables.is_empty());
    assert!(bob.subscriber.take().tables.is_empty());
    assert_eq!(
        phone.subscriber.take().tables["todo"],
        Some(BTreeSet::from(["todos".to_owned()]))
    );
    assert!(undeclared.subscriber.take().tables.contains_key("todo"));
}

#[test]
fn a_burst_coalesces_into_one_pending_set() {
    let hub = Hub::new(10, 100, Metrics::new(), Lifecycle::new());
    let s = hub.subscribe("alice", None, None).unwrap();
    for t in ["a", "b", "a", "c"] {
        hub.publish(&notice("alice", "todo", "x", &[t]));
    }
    hub.publish(&notice("alice", "notes", "x", &["n"]));
    let pending = s.subscriber.take().tables;
    assert_eq!(pending.len(), 2);
    assert_eq!(pending["todo"].as_ref().unwrap().len(), 3);
    let many: Vec<String> = (0..=MAX_PENDING_TABLES).map(|i| format!("t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    hub.publish(&notice("alice", "todo", "x", &many));
    assert_eq!(
        s.subscriber.take().tables["todo"],
        None,
        "too many tables becomes 'all'"
    );
}

/// A lookup of the user's tables, answering `tables` of app `todo`.
async fn looked_up(hub: &Hub, tables: &[&str]) -> Vec<String> {
    let answer = ByApp::from([("todo".to_owned(), tables.iter().map(|t| t.to_string()).collect())]);
    let by_app = hub.tables("alice", || async { Ok::<_, ()>(answer) }).await.unwrap();
    by_app.get("todo").cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_users_table_lookup_is_reused_and_learns_even_from_untold_notices() {
    let hub = Hub::new(10, 100, Metrics::new(), Lifecycle::new());
    hub.set_listening(true);
    let _laptop = hub.subscribe("alice", Some("todo"), Some("laptop")).unwrap();
    assert_eq!(looked_up(&hub, &["todos"]).await, ["todos"]);
    assert_eq!(looked_up(&hub, &["other"]).await, ["todos"], "the answer is reused");
    // The laptop's own push tells nobody here, but a later catch-up must name `lists`.
    assert_eq!(hub.publish(&notice("alice", "todo", "laptop", &["lists"])), 0);
    assert_eq!(looked_up(&hub, &["other"]).await, ["lists", "todos"]);
    hub.publish_everything();
    assert_eq!(
        looked_up(&hub, &["fresh"]).await,
        ["fresh"],
        "notices may be lost: look again"
    );
    hub.set_listening(false);
    assert_eq!(looked_up(&hub, &["again"]).await, ["again"], "not listening: no reuse");
}

#[test]
fn limits_are_enforced_and_dropping_unregisters() {
    let life = Lifecycle::new();
    let hub = Hub::new(2, 3, Metrics::new(), life.clone());
    let a = hub.subscribe("alice", None, None).unwrap();
    let _b = hub.subscribe("alice", None, None).unwrap();
    assert_eq!(hub.subscribe("alice", None, None).err(), Some(Refusal::UserLimit));
    let _c = hub.subscribe("bob", None, None).unwrap();
    assert_eq!(hub.subscribe("carol", None, None).err(), Some(Refusal::ServerLimit));
    assert_eq!(hub.stats(), (3, 2));
    drop(a);
    assert_eq!(hub.stats(), (2, 2));
    life.advance(Stage::Closing);
    assert_eq!(hub.subscribe("dave", None, None).err(), Some(Refusal::ShuttingDown));
}
