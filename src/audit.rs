//! Whether audit lines reach their destination.
//!
//! Every certificate citadel hands out is announced by one `citadel::audit` log line. Like
//! Vault with no working audit device, citadel refuses to hand out a certificate whose audit
//! line could not be written (the caller gets Unavailable and retries), rather than sign in
//! silence; `citadel_audit_write_failures` counts the lines lost.
//!
//! The log writer (installed by the binary) reports each failed write here. Writes happen
//! synchronously on the thread that logs, so the issue path can ask, right after logging its
//! line, whether that very write failed on this thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static FAILED: Cell<bool> = const { Cell::new(false) };
}

static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Called by the log writer when a write failed (disk full, closed pipe).
pub fn write_failed() {
    FAILED.with(|f| f.set(true));
    FAILURES.fetch_add(1, Ordering::Relaxed);
}

/// Clears this thread's flag; call just before logging the line to check.
pub fn begin() {
    FAILED.with(|f| f.set(false));
}

/// Whether a log write on this thread failed since [`begin`].
pub fn failed() -> bool {
    FAILED.with(|f| f.get())
}

/// Log lines lost since start (the metric).
pub fn failures() -> u64 {
    FAILURES.load(Ordering::Relaxed)
}

/// How many characters of a caller's text a log line or error shows ([`shown`]).
pub const MAX_SHOWN: usize = 256;

/// Text a caller chose (a requested identity, a header or metadata value, a CSR field, an
/// unverified token header), made safe for one log line: quoted, with every character that
/// could end the line or disguise it escaped (control characters such as `\n` and `\r`,
/// Unicode line and paragraph separators, bidirectional overrides, and `"` and `\`, so the
/// quotes cannot be closed early), and cut at [`MAX_SHOWN`] characters with an ellipsis.
/// Without it a newline in an `ImpersonatedIdentity` forges a second log line, and a 256 KiB
/// value writes 256 KiB per refused call.
///
/// Every caller-controlled string goes through this one helper before it reaches a log line
/// or an error message (which the log repeats).
pub fn shown(s: &str) -> Shown<'_> {
    Shown(s)
}

/// What [`shown`] returns: formats as the quoted, escaped, bounded text.
#[derive(Clone, Copy)]
pub struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        f.write_char('"')?;
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(MAX_SHOWN) {
            let risky = c.is_control()
                || (c.is_whitespace() && c != ' ')
                || matches!(c, '"' | '\\' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if risky {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        if chars.next().is_some() {
            f.write_char('…')?;
        }
        f.write_char('"')
    }
}

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_escapes_line_breaks_and_bounds_length() {
        assert_eq!(
            shown("spiffe://a\nlevel=ERROR forged\r\u{2028}\u{202e}\"\\").to_string(),
            r#""spiffe://a\nlevel=ERROR forged\r\u{2028}\u{202e}\"\\""#
        );
        let long = "x".repeat(10_000);
        let s = shown(&long).to_string();
        assert_eq!(s.chars().count(), MAX_SHOWN + 3, "quotes and the ellipsis");
        assert!(s.ends_with("x…\""), "{s}");
        assert_eq!(
            shown(&"y".repeat(MAX_SHOWN)).to_string().chars().count(),
            MAX_SHOWN + 2
        );
        assert_eq!(
            shown("spiffe://cluster.local/ns/a/sa/b").to_string(),
            "\"spiffe://cluster.local/ns/a/sa/b\""
        );
        assert!(!shown("a\u{0}b\u{1b}[31m").to_string().contains('\u{1b}'));
    }
}
