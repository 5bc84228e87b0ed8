//! `type = "file"`: appends every event's JSON envelope to a local file, one per line,
//! for debugging a relay without Kafka or a bucket at hand.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::readback::Found;
use crate::sinks::spec::{
    Deliver, DeliverError, DeliverFuture, Delivered, Gathered, ReadBackContext, SinkContext,
    SinkSpec,
};

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    /// The file the envelopes are appended to (created if missing).
    pub path: PathBuf,
}

impl SinkSpec for FileSink {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn build(&self, _ctx: &SinkContext<'_>) -> Result<Box<dyn Deliver>, String> {
        Ok(Box::new(FileWriter {
            path: self.path.clone(),
            buf: Vec::new(),
        }))
    }

    fn read_back<'a>(
        &'a self,
        _ctx: &'a ReadBackContext<'a>,
    ) -> BoxFuture<'a, Result<Option<Found>, String>> {
        Box::pin(async move {
            let mut found = Found::default();
            let text =
                std::fs::read(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
            found.add_ndjson(&text);
            Ok(Some(found))
        })
    }
}

pub struct FileWriter {
    path: PathBuf,
    buf: Vec<u8>,
}

impl FileWriter {
    fn io_error(&self, what: &str, e: std::io::Error) -> DeliverError {
        let message = format!("cannot {what} {}: {e}", self.path.display());
        match e.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound => {
                DeliverError::Permanent(message)
            }
            _ => DeliverError::Transient(message),
        }
    }
}

impl Deliver for FileWriter {
    fn deliver<'a>(&'a mut self, batch: &'a Gathered) -> DeliverFuture<'a> {
        Box::pin(async move {
            let mut done = Delivered::default();
            self.buf.clear();
            for chunk in batch.chunks() {
                let chunk = chunk?;
                for event in chunk.events() {
                    let (entry, mark) = event?;
                    chunk.write_envelope_line(&mut self.buf, &entry, mark)?;
                    done.delivered(chunk.tag, entry.time);
                }
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| self.io_error("open", e))?;
            f.write_all(&self.buf)
                .and_then(|_| f.sync_data())
                .map_err(|e| self.io_error("write", e))?;
            done.bytes = self.buf.len() as u64;
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (4 << 20, Duration::from_millis(200))
    }
}
