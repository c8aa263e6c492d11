//! This tier's own API key for its upstream platform (or a peer region), sent as
//! `authorization: Bearer <key>` on every tier call. From config (`credential`, usually
//! `${VAR}`) or from a file (`credential_file`, a mounted Secret), which is re-read when it
//! changes so a rotated key is picked up without a restart.

use std::path::Path;
use std::sync::Arc;

use strata_core::StrataError;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

use crate::reloading::Reloading;

type Header = MetadataValue<Ascii>;

/// The key attached to every upstream call; clones share it.
#[derive(Clone, Default)]
pub struct Credential {
    source: Option<Arc<Source>>,
}

enum Source {
    Fixed(Header),
    File(Reloading<Header>),
}

impl Credential {
    /// From the config's `credential` / `credential_file` (the file wins); `field` names the
    /// config section in errors. A file that cannot be read at start is an error: a tier
    /// that would be refused by its platform should not start as if it were fine.
    pub fn new(key: Option<&str>, file: Option<&Path>, field: &str) -> Result<Self, StrataError> {
        let source = match (file, key) {
            (Some(path), _) => {
                let owned = path.to_path_buf();
                let reloading = Reloading::new(
                    vec![path.to_path_buf()],
                    "upstream credential file changed: using the new key",
                    // Mid-rotation (the file being replaced) or removed: keep the last good
                    // key rather than send none.
                    "keeping the previous upstream credential",
                    move || read(&owned),
                )
                .map_err(|m| StrataError::Config(format!("{field}.credential_file: {m}")))?;
                Some(Source::File(reloading))
            }
            (None, Some(key)) => {
                Some(Source::Fixed(header(key).map_err(|m| StrataError::Config(format!("{field}.credential: {m}")))?))
            }
            (None, None) => None,
        };
        Ok(Self { source: source.map(Arc::new) })
    }

    /// The header value to send now, if any.
    pub(crate) fn current(&self) -> Option<Header> {
        match self.source.as_deref()? {
            Source::Fixed(header) => Some(header.clone()),
            Source::File(reloading) => Some((*reloading.current()).clone()),
        }
    }
}

impl Interceptor for Credential {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = self.current() {
            request.metadata_mut().insert("authorization", header);
        }
        Ok(request)
    }
}

fn read(path: &Path) -> Result<Header, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    header(text.trim()).map_err(|m| format!("{}: {m}", path.display()))
}

fn header(key: &str) -> Result<Header, String> {
    let key = key.trim();
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the key must be printable ASCII without spaces (as `strata keygen` prints it)".into());
    }
    format!("Bearer {key}")
        .parse()
        .map_err(|_| "the key must be printable ASCII (as `strata keygen` prints it)".to_string())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::reloading::RECHECK;

    fn sent(credential: &Credential) -> Option<String> {
        let mut c = credential.clone();
        let request = c.call(tonic::Request::new(())).expect("never refuses");
        request.metadata().get("authorization").map(|v| v.to_str().expect("ascii").to_string())
    }

    #[test]
    fn a_key_file_is_reread_when_it_changes_and_kept_when_it_breaks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "strata_first\n").expect("write");
        let credential = Credential::new(None, Some(&path), "upstream").expect("readable");
        assert_eq!(sent(&credential).as_deref(), Some("Bearer strata_first"));
        std::fs::write(&path, "strata_second").expect("write");
        // Force a different mtime even on coarse file systems.
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(later)).expect("touch");
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(sent(&credential).as_deref(), Some("Bearer strata_second"));
        std::fs::remove_file(&path).expect("remove");
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(sent(&credential).as_deref(), Some("Bearer strata_second"), "kept while the file is gone");
    }

    #[test]
    fn bad_keys_are_config_errors_naming_the_field() {
        let err = Credential::new(Some("  "), None, "upstream").err().expect("empty");
        assert!(err.to_string().contains("upstream.credential: the key is empty"), "{err}");
        let err = Credential::new(Some("k\u{e9}y"), None, "peers[0]").err().expect("non-ascii");
        assert!(err.to_string().contains("peers[0].credential"), "{err}");
        let err = Credential::new(None, Some(Path::new("/nonexistent/key")), "upstream").err().expect("missing");
        assert!(err.to_string().contains("upstream.credential_file: cannot read /nonexistent/key"), "{err}");
        assert_eq!(sent(&Credential::default()), None);
    }
}
