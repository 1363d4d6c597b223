//! Object stores from URLs: `file:///path`, `memory://`, `s3://bucket/prefix`.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

use crate::error::{Error, Result};

/// Opens the object store a `--store` URL names. S3 credentials, region and endpoint
/// come from the usual `AWS_*` environment variables, so MinIO and OSS work too.
pub fn open(url: &str) -> Result<Arc<dyn ObjectStore>> {
    let fail = |message: String| Error::Store {
        url: url.to_string(),
        message,
    };
    let parsed = url::Url::parse(url).map_err(|e| fail(e.to_string()))?;
    match parsed.scheme() {
        "memory" => Ok(Arc::new(InMemory::new())),
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|_| fail("not an absolute file path".into()))?;
            std::fs::create_dir_all(&path)
                .map_err(|e| fail(format!("creating {}: {e}", path.display())))?;
            let fs = LocalFileSystem::new_with_prefix(&path).map_err(|e| fail(e.to_string()))?;
            Ok(Arc::new(fs.with_automatic_cleanup(true)))
        }
        "s3" => {
            let bucket = parsed.host_str().ok_or_else(|| fail("no bucket".into()))?;
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let prefix = parsed.path().trim_matches('/');
            if prefix.is_empty() {
                Ok(Arc::new(s3))
            } else {
                Ok(Arc::new(PrefixStore::new(s3, prefix.to_string())))
            }
        }
        other => Err(fail(format!(
            "unknown scheme '{other}' (use file://, memory:// or s3://)"
        ))),
    }
}

/// The directory of a `file://` store, if `url` names one.
pub fn local_dir(url: &str) -> Option<std::path::PathBuf> {
    let parsed = url::Url::parse(url).ok()?;
    (parsed.scheme() == "file")
        .then(|| parsed.to_file_path().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(open("memory://").is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(open(&format!("file://{}/s", dir.path().display())).is_ok());
        assert!(open("ftp://x")
            .unwrap_err()
            .to_string()
            .contains("unknown scheme"));
        assert!(open("nonsense").is_err());
    }
}
