//! Object stores from URLs: `file:///path`, `memory://`, `s3://bucket/prefix`.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

/// Opens the object store a `--store` URL names. S3 credentials, region and endpoint
/// come from the usual `AWS_*` environment variables, so MinIO and OSS work too.
pub fn open(url: &str) -> Result<Arc<dyn ObjectStore>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("store '{url}': {e}"))?;
    match parsed.scheme() {
        "memory" => Ok(Arc::new(InMemory::new())),
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|_| format!("store '{url}': not an absolute file path"))?;
            std::fs::create_dir_all(&path).map_err(|e| format!("store {}: {e}", path.display()))?;
            let fs = LocalFileSystem::new_with_prefix(&path)
                .map_err(|e| format!("store {}: {e}", path.display()))?;
            Ok(Arc::new(fs.with_automatic_cleanup(true)))
        }
        "s3" => {
            let bucket = parsed
                .host_str()
                .ok_or_else(|| format!("store '{url}': no bucket"))?;
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| format!("store '{url}': {e}"))?;
            let prefix = parsed.path().trim_matches('/');
            if prefix.is_empty() {
                Ok(Arc::new(s3))
            } else {
                Ok(Arc::new(PrefixStore::new(s3, prefix.to_string())))
            }
        }
        other => Err(format!(
            "store '{url}': unknown scheme '{other}' (use file://, memory:// or s3://)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(open("memory://").is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(open(&format!("file://{}/s", dir.path().display())).is_ok());
        assert!(open("ftp://x").unwrap_err().contains("unknown scheme"));
        assert!(open("nonsense").is_err());
    }
}
