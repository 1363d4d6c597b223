//! The dead-letter file: MQTT messages no write would take, kept for an operator.
//!
//! `<data-dir>/mqtt/dead-letter.jsonl` holds one JSON object a line, newest last:
//! `{"time", "db", "topic", "reason", "payload"}`, with `payload_base64` in place of
//! `payload` when the payload is not UTF-8. Lines are fsynced before their messages
//! are acknowledged to the broker, so a message leaves the broker only once it is
//! in the database or here. Past [`DEAD_LETTER_CAP`] bytes the file is moved to
//! `dead-letter.jsonl.1`, replacing the one moved there before: at most twice the
//! cap is kept.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use citytsdb_storage::files::sync_dir;
use citytsdb_storage::paths;
use citytsdb_storage::units::rfc3339;
use serde_json::{json, Value};

/// The dead-letter file is rotated once it would pass this many bytes.
pub const DEAD_LETTER_CAP: u64 = 64 << 20;

/// One message kept aside.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// When it was kept aside, Unix nanoseconds.
    pub time: i64,
    /// The database it was to be written to.
    pub db: String,
    /// Its topic.
    pub topic: String,
    /// Why no write took it.
    pub reason: String,
    /// Its payload as it came.
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// The line the file keeps: the payload as text when it is UTF-8, else in base64.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "time": rfc3339(i128::from(self.time)),
            "db": self.db,
            "topic": self.topic,
            "reason": self.reason,
        });
        match std::str::from_utf8(&self.payload) {
            Ok(text) => v["payload"] = json!(text),
            Err(_) => {
                v["payload_base64"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(&self.payload))
            }
        }
        v
    }
}

/// Appends dead letters to a bounded file.
#[derive(Debug, Clone)]
pub struct DeadLetterFile {
    path: PathBuf,
    cap: u64,
}

impl DeadLetterFile {
    /// The file `path`, rotated past `cap` bytes.
    pub fn new(path: PathBuf, cap: u64) -> Self {
        Self { path, cap }
    }

    /// Where the letters go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `letters` and fsyncs them: when this returns `Ok`, they survive a
    /// crash. Blocks on the disk: call it off the async threads.
    pub fn append(&self, letters: &[DeadLetter]) -> io::Result<()> {
        let mut text = String::new();
        for l in letters {
            text.push_str(&l.to_json().to_string());
            text.push('\n');
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let size = match fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let new_file = size == 0;
        if size > 0 && size + text.len() as u64 > self.cap {
            fs::rename(&self.path, paths::rotated_of(&self.path))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(text.as_bytes())?;
        file.sync_data()?;
        if new_file || size + text.len() as u64 > self.cap {
            // The new file's name must survive a crash as well as its lines.
            sync_dir(dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(topic: &str, payload: &[u8]) -> DeadLetter {
        DeadLetter {
            time: 1_767_225_600_000_000_000,
            db: "city".into(),
            topic: topic.into(),
            reason: "refused".into(),
            payload: payload.to_vec(),
        }
    }

    fn lines(path: &Path) -> Vec<Value> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn letters_are_appended_as_json_and_the_full_file_rotates() {
        let dir = std::env::temp_dir().join(format!(
            "citytsdb-dead-letter-{}-{}",
            std::process::id(),
            citytsdb_storage::units::now_nanos()
        ));
        let path = dir.join("mqtt").join("dead-letter.jsonl");
        let file = DeadLetterFile::new(path.clone(), 400);
        file.append(&[letter("a", b"m x=1"), letter("b", &[0xff, 0x00])])
            .unwrap();
        let got = lines(&path);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["time"], "2026-01-01T00:00:00Z");
        assert_eq!(got[0]["topic"], "a");
        assert_eq!(got[0]["db"], "city");
        assert_eq!(got[0]["reason"], "refused");
        assert_eq!(got[0]["payload"], "m x=1");
        assert_eq!(got[1]["payload_base64"], "/wA=");
        assert!(got[1].get("payload").is_none());

        // Past the cap, the file moves to `.1` (replacing it) and a new one starts:
        // the three lines so far fill 380 bytes, each new one 188.
        for topic in ["c", "d", "e"] {
            file.append(&[letter(topic, &[b'x'; 100])]).unwrap();
        }
        let topics = |path: &Path| -> Vec<String> {
            lines(path)
                .iter()
                .map(|v| v["topic"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(topics(&paths::rotated_of(&path)), ["a", "b", "c"]);
        assert_eq!(topics(&path), ["d", "e"]);
        fs::remove_dir_all(dir).unwrap();
    }
}
