//! Replacing a small state file so that a crash at any moment leaves either the old or
//! the new content, never a mix.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically and durably:
///
/// 1. write a sibling temp file and `fsync` it: the new content is on disk before any
///    name points at it;
/// 2. `rename` over the target: atomic on POSIX, so readers (and a restart after a crash
///    here) see the old or the new file, whole;
/// 3. `fsync` the directory: the rename itself survives a power loss.
///
/// The temp name is unique per call (process id and a counter), so two writers of the
/// same file (a periodic save and the final one at shutdown) cannot rename each other's
/// half-written temp file away. A crash between 1 and 2 leaves a stray `.tmp` file; a
/// failed write (a full disk) removes its own.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        super::write_atomic(&p, b"one").unwrap();
        super::write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"], "no temp file left behind");
    }
}
