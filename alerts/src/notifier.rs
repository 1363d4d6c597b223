//! Where notifications leave the process: an HTTP POST in the server, a
//! recording in tests (which can be told to fail, to test retries).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::notify::Target;

/// Why a notification was not accepted; kept in the outbox entry and retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// No answer: the receiver is down, unreachable or too slow.
    #[error("POST {url}: {reason}")]
    Unreachable {
        /// The URL posted to.
        url: String,
        /// What the HTTP client said.
        reason: String,
    },
    /// The receiver answered with a status other than 2xx.
    #[error("POST {url}: answered {status}")]
    Rejected {
        /// The URL posted to.
        url: String,
        /// The HTTP status.
        status: u16,
    },
}

/// Sends one notification to its target.
pub trait Notifier: Send + Sync {
    /// Posts `body` to `target`; `Ok` once the receiver accepted it. Blocks until
    /// it answers or gives up: called from the delivery thread, never from an
    /// async worker.
    fn post(&self, target: &Target, body: &Value) -> Result<(), DeliveryError>;
}

/// Posts over HTTP with a client bounded in time (10 s per request).
#[derive(Debug)]
pub struct HttpNotifier {
    agent: ureq::Agent,
}

impl HttpNotifier {
    /// A poster whose statuses come back as values, not errors.
    pub fn new() -> Self {
        Self {
            agent: ureq::Agent::new_with_config(
                ureq::config::Config::builder()
                    .timeout_global(Some(Duration::from_secs(10)))
                    .http_status_as_error(false)
                    .build(),
            ),
        }
    }
}

impl Default for HttpNotifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier for HttpNotifier {
    fn post(&self, target: &Target, body: &Value) -> Result<(), DeliveryError> {
        let url = target.post_url();
        let response = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| DeliveryError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(DeliveryError::Rejected { url, status })
        }
    }
}

/// One call of [`RecordingNotifier::post`].
#[derive(Debug, Clone, PartialEq)]
pub struct Post {
    /// Where it went.
    pub target: Target,
    /// What was posted.
    pub body: Value,
    /// Whether it was accepted.
    pub accepted: bool,
}

/// Keeps every post in memory; refuses them (status 503) while failing.
#[derive(Debug, Default)]
pub struct RecordingNotifier {
    posts: Mutex<Vec<Post>>,
    failing: AtomicBool,
}

impl RecordingNotifier {
    /// Refuses posts from now on (`true`) or accepts them again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Every post so far, accepted or not, in order.
    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The accepted posts' bodies, in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.posts()
            .into_iter()
            .filter(|p| p.accepted)
            .map(|p| p.body)
            .collect()
    }
}

impl Notifier for RecordingNotifier {
    fn post(&self, target: &Target, body: &Value) -> Result<(), DeliveryError> {
        let accepted = !self.failing.load(Ordering::SeqCst);
        self.posts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Post {
                target: target.clone(),
                body: body.clone(),
                accepted,
            });
        if accepted {
            Ok(())
        } else {
            Err(DeliveryError::Rejected {
                url: target.post_url(),
                status: 503,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_the_outbox_keeps_them() {
        let refused = DeliveryError::Unreachable {
            url: "http://127.0.0.1:9/hook".into(),
            reason: "Connection refused".into(),
        };
        assert_eq!(
            refused.to_string(),
            "POST http://127.0.0.1:9/hook: Connection refused"
        );
        let rejected = DeliveryError::Rejected {
            url: "http://h/api/v2/alerts".into(),
            status: 500,
        };
        assert_eq!(
            rejected.to_string(),
            "POST http://h/api/v2/alerts: answered 500"
        );
    }

    #[test]
    fn the_recording_fails_while_told_to() {
        let n = RecordingNotifier::default();
        let t = Target::Webhook("http://h/x".into());
        n.set_failing(true);
        assert!(n.post(&t, &Value::from(1)).is_err());
        n.set_failing(false);
        assert!(n.post(&t, &Value::from(2)).is_ok());
        assert_eq!(n.posts().len(), 2);
        assert_eq!(n.accepted(), [Value::from(2)]);
    }
}
