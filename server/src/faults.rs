//! Faults on demand, for tests of what the server does while its store fails or
//! refuses a write.
//!
//! With `CITYTSDB_STORE_FAULTS=/path/to/file` set, every object-store call first
//! reads that file (missing or empty: no fault):
//!
//! - `fail`: the call fails;
//! - `delay <ms>`: the call waits that long, then runs;
//! - `fail-every <n>`: every n-th call fails, the others run;
//! - `tear`: a put is stored whole but reports a failure (its answer was lost,
//!   as when a connection drops after the store took the object; object stores
//!   never show half an object); other calls run.
//!
//! With `CITYTSDB_MQTT_WRITE_FAULTS=/path/to/file` set, every write of the MQTT
//! subscriber first reads that file ([`FaultyWrites`]), one fault a line:
//!
//! - `refuse <text>`: a body holding `<text>` is refused as a bad request is (a
//!   client's fault, HTTP 4xx), as a store that will never take it would;
//! - `busy`: every write fails as with a full write buffer (HTTP 503).
//!
//! Reading the file per call costs a system call or two; it is for tests, and
//! without the variable nothing is wrapped or read.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use citytsdb_ingest::mqtt::Sink;
use citytsdb_ingest::{IngestError, Ingestor, Outcome, WriteOptions};
use citytsdb_storage::StorageError;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// The environment variable naming the control file.
pub const FAULTS_ENV: &str = "CITYTSDB_STORE_FAULTS";

/// The environment variable naming the MQTT write faults' control file.
pub const MQTT_WRITE_FAULTS_ENV: &str = "CITYTSDB_MQTT_WRITE_FAULTS";

/// The MQTT subscriber's sink: an ingestor, refusing or failing writes as the file
/// `CITYTSDB_MQTT_WRITE_FAULTS` names says (without it, the ingestor as it is).
pub struct FaultyWrites {
    inner: Ingestor,
    control: Option<PathBuf>,
}

impl FaultyWrites {
    /// `inner`, with faults if the environment asks for them.
    pub fn from_env(inner: Ingestor) -> Self {
        let control = std::env::var_os(MQTT_WRITE_FAULTS_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(path) = &control {
            tracing::warn!(control = ?path, "MQTT write faults are injected as {MQTT_WRITE_FAULTS_ENV} says");
        }
        Self { inner, control }
    }

    /// The failure the control file asks of a write of `body`, if any.
    fn fault(&self, body: &[u8]) -> Option<IngestError> {
        let text = std::fs::read_to_string(self.control.as_ref()?).unwrap_or_default();
        text.lines()
            .find_map(|line| match line.trim().split_once(' ') {
                Some(("refuse", needle))
                    if !needle.is_empty()
                        && body.windows(needle.len()).any(|w| w == needle.as_bytes()) =>
                {
                    Some(IngestError::Storage(StorageError::InvalidInput(format!(
                        "injected refusal of a body holding '{needle}'"
                    ))))
                }
                None if line.trim() == "busy" => Some(IngestError::Storage(
                    StorageError::BufferFull("injected: busy".into()),
                )),
                _ => None,
            })
    }
}

impl Sink for FaultyWrites {
    fn write(
        &self,
        db: &str,
        body: Bytes,
        options: WriteOptions,
    ) -> impl std::future::Future<Output = std::result::Result<Outcome, IngestError>> + Send {
        let fault = self.fault(&body);
        let write = self.inner.write(db, body, options);
        async move {
            match fault {
                Some(e) => Err(e),
                None => write.await,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Fail,
    Delay(Duration),
    FailEvery(u64),
    Tear,
}

/// An object store that fails as its control file says.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    control: PathBuf,
    calls: AtomicU64,
}

impl FaultyStore {
    /// `inner`, failing as the file `control` says.
    pub fn new(inner: Arc<dyn ObjectStore>, control: PathBuf) -> Self {
        Self {
            inner,
            control,
            calls: AtomicU64::new(0),
        }
    }

    /// The store `CITYTSDB_STORE_FAULTS` asks for: `inner` wrapped, or as it is.
    pub fn from_env(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        match std::env::var_os(FAULTS_ENV).filter(|v| !v.is_empty()) {
            Some(path) => {
                tracing::warn!(control = ?path, "object-store faults are injected as {FAULTS_ENV} says");
                Arc::new(Self::new(inner, PathBuf::from(path)))
            }
            None => inner,
        }
    }

    fn fault(&self) -> Fault {
        let text = std::fs::read_to_string(&self.control).unwrap_or_default();
        let mut words = text.split_whitespace();
        let n = self.calls.fetch_add(1, Relaxed) + 1;
        match (
            words.next(),
            words.next().and_then(|w| w.parse::<u64>().ok()),
        ) {
            (Some("fail"), _) => Fault::Fail,
            (Some("delay"), Some(ms)) => Fault::Delay(Duration::from_millis(ms)),
            (Some("fail-every"), Some(every)) if every > 0 && n.is_multiple_of(every) => {
                Fault::FailEvery(every)
            }
            (Some("tear"), _) => Fault::Tear,
            _ => Fault::None,
        }
    }

    /// Waits or fails as the control file says, before a call runs.
    async fn before(&self, what: &str, location: &Path) -> Result<Fault> {
        match self.fault() {
            Fault::Fail | Fault::FailEvery(_) => Err(injected(what, location)),
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(Fault::None)
            }
            other => Ok(other),
        }
    }
}

#[derive(Debug)]
struct Injected(String);

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Injected {}

fn injected(what: &str, location: &Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "faults",
        source: Box::new(Injected(format!("injected failure of {what} {location}"))),
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        if self.before("put", location).await? == Fault::Tear {
            let _ = self.inner.put_opts(location, payload, opts).await;
            return Err(injected("put (answer lost)", location));
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.before("put", location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.before("get", location).await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.before("get", location).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        match self.fault() {
            Fault::Fail | Fault::FailEvery(_) => locations
                .map(|l| l.and_then(|l| Err(injected("delete", &l))))
                .boxed(),
            _ => self.inner.delete_stream(locations),
        }
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.fault() {
            Fault::Fail | Fault::FailEvery(_) => {
                let at = prefix.cloned().unwrap_or_default();
                futures::stream::once(async move { Err(injected("list", &at)) }).boxed()
            }
            _ => self.inner.list(prefix),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.fault() {
            Fault::Fail | Fault::FailEvery(_) => {
                let at = prefix.cloned().unwrap_or_default();
                futures::stream::once(async move { Err(injected("list", &at)) }).boxed()
            }
            _ => self.inner.list_with_offset(prefix, offset),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.before("list", &prefix.cloned().unwrap_or_default())
            .await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.before("copy", from).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.before("rename", from).await?;
        self.inner.rename_opts(from, to, options).await
    }
}
