//! `type = "tail"`: follows the files that match globs, rotation-safe, through the
//! `sluice-tail` crate, with a checkpoint per file that moves only on acknowledgement.

use std::cell::Cell;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sluice_core::units::{ByteSize, Span};
use sluice_parsers::ParserKind;
use sluice_tail::{LongLines, StartAt, TailConfig, Tailer};

use crate::inputs::spec::InputSpec;
use crate::metrics::{AgentMetrics, InputLabel};
use crate::pipeline::{Input, ReadRate};
use crate::source::{FileCheckpoint, Line, Source, SourceError, SourceId, SourceStats};
use crate::transform::Transforms;

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TailInput {
    /// Unique input name; part of every source id and checkpoint.
    pub name: String,
    /// Forward tag of the events.
    pub tag: String,
    /// Glob patterns of files to read.
    pub include: Vec<String>,
    /// Glob patterns of paths to leave alone even if `include` matches them.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Where to start in files found at the first start: "beginning" or "end".
    #[serde(default = "default_start_at")]
    pub start_at: StartAt,
    /// Longest line; longer lines are split (default) or truncated.
    #[serde(default = "default_max_line")]
    pub max_line: ByteSize,
    /// What to do with a line longer than `max_line`.
    #[serde(default = "default_long_lines")]
    pub long_lines: LongLines,
    /// A last line without newline is sent after this long.
    #[serde(default = "default_partial_timeout")]
    pub partial_line_timeout: Span,
    /// Bytes that deleted-but-unread files may hold open before the alarm.
    #[serde(default = "default_max_deleted")]
    pub max_deleted: ByteSize,
    /// How each line becomes a record: none (raw `message`), json, regex, nginx, apache,
    /// syslog_rfc3164, syslog_rfc5424, cri (Kubernetes container logs). Lines that do not
    /// parse are sent raw with a `parse_error` field and counted, never dropped.
    #[serde(default)]
    pub parser: ParserKind,
    /// The pattern of `parser = "regex"`; its named groups become the fields.
    #[serde(default)]
    pub regex: Option<String>,
    /// The record field that holds the event time. Unset: nginx, apache, syslog and cri
    /// use their `time` field, the other parsers the time the line was read. "" always
    /// uses the read time.
    #[serde(default)]
    pub time_key: Option<String>,
    /// How `time_key` is written: "auto" (default: a number is epoch seconds, a string
    /// RFC 3339), "rfc3339", "epoch", "epoch_ms", or a strftime pattern such as
    /// "%Y-%m-%d %H:%M:%S%.f%z". Times without a zone are UTC.
    #[serde(default)]
    pub time_format: Option<String>,
    /// The zone of times written without one: "UTC" (default), "local" (the host's,
    /// daylight saving included) or an offset such as "+02:00".
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Join the lines of one event (a stack trace) into one record before parsing.
    #[serde(default)]
    pub multiline: Option<MultilineConfig>,
    /// Read at most this many bytes per second from this input's files (all together).
    /// Default: no limit.
    #[serde(default)]
    pub max_read_rate: Option<ByteSize>,
}

/// `multiline = { start = "^\\d{4}-", timeout = "1s", max_bytes = "1 MiB" }`
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MultilineConfig {
    /// A regex matching the first line of every event; other lines continue the open one.
    pub start: String,
    /// The open event is sent when no line came for this long.
    #[serde(default = "default_multiline_timeout")]
    pub timeout: Span,
    /// An event is cut (and the rest starts a new one) at this size.
    #[serde(default = "default_multiline_max")]
    pub max_bytes: ByteSize,
}

fn default_multiline_timeout() -> Span {
    Span::secs(1)
}
fn default_multiline_max() -> ByteSize {
    ByteSize::mib(1)
}

impl TailInput {
    /// The parser of this input, with its event time field.
    pub fn build_parser(&self) -> Result<sluice_parsers::Parser, sluice_parsers::ParserError> {
        sluice_parsers::Parser::new(self.parser, self.regex.as_deref())?.with_time(
            self.time_key.as_deref(),
            self.time_format.as_deref(),
            self.time_zone.as_deref(),
        )
    }
}

impl MultilineConfig {
    pub fn build(&self) -> Result<sluice_parsers::Multiline, sluice_parsers::ParserError> {
        sluice_parsers::Multiline::new(&self.start, self.timeout.get(), self.max_bytes.as_usize())
    }
}

