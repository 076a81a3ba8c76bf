//! Showing text that came from outside the process in logs and errors.

/// Text that came from outside the process (an inherited fd's name, say),
/// made safe for a log line or an error message: control characters,
/// newlines, escape bytes, backslashes, quotes and other non-printable
/// characters are shown as Rust escapes (`\n`, `\u{1b}`, `\\`, …), as
/// [`str::escape_debug`] does, without surrounding quotes. So a name cannot
/// start a forged log line or send terminal control sequences.
///
/// Formatting writes straight to the formatter: nothing is allocated.
pub(crate) struct Escaped<'a>(pub &'a str);

/// The escaped text, unquoted.
impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0.escape_debug(), f)
    }
}

/// The escaped text in double quotes, so a `?field` in a tracing event shows
/// where it begins and ends.
impl std::fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_renders_what_could_forge_a_log_line() {
        let cases = [
            ("http", "http"),
            ("with space", "with space"),
            ("a\nINFO forged line", "a\\nINFO forged line"),
            ("\r\t\0", "\\r\\t\\0"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("back\\slash", "back\\\\slash"),
            ("bell\u{7}del\u{7f}", "bell\\u{7}del\\u{7f}"),
            ("nel\u{85}ls\u{2028}", "nel\\u{85}ls\\u{2028}"),
            ("bidi\u{202e}zw\u{200b}", "bidi\\u{202e}zw\\u{200b}"),
            ("café", "café"),
        ];
        for (raw, shown) in cases {
            let out = Escaped(raw).to_string();
            assert_eq!(out, shown, "{raw:?}");
            assert!(!out.chars().any(char::is_control), "{raw:?} -> {out}");
        }
        assert_eq!(
            format!("{:?}", Escaped("say \"hi\"\n")),
            r#""say \"hi\"\n""#
        );
    }
}
