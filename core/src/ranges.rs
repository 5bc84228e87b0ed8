//! Sets of seqs as sorted, disjoint, inclusive ranges: what reconciliation keeps per
//! source instead of one entry per event. A sluice agent numbers a source's events
//! 0, 1, 2, ..., so what a destination holds of a source is usually one range, and
//! memory follows the number of sources (and gaps), not of events.

use serde::{Deserialize, Serialize};

/// Sorted, disjoint, non-adjacent inclusive ranges `[first, last]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Vec<[u64; 2]>", from = "Vec<[u64; 2]>")]
pub struct SeqRanges(Vec<[u64; 2]>);

/// Read from a manifest (not to be trusted): sorted and merged as it is read.
impl From<Vec<[u64; 2]>> for SeqRanges {
    fn from(ranges: Vec<[u64; 2]>) -> SeqRanges {
        SeqRanges::from_ranges(ranges)
    }
}

impl From<SeqRanges> for Vec<[u64; 2]> {
    fn from(r: SeqRanges) -> Vec<[u64; 2]> {
        r.0
    }
}

impl SeqRanges {
    pub fn from_ranges(ranges: impl IntoIterator<Item = [u64; 2]>) -> SeqRanges {
        let mut r = SeqRanges::default();
        for [a, b] in ranges {
            r.insert_range(a.min(b), a.max(b));
        }
        r
    }

    /// Adds `seq`; false when it was in already (a duplicate).
    pub fn insert(&mut self, seq: u64) -> bool {
        // The common case: the next seq of the source, in order.
        if let Some(last) = self.0.last_mut() {
            if last[1].checked_add(1) == Some(seq) {
                last[1] = seq;
                return true;
            }
            if seq > last[1] {
                self.0.push([seq, seq]);
                return true;
            }
        } else {
            self.0.push([seq, seq]);
            return true;
        }
        if self.contains(seq) {
            return false;
        }
        self.insert_range(seq, seq);
        true
    }

    /// Adds every seq of `[first, last]`.
    pub fn insert_range(&mut self, first: u64, last: u64) {
        // The ranges that touch [first - 1, last + 1] merge with it.
        let lo = self.0.partition_point(|r| r[1].saturating_add(1) < first);
        let hi = self.0.partition_point(|r| r[0] <= last.saturating_add(1));
        if lo >= hi {
            self.0.insert(lo, [first, last]);
            return;
        }
        let merged = [first.min(self.0[lo][0]), last.max(self.0[hi - 1][1])];
        self.0.splice(lo..hi, [merged]);
    }

    pub fn contains(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|r| r[1] < seq);
        self.0.get(i).is_some_and(|r| r[0] <= seq)
    }

    pub fn union(&mut self, other: &SeqRanges) {
        for &[a, b] in &other.0 {
            self.insert_range(a, b);
        }
    }

    /// The seqs of `self` not in `other`.
    pub fn minus(&self, other: &SeqRanges) -> SeqRanges {
        let mut out = Vec::new();
        let mut j = 0;
        for &[a, b] in &self.0 {
            // `start`: the first seq of [a, b] not decided yet.
            let mut start = a;
            while j < other.0.len() && other.0[j][1] < start {
                j += 1;
            }
            let mut k = j;
            loop {
                match other.0.get(k) {
                    Some(&[c, d]) if c <= b => {
                        if c > start {
                            out.push([start, c - 1]);
                        }
                        if d >= b {
                            break;
                        }
                        start = d + 1;
                        k += 1;
                    }
                    _ => {
                        out.push([start, b]);
                        break;
                    }
                }
            }
        }
        SeqRanges(out)
    }

    /// How many seqs.
    /// How many seqs (saturating: `[0, u64::MAX]` holds one more than a u64 counts).
    pub fn len(&self) -> u64 {
        self.0.iter().fold(0u64, |n, r| {
            n.saturating_add((r[1] - r[0]).saturating_add(1))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[[u64; 2]] {
        &self.0
    }

    pub fn first(&self) -> Option<u64> {
        self.0.first().map(|r| r[0])
    }

    pub fn last(&self) -> Option<u64> {
        self.0.last().map(|r| r[1])
    }

    /// `0-99, 150, 200-201`, at most `max` ranges then `... (n more)`.
    pub fn describe(&self, max: usize) -> String {
        let mut parts: Vec<String> = self
            .0
            .iter()
            .take(max)
            .map(|&[a, b]| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        if self.0.len() > max {
            parts.push(format!("... ({} more ranges)", self.0.len() - max));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn inserts_merge_and_report_duplicates() {
        let mut r = SeqRanges::default();
        for s in [0, 1, 2, 5, 4, 10] {
            assert!(r.insert(s));
        }
        assert!(!r.insert(4));
        assert_eq!(r.ranges(), &[[0, 2], [4, 5], [10, 10]]);
        assert!(r.insert(3));
        assert_eq!(r.ranges(), &[[0, 5], [10, 10]]);
        assert_eq!(r.len(), 7);
        assert_eq!(r.describe(1), "0-5, ... (1 more ranges)");
        let whole = SeqRanges::from_ranges([[0, u64::MAX]]);
        assert_eq!(whole.len(), u64::MAX);
        let read: SeqRanges = serde_json::from_str("[[9, 7], [0, 2], [3, 3]]").unwrap();
        assert_eq!(read.ranges(), &[[0, 3], [7, 9]]);
        let all = SeqRanges::from_ranges([[0, 20]]);
        assert_eq!(all.minus(&r).ranges(), &[[6, 9], [11, 20]]);
        assert!(r.minus(&all).is_empty());
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(a in proptest::collection::vec(0u64..200, 0..120),
                              b in proptest::collection::vec(0u64..200, 0..120)) {
            let (mut ra, mut rb) = (SeqRanges::default(), SeqRanges::default());
            let (mut sa, mut sb) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
            for &s in &a { prop_assert_eq!(ra.insert(s), sa.insert(s)); }
            for &s in &b { rb.insert_range(s, s + s % 3); for x in s..=s + s % 3 { sb.insert(x); } }
            prop_assert_eq!(ra.len(), sa.len() as u64);
            prop_assert_eq!(rb.len(), sb.len() as u64);
            let diff: Vec<u64> = sa.difference(&sb).copied().collect();
            let got: Vec<u64> = ra.minus(&rb).ranges().iter().flat_map(|r| r[0]..=r[1]).collect();
            prop_assert_eq!(got, diff);
            for w in ra.ranges().windows(2) { prop_assert!(w[0][1] + 1 < w[1][0]); }
            let mut u = ra.clone(); u.union(&rb);
            prop_assert_eq!(u.len(), sa.union(&sb).count() as u64);
        }
    }
}