// The tailer's defaults are declared once, in `TailConfig::default()`.
fn default_start_at() -> StartAt {
    TailConfig::default().start_at
}
fn default_max_line() -> ByteSize {
    ByteSize(TailConfig::default().max_line_bytes as u64)
}
fn default_long_lines() -> LongLines {
    TailConfig::default().long_lines
}
fn default_partial_timeout() -> Span {
    Span(TailConfig::default().partial_line_timeout)
}
fn default_max_deleted() -> ByteSize {
    ByteSize(TailConfig::default().max_deleted_bytes)
}

impl InputSpec for TailInput {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), String> {
        if self.include.is_empty() {
            return Err(format!(
                "input {:?}: include is empty; list the files to read as glob patterns",
                self.name
            ));
        }
        for pattern in self.include.iter().chain(&self.exclude) {
            glob::Pattern::new(pattern).map_err(|e| {
                format!(
                    "input {:?}: {pattern:?} is not a valid glob pattern: {e}",
                    self.name
                )
            })?;
        }
        if self.tag.is_empty() {
            return Err(format!("input {:?}: tag must not be empty", self.name));
        }
        if [sluice_forward::REPORT_TAG, sluice_forward::PROBE_TAG].contains(&self.tag.as_str()) {
            return Err(format!(
                "input {:?}: tag {:?} is reserved for sluice's own messages (a relay takes it as one, not as log events): choose another",
                self.name, self.tag
            ));
        }
        self.build_parser()
            .map_err(|e| format!("input {:?}: {e}", self.name))?;
        if let Some(m) = &self.multiline {
            m.build()
                .map_err(|e| format!("input {:?}: multiline.start: {e}", self.name))?;
        }
        if self.max_read_rate.is_some_and(|r| r.as_u64() < 1024) {
            return Err(format!(
                "input {:?}: max_read_rate must be at least 1 KiB (per second)",
                self.name
            ));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        // validate() built the parser already: this cannot fail here.
        let time = match self
            .build_parser()
            .ok()
            .as_ref()
            .and_then(|p| p.time_field())
        {
            Some(f) => format!(
                "field {:?} as {:?}, zone {:?}",
                f.key(),
                f.format(),
                f.zone()
            ),
            None => "when read".to_string(),
        };
        format!(
            "tail {:?} as tag {:?}, start at {:?}, parser {:?}, event time {time}",
            self.include, self.tag, self.start_at, self.parser
        )
    }

    fn build(&self, saved: &[FileCheckpoint], metrics: &AgentMetrics) -> anyhow::Result<Input> {
        let cfg = TailConfig {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            start_at: self.start_at,
            max_line_bytes: self.max_line.as_usize(),
            long_lines: self.long_lines,
            partial_line_timeout: self.partial_line_timeout.get(),
            max_deleted_bytes: self.max_deleted.as_u64(),
            ..TailConfig::default()
        };
        let mine: Vec<_> = saved
            .iter()
            .filter(|c| c.input == self.name)
            .cloned()
            .collect();
        let tailer = Tailer::new(&self.name, cfg, &mine)
            .with_context(|| format!("input {:?}", self.name))?;
        let label = InputLabel {
            input: self.name.clone(),
        };
        let transforms = Transforms {
            parser: self
                .build_parser()
                .with_context(|| format!("input {:?}", self.name))?,
            multiline: self
                .multiline
                .as_ref()
                .map(|m| m.build())
                .transpose()
                .with_context(|| format!("input {:?}: multiline", self.name))?,
            parse_errors: metrics.parse_errors.get_or_create(&label).clone(),
            time_errors: metrics.time_errors.get_or_create(&label).clone(),
            time_warned: Cell::new(None),
        };
        Ok(Input {
            tag: self.tag.clone(),
            source: Box::new(TailSource(tailer)),
            transforms,
            rate: self.max_read_rate.map(|r| ReadRate::new(r.as_u64())),
        })
    }
}

/// The tailer as the pipeline's [`Source`].
struct TailSource(Tailer);

impl Source for TailSource {
    fn discover(&mut self) -> Result<(), SourceError> {
        Ok(self.0.discover()?)
    }

    fn poll(
        &mut self,
        max_bytes: usize,
        out: &mut dyn FnMut(Line<'_>),
    ) -> Result<usize, SourceError> {
        Ok(self.0.poll(max_bytes, out)?)
    }

    fn commit(&mut self, source: &SourceId, end: u64, next_seq: u64) {
        self.0.commit_seq(source, end, Some(next_seq))
    }

    fn followed(&self, f: &mut dyn FnMut(&SourceId)) {
        self.0.followed(f)
    }

    fn checkpoints(&self) -> Vec<FileCheckpoint> {
        self.0.checkpoints()
    }

    fn stats(&self) -> SourceStats {
        self.0.stats()
    }
}
