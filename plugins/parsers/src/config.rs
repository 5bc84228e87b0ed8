//! What an input configures about its parser, and why a configuration is refused.

/// Which parser an input uses (`parser = "..."` in the agent config).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ParserKind {
    /// The whole line as `message`.
    #[default]
    None,
    /// A JSON object per line.
    Json,
    /// Named capture groups of a regular expression (`regex = "..."`).
    Regex,
    /// nginx `combined` (and `common`) access log format.
    Nginx,
    /// Apache `combined` (and `common`) access log format.
    Apache,
    /// BSD syslog, RFC 3164 (`<pri>` optional, as in files written by syslog daemons).
    SyslogRfc3164,
    /// IETF syslog, RFC 5424.
    SyslogRfc5424,
    /// Kubernetes container logs as containerd and CRI-O write them
    /// (`<time> <stream> <logtag> <message>`); a partial line (`logtag` P) is a record of
    /// its own.
    Cri,
}

/// A parser that cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ParserError {
    #[error("parser \"regex\" needs a pattern: set regex = \"(?P<field>...)...\" on the input")]
    MissingPattern,
    #[error("a regex is only used with parser = \"regex\" (this input uses {0:?})")]
    UnusedPattern(ParserKind),
    #[error("invalid regex: {0}")]
    BadPattern(#[from] regex::Error),
    #[error("the regex has no named capture group (?P<name>...), so it would produce no fields")]
    NoNamedGroups,
    #[error("time_format {0:?}: {1}")]
    BadTimeFormat(String, &'static str),
    #[error("time_zone {0:?}: use UTC, local or an offset such as +02:00 or -0530")]
    BadTimeZone(String),
    #[error("time_format is set but time_key is not: name the record field that holds the time (parser {0:?} has no default)")]
    TimeFormatWithoutKey(ParserKind),
}
