//! A device: local records, a cursor, one batch in flight at a time
//! (retried with its `Idempotency-Key` until acknowledged, as the engine
//! retries), a socket that says when to pull, and random faults of its own
//! requests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mana_sync::timestamp::Timestamp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

pub const APP: &str = "todo";
pub const TABLE: &str = "todos";
/// Each batch carries one record of this table, `id` its key and `n` the
/// batch's size, so the log shows which batch its rows belong to.
pub const MARKERS: &str = "markers";

/// How a device applies what the server sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flavor {
    /// As the original Dexie engine: `put(data)`; an update's fields and
    /// then `updatedAt`; `deletedAt` on a record it holds.
    Original,
    /// As a correct client: the server's folded state, field by field,
    /// tombstones kept even for records it never held.
    Correct,
}

/// What every device shares: where the replicas are, what was
/// acknowledged, what went wrong, and the counts for the report.
pub struct World {
    pub ports: Vec<u16>,
    pub http: reqwest::Client,
    /// Acknowledged batches: key → rows it must have in the log.
    pub acked: Mutex<HashMap<String, usize>>,
    pub failures: Mutex<Vec<String>>,
    pub stats: Stats,
}

#[derive(Default)]
pub struct Stats {
    pub changes: AtomicU64,
    pub pushes_acked: AtomicU64,
    pub pulls: AtomicU64,
    pub lost_requests: AtomicU64,
    pub lost_responses: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    pub unreachable: AtomicU64,
    pub notices: AtomicU64,
    pub socket_drops: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl World {
    pub fn fail(&self, what: String) {
        eprintln!("consistency: FAILURE {what}");
        self.failures.lock().unwrap().push(what);
    }
}

struct Batch {
    key: String,
    changes: Vec<Value>,
}

/// What is wrong with the answer to a retry of `batch` (`again`), given
/// the first answer: it must hold every record the batch changed (unless
/// cut short) and its cursor must not be older than the first's.
fn replay_problem(batch: &Batch, first: &Value, again: &Value) -> Option<String> {
    let cursor = |answer: &Value| answer["syncedUntil"].as_str().unwrap_or_default().to_owned();
    if cursor(again) < cursor(first) {
        return Some(format!(
            "its cursor {} is older than the first answer's {}",
            cursor(again),
            cursor(first)
        ));
    }
    if again["hasMore"] == true {
        return None;
    }
    let answered: Vec<(&Value, &Value)> = again["serverChanges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (&c["table"], &c["id"]))
        .collect();
    batch
        .changes
        .iter()
        .find(|c| !answered.contains(&(&c["table"], &c["id"])))
        .map(|c| format!("its answer lacks the batch's record {}/{}", c["table"], c["id"]))
}

pub struct Device {
    pub user: String,
    pub name: String,
    pub flavor: Flavor,
    token: String,
    skew_ms: i64,
    cursor: String,
    /// Its records of [`TABLE`], by id.
    pub records: BTreeMap<String, Map<String, Value>>,
    /// Every `title` the server sent it (each write's title is unique).
    pub seen: HashSet<String>,
    outbox: Option<Batch>,
    next: usize,
    rng: StdRng,
    notified: Arc<Notify>,
}

impl Device {
    pub fn new(user: &str, index: usize, flavor: Flavor, token: String, seed: u64) -> Device {
        let mut rng = StdRng::seed_from_u64(seed);
        // Clocks: in step, behind, ahead, and far in the future (clamped).
        let skew_ms = [0, -300_000, 2_000, 365 * 86_400_000][rng.random_range(0..4)];
        Device {
            user: user.to_owned(),
            name: format!("{user}-d{index}"),
            flavor,
            token,
            skew_ms,
            cursor: "1970-01-01T00:00:00.000Z".to_owned(),
            records: BTreeMap::new(),
            seen: HashSet::new(),
            outbox: None,
            next: 0,
            rng,
            notified: Arc::new(Notify::new()),
        }
    }

    fn now(&self) -> String {
        Timestamp(Timestamp::now().0 + self.skew_ms * 1_000_000)
            .floor_millis()
            .to_short_string()
    }

    fn port(&mut self, world: &World) -> u16 {
        world.ports[self.rng.random_range(0..world.ports.len())]
    }

    fn live(&self) -> Vec<String> {
        self.records
            .iter()
            .filter(|(_, r)| r.get("deletedAt").is_none_or(Value::is_null))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A unique title: which user, device and write.
    fn title(&mut self) -> String {
        self.next += 1;
        format!("{}/{}/{}", self.user, self.name, self.next)
    }

    /// One random local change, written locally first as the engine does.
    fn local_change(&mut self) -> Value {
        let live = self.live();
        let now = self.now();
        let roll = self.rng.random_range(0..10);
        if live.is_empty() || roll < 3 {
            let title = self.title();
            let id = format!("{}-{}", self.name, self.next);
            let mut data = json!({ "id": id, "title": title, "done": false });
            match self.rng.random_range(0..4) {
                0 => {}
                1 => data["createdAt"] = json!(now),
                _ => data["updatedAt"] = json!(now),
            }
            self.records.insert(id.clone(), data.as_object().unwrap().clone());
            return json!({ "table": TABLE, "id": id, "op": "insert", "data": data });
        }
        let id = live[self.rng.random_range(0..live.len())].clone();
        if roll == 9 {
            self.records
                .get_mut(&id)
                .unwrap()
                .insert("deletedAt".into(), json!(now));
            return json!({ "table": TABLE, "id": id, "op": "delete", "deletedAt": now });
        }
        let mut fields = Map::new();
        fields.insert("title".into(), json!({ "value": self.title(), "updatedAt": now }));
        if self.rng.random_bool(0.5) {
            fields.insert(
                "done".into(),
                json!({ "value": self.rng.random_bool(0.5), "updatedAt": now }),
            );
        }
        // The seed's engine never sends `at`: a push with it is of the
        // later generation, which gets no echo of its own writes.
        if self.rng.random_bool(0.3) {
            fields.insert(
                "rank".into(),
                json!({ "value": self.rng.random_range(0..10), "updatedAt": now }),
            );
        }
        let record = self.records.get_mut(&id).unwrap();
        for (field, written) in &fields {
            record.insert(field.clone(), written["value"].clone());
        }
        json!({ "table": TABLE, "id": id, "op": "update", "fields": fields })
    }

    /// Applies the `serverChanges` of an answer as this device's flavor
    /// does, then follows its cursor.
    fn apply(&mut self, world: &World, answer: &Value) {
        for change in answer["serverChanges"].as_array().into_iter().flatten() {
            if change["table"] != TABLE {
                continue;
            }
            let id = change["id"].as_str().unwrap_or_default().to_owned();
            for title in [&change["data"]["title"], &change["fields"]["title"]["value"]] {
                if let Some(title) = title.as_str() {
                    if !title.starts_with(&format!("{}/", self.user)) {
                        world.fail(format!("{} was sent another user's data: {change}", self.name));
                    }
                    self.seen.insert(title.to_owned());
                }
            }
            match (change["op"].as_str(), self.flavor) {
                (Some("insert"), _) => {
                    let data = change["data"].as_object().cloned().unwrap_or_default();
                    self.records.insert(id, data);
                }
                (Some("update"), flavor) => {
                    let record = match (self.records.get_mut(&id), flavor) {
                        (Some(record), _) => record,
                        (None, Flavor::Correct) => self.records.entry(id.clone()).or_default(),
                        (None, Flavor::Original) => {
                            world.fail(format!(
                                "{}: an update of {id}, which it never got: {change}",
                                self.name
                            ));
                            continue;
                        }
                    };
                    let mut latest = String::new();
                    for (field, written) in change["fields"].as_object().into_iter().flatten() {
                        record.insert(field.clone(), written["value"].clone());
                        latest = latest.max(written["updatedAt"].as_str().unwrap_or_default().to_owned());
                    }
                    if flavor == Flavor::Original {
                        record.insert("updatedAt".into(), Value::String(latest));
                    }
                }
                (Some("delete"), Flavor::Original) => {
                    if let Some(record) = self.records.get_mut(&id) {
                        record.insert("deletedAt".into(), change["deletedAt"].clone());
                    }
                }
                (Some("delete"), Flavor::Correct) => {
                    let record = self.records.entry(id).or_default();
                    record.insert("deletedAt".into(), change["deletedAt"].clone());
                }
                _ => world.fail(format!("{}: a change it cannot read: {change}", self.name)),
            }
        }
        if let Some(cursor) = answer["syncedUntil"].as_str() {
            self.cursor = cursor.to_owned();
        }
    }

    async fn send(&self, world: &World, port: u16, batch: &Batch) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut changes = batch.changes.clone();
        let n = changes.len() + 1;
        changes.push(json!({ "table": MARKERS, "id": batch.key, "op": "insert", "data": { "n": n } }));
        let body = json!({ "clientId": self.name, "since": self.cursor, "changes": changes });
        let response = world
            .http
            .post(format!("http://127.0.0.1:{port}/sync/{APP}"))
            .bearer_auth(&self.token)
            .header("Idempotency-Key", &batch.key)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Judges one answer to a push: `Some(answer)` when acknowledged.
    fn judge(&self, world: &World, what: Result<(StatusCode, Value), reqwest::Error>) -> Option<Value> {
        match what {
            Ok((StatusCode::OK, answer)) => Some(answer),
            Ok((StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS, _)) => {
                bump(&world.stats.refused);
                None
            }
            Ok((status, body)) => {
                world.fail(format!("{}: push answered {status}: {body}", self.name));
                None
            }
            Err(_) => {
                bump(&world.stats.unreachable);
                None
            }
        }
    }

    /// Pushes the pending batch (making one first if there is none), with
    /// a random fault of the device's own.
    async fn push(&mut self, world: &World) {
        if self.outbox.is_none() {
            let changes: Vec<Value> = (0..self.rng.random_range(1..=3)).map(|_| self.local_change()).collect();
            world.stats.changes.fetch_add(changes.len() as u64, Ordering::Relaxed);
            self.next += 1;
            let key = format!("{}-b{}", self.name, self.next);
            self.outbox = Some(Batch { key, changes });
        }
        let batch = self.outbox.take().unwrap();
        let port = self.port(world);
        let answer = match self.rng.random_range(0..10) {
            // A lost request: it may or may not have reached the replica.
            0 => {
                bump(&world.stats.lost_requests);
                let wait = Duration::from_millis(self.rng.random_range(0..5));
                let _ = tokio::time::timeout(wait, self.send(world, port, &batch)).await;
                None
            }
            // A lost response: the retry is answered afresh (an outcome keeps
            // no page), with the batch's own records and a cursor no older.
            1 => {
                bump(&world.stats.lost_responses);
                let first = self.send(world, port, &batch).await;
                let port = self.port(world);
                let again = self.judge(world, self.send(world, port, &batch).await);
                if let (Ok((StatusCode::OK, first)), Some(again)) = (&first, &again)
                    && let Some(problem) = replay_problem(&batch, first, again)
                {
                    world.fail(format!("{}: a retry of {}: {problem}", self.name, batch.key));
                }
                again
            }
            // The same request twice at once.
            2 => {
                bump(&world.stats.duplicates);
                let other = self.port(world);
                let (a, b) = tokio::join!(self.send(world, port, &batch), self.send(world, other, &batch));
                let (a, b) = (self.judge(world, a), self.judge(world, b));
                a.or(b)
            }
            _ => {
                let sent = self.send(world, port, &batch).await;
                self.judge(world, sent)
            }
        };
        match answer {
            Some(answer) => {
                bump(&world.stats.pushes_acked);
                world
                    .acked
                    .lock()
                    .unwrap()
                    .insert(batch.key.clone(), batch.changes.len() + 1);
                self.apply(world, &answer);
            }
            None => self.outbox = Some(batch),
        }
    }

    /// Follows the cursor to the end; false if a replica did not answer.
    pub async fn pull(&mut self, world: &World) -> bool {
        loop {
            let port = self.port(world);
            let response = world
                .http
                .get(format!("http://127.0.0.1:{port}/sync/{APP}/pull"))
                .query(&[("collection", TABLE), ("since", &self.cursor)])
                .bearer_auth(&self.token)
                .header("X-Client-Id", &self.name)
                .send()
                .await;
            let answer = match response {
                Ok(r) if r.status() == StatusCode::OK => r.json::<Value>().await.unwrap_or(Value::Null),
                Ok(r) if matches!(r.status().as_u16(), 429 | 503) => return false,
                Ok(r) => {
                    let status = r.status();
                    world.fail(format!("{}: pull answered {status}", self.name));
                    return false;
                }
                Err(_) => return false,
            };
            bump(&world.stats.pulls);
            self.apply(world, &answer);
            if answer["hasMore"] != true {
                return true;
            }
        }
    }

    /// Pushes until its pending batch is acknowledged (the end of a run).
    pub async fn flush(&mut self, world: &World) {
        for _ in 0..600 {
            if self.outbox.is_none() {
                return;
            }
            self.push(world).await;
            if self.outbox.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        world.fail(format!("{}: its last batch was never acknowledged", self.name));
    }

    /// Acts until `until`: edits and pushes, pulls when its socket says so
    /// or at random.
    pub async fn run(mut self, world: Arc<World>, until: tokio::time::Instant) -> Device {
        let socket = tokio::spawn(follow_socket(
            world.clone(),
            self.token.clone(),
            self.name.clone(),
            self.notified.clone(),
        ));
        while tokio::time::Instant::now() < until {
            let pause = Duration::from_millis(self.rng.random_range(5..100));
            let notified = tokio::select! {
                _ = self.notified.notified() => true,
                _ = tokio::time::sleep(pause) => false,
            };
            if notified || self.rng.random_bool(0.2) {
                self.pull(&world).await;
            } else {
                self.push(&world).await;
            }
        }
        socket.abort();
        self
    }
}

/// Holds a socket on a random replica, reconnecting when it drops, and
/// wakes the device on every `sync-available`.
async fn follow_socket(world: Arc<World>, token: String, client: String, notified: Arc<Notify>) {
    let mut turn = 0usize;
    loop {
        turn += 1;
        let port = world.ports[turn % world.ports.len()];
        if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws/{APP}")).await {
            let auth = json!({ "type": "auth", "token": token, "clientId": client });
            if socket.send(Message::text(auth.to_string())).await.is_ok() {
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message
                        && text.contains("sync-available")
                    {
                        bump(&world.stats.notices);
                        notified.notify_one();
                    }
                }
            }
            bump(&world.stats.socket_drops);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
