//! Wiring of each subcommand: turns flags into the library's types and runs them.
//! The only layer that reads flags, prints to the terminal, or decides exit codes.

pub mod agent;
pub mod ca;
pub mod ceremony;
pub mod dev_token;
pub mod request;
pub mod revoke;
pub mod serve;
pub mod state;

/// A command failure: printed as `error: ...` and exit status 1.
pub type CmdResult = Result<(), String>;

/// Log output format, for operators and log pipelines.
#[derive(Debug, Clone, Copy, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Sets up tracing on stderr (stdout stays clean for tokens and PEM). `RUST_LOG` overrides
/// the default `info` level.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // A failed write must not become a panic (the default reports it with eprintln!,
        // which panics on a full disk and kills the request mid-stream): it is reported to
        // `audit`, and the issue path refuses to hand out a certificate it could not log.
        .log_internal_errors(false)
        .with_writer(|| AuditedStderr(std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// stderr, telling [`crate::audit`] about every failed write.
struct AuditedStderr(std::io::Stderr);

impl std::io::Write for AuditedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .write(buf)
            .inspect_err(|_| crate::audit::write_failed())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().inspect_err(|_| crate::audit::write_failed())
    }
}

pub(crate) fn read_file(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

pub(crate) use crate::app::config::{check_range, MAX_LIFETIME};
