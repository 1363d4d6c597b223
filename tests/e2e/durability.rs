//! An acknowledged write survives `kill -9`.
//!
//! Five rounds on one data directory. In each, four threads write distinct
//! batches at once (so the server's group commit combines them into shared
//! fsyncs) and record which batches were answered 204; the server is then
//! SIGKILLed at a random moment while writes are in flight (in one round right
//! after a flush, so rows sit in segments and the WAL at once). After every
//! restart every acknowledged batch of every round so far must be there, whole,
//! with its values. A batch that was in flight may be there or not, but never in
//! part, and once seen it must stay.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use citytsdb_tests::oracle::same_value;
use citytsdb_tests::workload::{device_name, rfc3339, round_to, XorShift, DAY, DEFAULT_START};
use citytsdb_tests::{Client, Server};

const DB: &str = "city";
const ROUNDS: u32 = 5;
const WRITERS: u32 = 4;
const ROWS_PER_BATCH: u32 = 250;
/// The round whose kill comes right after a flush.
const FLUSH_ROUND: u32 = 2;
/// Acknowledged batches to wait for before the kill is armed.
const ACKS_BEFORE_KILL: usize = 12;

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
    for seq in 0.. {
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

/// Checks every round so far after a restart; batches found that were unsure
/// become required from now on.
fn verify(server: &Server, ledger: &mut Ledger, rounds: u32, rng: &mut XorShift) {
    for round in 0..rounds {
        let sql = format!(
            "SELECT time, count(*) AS n FROM manhole WHERE time >= '{}' AND time < '{}' GROUP BY time",
            rfc3339(round_start(round)),
            rfc3339(round_start(round + 1))
        );
        let found: BTreeMap<String, u64> = server
            .query_json(DB, &sql)
            .into_iter()
            .map(|row| {
                let time = row["time"]
                    .as_str()
                    .unwrap_or_else(|| panic!("time in {row:?}"))
                    .to_string();
                let n = row["n"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("count in {row:?}"));
                (time, n)
            })
            .collect();
        let in_round = |b: &&Batch| b.round == round;
        let mut missing = Vec::new();
        for batch in ledger.acked.iter().filter(in_round) {
            match found.get(&rfc3339(batch.time())) {
                Some(&n) if n == u64::from(ROWS_PER_BATCH) => {}
                other => missing.push(format!("{batch:?} has {other:?} rows")),
            }
        }
        if !missing.is_empty() {
            server.fail(&format!(
                "round {round}: {} acknowledged batches lost rows after kill -9 (of {} acknowledged): {}",
                missing.len(),
                ledger.acked.iter().filter(in_round).count(),
                missing.iter().take(10).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
        let known: BTreeMap<String, Batch> = ledger
            .acked
            .iter()
            .chain(&ledger.unsure)
            .filter(in_round)
            .map(|b| (rfc3339(b.time()), *b))
            .collect();
        for (time, n) in &found {
            let Some(batch) = known.get(time) else {
                server.fail(&format!(
                    "round {round}: rows at {time} that no writer sent"
                ));
            };
            if *n != u64::from(ROWS_PER_BATCH) {
                server.fail(&format!(
                    "{batch:?} is partly there: {n} of {ROWS_PER_BATCH} rows"
                ));
            }
            if ledger.unsure.remove(batch) {
                ledger.acked.insert(*batch);
            }
        }
        // An in-flight batch not replayed now is lost for good: seeing it later
        // would be a resurrection.
        ledger.unsure.retain(|b| b.round != round);

        // Spot values: whole rows of a few acknowledged batches.
        let acked: Vec<Batch> = ledger.acked.iter().filter(in_round).copied().collect();
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
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut ledger = Ledger::default();
    let mut rng = XorShift::new(2025);

    for round in 0..ROUNDS {
        let server = Server::start(&data);
        verify(&server, &mut ledger, round, &mut rng);

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
                if Instant::now() > deadline || threads.iter().all(|t| t.is_finished()) {
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
        if round == FLUSH_ROUND {
            server.flush(DB);
            wait_for_acks(acks.load(Ordering::SeqCst) + WRITERS as usize);
        }
        thread::sleep(Duration::from_millis(rng.below(400)));
        let acked_before_kill = acks.load(Ordering::SeqCst);
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().expect("writer thread");
        }
        let round_ledger = std::mem::take(&mut *shared.lock().expect("ledger"));
        assert!(round_ledger.acked.len() >= acked_before_kill);
        ledger.acked.extend(round_ledger.acked);
        ledger.unsure.extend(round_ledger.unsure);
    }

    let server = Server::start(&data);
    verify(&server, &mut ledger, ROUNDS, &mut rng);
    let total = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(
        total[0]["n"].as_u64(),
        Some(ledger.acked.len() as u64 * u64::from(ROWS_PER_BATCH))
    );
    server.stop();
}
