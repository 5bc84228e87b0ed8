//! How much one connection's decoder may buffer, inflate and nest: the numbers every
//! other module checks untrusted input against.

/// How deeply arrays and maps may nest inside one record (the record map is level 1).
pub const MAX_DEPTH: usize = 64;

/// Size limits for one connection's decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, in bytes as it is on the wire.
    pub max_frame_bytes: usize,
    /// Largest gunzipped entries of one CompressedPackedForward frame.
    pub max_decompressed_bytes: usize,
}

impl Default for Limits {
    /// 16 MiB frames, 64 MiB decompressed.
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
        }
    }
}
