//! The node's log output: human-readable text or one JSON object per line,
//! on stderr, filtered by `RUST_LOG` (default `info`).
//!
//! Colour codes are written only when stderr is a terminal (and `NO_COLOR`
//! is unset): `docker logs`, journald and log shippers get plain text.

use std::io::IsTerminal;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00.000000Z  INFO drl::node: member up slot=1`.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`),
    /// for log shippers.
    Json,
}

/// Whether text logs get ANSI colour codes: only on a terminal, and never
/// when `NO_COLOR` is set to anything non-empty (<https://no-color.org>).
pub fn use_colour(format: LogFormat, stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
    format == LogFormat::Text && stderr_is_terminal && no_color.is_none_or(str::is_empty)
}

/// Installs the process-wide subscriber; a second call does nothing.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let no_color = std::env::var("NO_COLOR").ok();
    let ansi = use_colour(format, std::io::stderr().is_terminal(), no_color.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_for_text_on_a_terminal_without_no_color() {
        assert!(use_colour(LogFormat::Text, true, None));
        assert!(use_colour(LogFormat::Text, true, Some("")));
        assert!(!use_colour(LogFormat::Text, false, None));
        assert!(!use_colour(LogFormat::Text, true, Some("1")));
        assert!(!use_colour(LogFormat::Json, true, None));
    }
}
