//! Content fingerprint that guards device + inode identity against inode reuse.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// How many leading bytes of a file a full fingerprint covers.
pub const FINGERPRINT_BYTES: usize = 256;

/// CRC-32 of a file's first `len` bytes (`len` ≤ [`FINGERPRINT_BYTES`]).
///
/// A file shorter than [`FINGERPRINT_BYTES`] gets a fingerprint of what it has; it is
/// compared on the same length later, so a short file that grows keeps its identity
/// (and the fingerprint is then extended). `len == 0` means "no bytes yet": it matches
/// every file.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Fingerprint {
    pub len: u32,
    pub crc: u32,
}

impl Fingerprint {
    /// The fingerprint of `head`, the first bytes of a file.
    pub fn of(head: &[u8]) -> Fingerprint {
        let head = &head[..head.len().min(FINGERPRINT_BYTES)];
        Fingerprint {
            len: head.len() as u32,
            crc: crc32fast::hash(head),
        }
    }

    /// Whether the file whose first bytes are `head` starts with the bytes this
    /// fingerprint was taken from.
    pub fn matches(&self, head: &[u8]) -> bool {
        let len = self.len as usize;
        head.len() >= len && crc32fast::hash(&head[..len]) == self.crc
    }

    /// No bytes covered yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Covers as much as a fingerprint ever will.
    pub fn is_full(&self) -> bool {
        self.len as usize >= FINGERPRINT_BYTES
    }
}

/// Reads up to [`FINGERPRINT_BYTES`] from the start of `file` (without moving any cursor).
pub(crate) fn read_head(file: &File, buf: &mut [u8; FINGERPRINT_BYTES]) -> io::Result<usize> {
    read_full_at(file, buf, 0)
}

/// Fills `buf` from offset `at` of `file` as far as the file goes (without moving any
/// cursor); returns how many bytes it holds.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], at + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_file_that_grows_keeps_matching() {
        let short = Fingerprint::of(b"abc");
        assert_eq!(short.len, 3);
        assert!(short.matches(b"abcdef"));
        assert!(!short.matches(b"ab"));
        assert!(!short.matches(b"xbcdef"));
        assert!(Fingerprint::default().matches(b""));
    }

    #[test]
    fn covers_at_most_the_first_bytes() {
        let long = vec![7u8; 1000];
        let fp = Fingerprint::of(&long);
        assert!(fp.is_full());
        let mut other = long.clone();
        other[900] = 0;
        assert!(fp.matches(&other));
    }
}
