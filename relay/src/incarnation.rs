//! The relay's incarnation: a random id made when a spool is created, kept in
//! `<spool dir>/incarnation`, and part of every object key.
//!
//! Object keys are built from spool positions, and a new spool numbers its segments
//! from 0 again. Without the incarnation a relay restarted with the same `relay.id` and
//! an empty data directory — or two relays given the same id — would write keys that
//! already exist in the bucket. With it, keys from different spools never meet, and a
//! delivery repeated after a crash (same spool, same incarnation) writes the same key.

use std::path::Path;

const FILE: &str = "incarnation";

/// The incarnation of the spool in `spool_dir`, made (and synced) when there is none.
pub fn load_or_create(spool_dir: &Path) -> Result<String, String> {
    if let Some(existing) = read(spool_dir)? {
        return Ok(existing);
    }
    let id = format!("i{:016x}", rand::random::<u64>());
    let path = spool_dir.join(FILE);
    sluice_core::durable::write_atomic(&path, format!("{id}\n").as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(incarnation = %id, path = %path.display(), "new spool: new relay incarnation (part of every object key)");
    Ok(id)
}

/// The incarnation recorded in `spool_dir`, if any (what `reconcile` reads).
pub fn read(spool_dir: &Path) -> Result<Option<String>, String> {
    let path = spool_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if is_incarnation(id) {
                Ok(Some(id.to_string()))
            } else {
                Err(format!(
                    "{} does not hold a relay incarnation (\"i\" and 16 hex digits): {id:?}",
                    path.display()
                ))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// `i` followed by 16 lowercase hex digits.
pub fn is_incarnation(s: &str) -> bool {
    s.len() == 17
        && s.starts_with('i')
        && s[1..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incarnation_is_made_once_per_spool() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let first = load_or_create(a.path()).unwrap();
        assert!(is_incarnation(&first), "{first}");
        assert_eq!(load_or_create(a.path()).unwrap(), first);
        assert_eq!(read(a.path()).unwrap(), Some(first.clone()));
        assert_ne!(load_or_create(b.path()).unwrap(), first);
        std::fs::write(a.path().join(FILE), "garbage").unwrap();
        assert!(load_or_create(a.path())
            .unwrap_err()
            .contains("incarnation"));
    }
}
