//! An acknowledged write survives `kill -9`, whatever the server was doing.
//!
//! Rounds on one data directory (50 in every run; `CITYTSDB_CRASH_ROUNDS=N` for a
//! longer one). In each, four threads write distinct batches at once (so the
//! server's group commit combines them into shared fsyncs) and record which
//! batches were answered 204; the server is then SIGKILLed at a random moment
//! while writes are in flight and, round by round, while it also flushes, compacts
//! a day of several runs, or deletes an acknowledged batch. After every restart
//! every acknowledged batch must be there, whole, with its values; a batch that was
//! in flight may be there or not, but never in part, and once seen it must stay; a
//! deleted batch must be gone, and one whose delete was in flight either whole or
//! gone for good.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use citytsdb_tests::oracle::same_value;
use citytsdb_tests::workload::{device_name, rfc3339, round_to, XorShift, DAY, DEFAULT_START};
use citytsdb_tests::{Client, Server};

const DB: &str = "city";
/// Rounds in every run; `CITYTSDB_CRASH_ROUNDS` asks for more.
const ROUNDS: u32 = 50;
const WRITERS: u32 = 4;
const ROWS_PER_BATCH: u32 = 250;
/// Most batches one writer sends in a round (keeps the store, and the run, small).
const MAX_BATCHES: u32 = 80;
/// Acknowledged batches to wait for before the kill is armed.
const ACKS_BEFORE_KILL: usize = 12;

/// What the server is doing besides writes when it is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Doing {
    Writes,
    Flush,
    Compaction,
    Delete,
}

impl Doing {
    fn of(round: u32) -> Doing {
        [
            Doing::Writes,
            Doing::Flush,
            Doing::Compaction,
            Doing::Delete,
        ][(round % 4) as usize]
    }
}

/// One write request: every row has the batch's own timestamp, so rows of a
/// batch are counted with `GROUP BY time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Batch {
    round: u32,
    writer: u32,
    seq: u32,
}

impl Batch {
    fn time(&self) -> i64 {
        round_start(self.round) + i64::from(self.writer) * 20_000 + i64::from(self.seq)
    }

    /// Values are a function of batch and device, so any row can be checked.
    fn values(&self, device: u32) -> (f64, f64, i64, bool) {
        let mix = self.round * 7 + self.writer * 13 + self.seq * 17 + device;
        let tilt = round_to(0.4 + f64::from(mix % 30) / 100.0, 2);
        let level = round_to(f64::from(mix % 1000) / 10.0, 1);
        let battery = i64::from(5 + mix % 95);
        (tilt, level, battery, mix % 7 == 3)
    }

    fn body(&self) -> String {
        let mut body = String::with_capacity(ROWS_PER_BATCH as usize * 120);
        for device in 1..=ROWS_PER_BATCH {
            let (tilt, level, battery, open) = self.values(device);
            body.push_str(&format!(
                "manhole,device={},district=金水区 tilt_deg={tilt},water_level_cm={level},battery_pct={battery}i,cover_open={open} {}\n",
                device_name(device),
                self.time()
            ));
        }
        body
    }
}

fn round_start(round: u32) -> i64 {
    DEFAULT_START + i64::from(round) * DAY
}

/// What the writers learned: batches answered 204, and batches sent whose fate
/// is unknown because they were in flight at the kill.
#[derive(Default)]
struct Ledger {
    acked: BTreeSet<Batch>,
    unsure: BTreeSet<Batch>,
    /// Batches whose delete was answered: gone for good.
    deleted: BTreeSet<Batch>,
    /// Batches whose delete was in flight at the kill.
    deleting: BTreeSet<Batch>,
}

