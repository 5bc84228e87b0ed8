//! Appends every event's JSON envelope to a local file, one per line: for debugging a
//! relay without Kafka or a bucket at hand.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use super::{Deliver, Delivered, Gathered};
use crate::envelope;

pub struct FileSink {
    pub path: PathBuf,
    pub buf: Vec<u8>,
}

impl Deliver for FileSink {
    fn deliver<'a>(
        &'a mut self,
        batch: &'a Gathered,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Delivered, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let mut done = Delivered::default();
            self.buf.clear();
            for chunk in batch.chunks() {
                let chunk = chunk.map_err(|e| e.to_string())?;
                for event in chunk.events() {
                    let (entry, seq) = event.map_err(|e| e.to_string())?;
                    envelope::write(
                        &mut self.buf,
                        entry.time,
                        chunk.tag,
                        chunk.source,
                        seq,
                        entry.record,
                    )
                    .map_err(|e| e.to_string())?;
                    self.buf.push(b'\n');
                    done.delivered(chunk.tag, entry.time);
                }
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
            f.write_all(&self.buf)
                .and_then(|_| f.sync_data())
                .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
            done.bytes = self.buf.len() as u64;
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (4 << 20, Duration::from_millis(200))
    }
}
