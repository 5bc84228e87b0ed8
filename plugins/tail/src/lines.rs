//! Cutting a byte buffer into lines, with the over-long line rules. No allocation: the
//! caller gets index ranges into its own buffer.

use crate::LongLines;

/// Per-file state that must survive between reads.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LineState {
    /// Dropping the rest of a line cut by [`LongLines::Truncate`] until its newline.
    skipping: bool,
    /// Inside a line being handed out in pieces by [`LongLines::Split`].
    splitting: bool,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LineCounts {
    pub lines_split: u64,
    pub lines_truncated: u64,
    pub bytes_skipped: u64,
}

/// One piece to hand out: `buf[start..content_end]` is the text, `end` is the index
/// just after what it consumed (its newline, if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub start: usize,
    pub content_end: usize,
    pub end: usize,
    pub truncated: bool,
}

#[derive(Debug)]
pub(crate) struct LineCutter {
    pub max: usize,
    pub long_lines: LongLines,
}

impl LineCutter {
    /// Hands out every complete line (and every piece of an over-long one) at the start of
    /// `buf`, and returns how many bytes were consumed. The unconsumed rest is an
    /// incomplete line of at most `max + 1` bytes: it is kept for the next read.
    pub fn cut(
        &self,
        buf: &[u8],
        st: &mut LineState,
        counts: &mut LineCounts,
        emit: &mut dyn FnMut(Piece),
    ) -> usize {
        let max = self.max;
        let mut pos = 0;
        while pos < buf.len() {
            if st.skipping {
                match find_newline(&buf[pos..]) {
                    Some(i) => {
                        counts.bytes_skipped += i as u64 + 1;
                        pos += i + 1;
                        st.skipping = false;
                        continue;
                    }
                    None => {
                        counts.bytes_skipped += (buf.len() - pos) as u64;
                        return buf.len();
                    }
                }
            }
            // The newline of a line that fits is within max + 2 bytes ("\r\n").
            let window = &buf[pos..buf.len().min(pos + max + 2)];
            if let Some(i) = find_newline(window) {
                let nl = pos + i;
                let content_end = if nl > pos && buf[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                if content_end - pos <= max {
                    emit(Piece {
                        start: pos,
                        content_end,
                        end: nl + 1,
                        truncated: st.splitting,
                    });
                    st.splitting = false;
                    pos = nl + 1;
                    continue;
                }
            } else if window.len() < max + 2 {
                // Incomplete and not yet known to be too long: wait for more bytes.
                return pos;
            }
            // Too long. The rest after the piece holds at least one byte of the line
            // besides its newline, so no empty piece is ever handed out.
            emit(Piece {
                start: pos,
                content_end: pos + max,
                end: pos + max,
                truncated: true,
            });
            match self.long_lines {
                LongLines::Split => {
                    if !st.splitting {
                        counts.lines_split += 1;
                    }
                    st.splitting = true;
                }
                LongLines::Truncate => {
                    counts.lines_truncated += 1;
                    st.skipping = true;
                }
            }
            pos += max;
        }
        pos
    }

    /// Hands out `buf`, an incomplete last line that waited long enough, as if it had
    /// its newline (in pieces of at most `max` bytes). Nothing is stripped: a trailing
    /// `'\r'` stays, the newline may still come and then ends an empty line.
    pub fn flush(
        &self,
        buf: &[u8],
        st: &mut LineState,
        counts: &mut LineCounts,
        emit: &mut dyn FnMut(Piece),
    ) {
        if st.skipping {
            counts.bytes_skipped += buf.len() as u64;
            return;
        }
        let mut pos = 0;
        while pos < buf.len() {
            let end = buf.len().min(pos + self.max);
            let more = end < buf.len();
            if more && !st.splitting {
                counts.lines_split += 1;
            }
            emit(Piece {
                start: pos,
                content_end: end,
                end,
                truncated: more || st.splitting,
            });
            st.splitting = more;
            pos = end;
        }
        st.splitting = false;
    }
}

fn find_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: usize, mode: LongLines, chunks: &[&[u8]]) -> (Vec<(String, bool)>, LineCounts) {
        let cutter = LineCutter {
            max,
            long_lines: mode,
        };
        let mut st = LineState::default();
        let mut counts = LineCounts::default();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            let n = cutter.cut(&buf, &mut st, &mut counts, &mut |p| {
                out.push((
                    String::from_utf8_lossy(&buf[p.start..p.content_end]).into_owned(),
                    p.truncated,
                ))
            });
            buf.drain(..n);
            assert!(buf.len() <= max + 1);
        }
        (out, counts)
    }

    #[test]
    fn lines_and_crlf() {
        let (out, _) = run(10, LongLines::Split, &[b"a\r\nbb\n\ncc", b"c\n"]);
        let texts: Vec<_> = out.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(texts, ["a", "bb", "", "ccc"]);
    }

    #[test]
    fn exactly_max_fits_even_with_crlf() {
        let (out, counts) = run(3, LongLines::Split, &[b"abc\r\nabc\n"]);
        assert_eq!(out, [("abc".into(), false), ("abc".into(), false)]);
        assert_eq!(counts.lines_split, 0);
    }

    #[test]
    fn split_long_lines_across_reads() {
        let (out, counts) = run(3, LongLines::Split, &[b"abcd", b"efgh", b"ij\nxy\n"]);
        let want: Vec<(String, bool)> = vec![
            ("abc".into(), true),
            ("def".into(), true),
            ("ghi".into(), true),
            ("j".into(), true),
            ("xy".into(), false),
        ];
        assert_eq!(out, want);
        assert_eq!(counts.lines_split, 1);
    }

    #[test]
    fn split_multiple_of_max_has_no_empty_piece() {
        let (out, _) = run(2, LongLines::Split, &[b"abcd\n"]);
        assert_eq!(out, [("ab".into(), true), ("cd".into(), true)]);
    }

    #[test]
    fn truncate_skips_rest_and_counts() {
        let (out, counts) = run(3, LongLines::Truncate, &[b"abcdef", b"ghij\nok\n"]);
        assert_eq!(out, [("abc".into(), true), ("ok".into(), false)]);
        assert_eq!(counts.lines_truncated, 1);
        assert_eq!(counts.bytes_skipped, 8); // "defghij\n"
    }
}