/// Writes batches until the server stops answering or `stop` is set.
fn writer(
    client: Client,
    round: u32,
    writer: u32,
    ledger: Arc<Mutex<Ledger>>,
    acks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    for seq in 0..MAX_BATCHES {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let batch = Batch { round, writer, seq };
        let body = batch.body();
        match client.write(DB, "s", body.as_bytes()) {
            Ok((204, _)) => {
                ledger.lock().expect("ledger").acked.insert(batch);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            // Every batch is valid line protocol: any other answer is a bug.
            Ok((status, answer)) => panic!("batch {batch:?} answered {status}: {answer}"),
            // No answer: the server was killed with the write in flight.
            Err(_) => {
                ledger.lock().expect("ledger").unsure.insert(batch);
                return;
            }
        }
    }
}

/// Checks the batches of `rounds` after a restart (one count per batch time, per
/// round: a query over every round at once makes the merge of buffered and
/// persisted rows hold too much); batches found that were unsure become required
/// from now on.
fn verify(server: &Server, ledger: &mut Ledger, rng: &mut XorShift, rounds: &[u32]) {
    if ledger.acked.is_empty() && ledger.unsure.is_empty() && ledger.deleting.is_empty() {
        return; // Nothing written yet: no table to ask.
    }
    let mut found: BTreeMap<String, u64> = BTreeMap::new();
    for &round in rounds {
        let sql = format!(
            "SELECT time, count(*) AS n FROM manhole WHERE time >= '{}' AND time < '{}' GROUP BY time",
            rfc3339(round_start(round)),
            rfc3339(round_start(round + 1))
        );
        for row in server.query_json(DB, &sql) {
            let time = row["time"]
                .as_str()
                .unwrap_or_else(|| panic!("time in {row:?}"))
                .to_string();
            let n = row["n"]
                .as_u64()
                .unwrap_or_else(|| panic!("count in {row:?}"));
            found.insert(time, n);
        }
    }
    let checked = |b: &Batch| rounds.contains(&b.round);
    ledger.deleting.retain(|b| {
        !checked(b) || {
            // A delete in flight at the kill either happened (the batch is gone) or not.
            if !found.contains_key(&rfc3339(b.time())) {
                ledger.acked.remove(b);
                ledger.deleted.insert(*b);
            }
            false
        }
    });
    let mut missing = Vec::new();
    for batch in ledger.acked.iter().filter(|b| checked(b)) {
        match found.get(&rfc3339(batch.time())) {
            Some(&n) if n == u64::from(ROWS_PER_BATCH) => {}
            other => missing.push(format!("{batch:?} has {other:?} rows")),
        }
    }
    if !missing.is_empty() {
        server.fail(&format!(
            "{} acknowledged batches lost rows after kill -9 (of {} acknowledged): {}",
            missing.len(),
            ledger.acked.len(),
            missing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let known: BTreeMap<String, Batch> = ledger
        .acked
        .iter()
        .chain(&ledger.unsure)
        .chain(&ledger.deleted)
        .map(|b| (rfc3339(b.time()), *b))
        .collect();
    for (time, n) in &found {
        let Some(batch) = known.get(time) else {
            server.fail(&format!("rows at {time} that no writer sent"));
        };
        if ledger.deleted.contains(batch) {
            server.fail(&format!(
                "{batch:?} was gone (deleted, or lost while in flight), and is back"
            ));
        }
        if *n != u64::from(ROWS_PER_BATCH) {
            server.fail(&format!(
                "{batch:?} is partly there: {n} of {ROWS_PER_BATCH} rows"
            ));
        }
        if ledger.unsure.remove(batch) {
            ledger.acked.insert(*batch);
        }
    }
    // An in-flight batch not replayed now is lost for good: seeing it later would
    // be a resurrection.
    let lost: Vec<Batch> = ledger
        .unsure
        .iter()
        .filter(|b| checked(b))
        .copied()
        .collect();
    for b in lost {
        ledger.unsure.remove(&b);
        ledger.deleted.insert(b);
    }

    // Spot values: whole rows of a few acknowledged batches.
    let acked: Vec<Batch> = ledger
        .acked
        .iter()
        .filter(|b| checked(b))
        .copied()
        .collect();
    for _ in 0..3.min(acked.len()) {
        let batch = acked[rng.below(acked.len() as u64) as usize];
        let sql = format!(
            "SELECT device, district, tilt_deg, water_level_cm, battery_pct, cover_open FROM manhole \
             WHERE time = '{}' ORDER BY device",
            rfc3339(batch.time())
        );
        let rows = server.query_json(DB, &sql);
        assert_eq!(rows.len(), ROWS_PER_BATCH as usize, "{batch:?}");
        for (i, row) in rows.iter().enumerate() {
            let device = i as u32 + 1;
            let (tilt, level, battery, open) = batch.values(device);
            let want = serde_json::json!({
                "device": device_name(device), "district": "金水区", "tilt_deg": tilt,
                "water_level_cm": level, "battery_pct": battery, "cover_open": open,
            });
            let got = serde_json::Value::Object(row.clone());
            let same = want.as_object().is_some_and(|w| {
                w.len() == row.len()
                    && w.iter()
                        .all(|(k, v)| row.get(k).is_some_and(|g| same_value(g, v)))
            });
            assert!(same, "{batch:?} row {i}: got {got}, want {want}");
        }
    }
}

/// `POST path` on a thread: whether it was answered 200 (`None` while in flight).
fn in_background(
    client: Client,
    path: &'static str,
    body: Option<String>,
) -> thread::JoinHandle<Option<u16>> {
    thread::spawn(move || {
        let answer = match body {
            Some(b) => client.post(path, b.as_bytes()),
            None => client.post(path, b""),
        };
        answer.ok().map(|(status, _)| status)
    })
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut ledger = Ledger::default();
    let mut rng = XorShift::new(2025);

    let rounds = std::env::var("CITYTSDB_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    let mut outcomes: BTreeMap<(Doing, &str), u32> = BTreeMap::new();
    for round in 0..rounds {
        let server = Server::start(&data);
        // The last round every time; every round every tenth time.
        let check: Vec<u32> = if round % 10 == 0 {
            (0..round).collect()
        } else {
            vec![round - 1]
        };
        verify(&server, &mut ledger, &mut rng, &check);

        let shared = Arc::new(Mutex::new(Ledger::default()));
        let acks = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (client, shared, acks, stop) =
                    (server.client(), shared.clone(), acks.clone(), stop.clone());
                thread::spawn(move || writer(client, round, w, shared, acks, stop))
            })
            .collect();

        let wait_for_acks = |at_least: usize| {
            let deadline = Instant::now() + Duration::from_secs(120);
            while acks.load(Ordering::SeqCst) < at_least {
                let done = threads.iter().all(|t| t.is_finished());
                if done && acks.load(Ordering::SeqCst) >= ACKS_BEFORE_KILL {
                    return; // Every writer sent its last batch.
                }
                if Instant::now() > deadline || done {
                    stop.store(true, Ordering::SeqCst);
                    server.fail(&format!(
                        "round {round}: only {} writes acknowledged",
                        acks.load(Ordering::SeqCst)
                    ));
                }
                thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for_acks(ACKS_BEFORE_KILL);
        let doing = Doing::of(round);
        let mut doomed = None;
        let work = match doing {
            Doing::Writes => None,
            Doing::Flush => Some(in_background(server.client(), "/api/v1/flush", None)),
            Doing::Compaction => {
                // Two more runs in this round's day, then a compaction of them.
                server.flush(DB);
                wait_for_acks(acks.load(Ordering::SeqCst) + WRITERS as usize);
                server.flush(DB);
                wait_for_acks(acks.load(Ordering::SeqCst) + WRITERS as usize);
                Some(in_background(server.client(), "/api/v1/compact", None))
            }
            Doing::Delete => {
                let batch = *shared
                    .lock()
                    .expect("ledger")
                    .acked
                    .iter()
                    .next()
                    .expect("an acknowledged batch");
                doomed = Some(batch);
                let sql = format!(
                    "DELETE FROM manhole WHERE time = '{}'",
                    rfc3339(batch.time())
                );
                let body = serde_json::json!({"db": DB, "sql": sql}).to_string();
                Some(in_background(server.client(), "/api/v1/query", Some(body)))
            }
        };
        // Some kills land while the work runs, some after it was answered.
        let wait = match doing {
            Doing::Writes => rng.below(250),
            _ if round % 8 >= 4 => 300 + rng.below(900),
            _ => rng.below(60),
        };
        thread::sleep(Duration::from_millis(wait));
        let acked_before_kill = acks.load(Ordering::SeqCst);
        server.kill9();
        let answered = work.and_then(|w| w.join().expect("background request"));
        *outcomes
            .entry((
                doing,
                match (doing, answered) {
                    (Doing::Writes, _) => "writes only",
                    (_, Some(_)) => "answered",
                    (_, None) => "killed mid-way",
                },
            ))
            .or_insert(0) += 1;
        if let Some(status) = answered {
            assert_eq!(status, 200, "round {round}: {doing:?} answered {status}");
        }
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().expect("writer thread");
        }
        let round_ledger = std::mem::take(&mut *shared.lock().expect("ledger"));
        assert!(round_ledger.acked.len() >= acked_before_kill);
        ledger.acked.extend(round_ledger.acked);
        ledger.unsure.extend(round_ledger.unsure);
        if let Some(batch) = doomed {
            if answered == Some(200) {
                ledger.acked.remove(&batch);
                ledger.deleted.insert(batch);
            } else {
                ledger.deleting.insert(batch);
            }
        }
    }

    let server = Server::start(&data);
    let all: Vec<u32> = (0..rounds).collect();
    verify(&server, &mut ledger, &mut rng, &all);
    eprintln!(
        "{rounds} rounds: {} batches acknowledged and kept, {} gone (deleted or lost in flight); \
         at the kills: {outcomes:?}",
        ledger.acked.len(),
        ledger.deleted.len()
    );
    // Every row there is an acknowledged batch's (counted a round at a time).
    let mut total = 0;
    for round in 0..rounds {
        let n = server.query_json(
            DB,
            &format!(
                "SELECT count(*) AS n FROM manhole WHERE time >= '{}' AND time < '{}'",
                rfc3339(round_start(round)),
                rfc3339(round_start(round + 1))
            ),
        );
        total += n[0]["n"].as_u64().unwrap_or_default();
    }
    assert_eq!(total, ledger.acked.len() as u64 * u64::from(ROWS_PER_BATCH));
    server.stop();
}
