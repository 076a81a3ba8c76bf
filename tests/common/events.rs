//! Event lines the example servers print on stdout, collected by a reader
//! thread and waited for with deadlines.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines a server printed on stdout, shared with a reader thread.
#[derive(Default)]
pub struct Events {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push(&self, line: String) {
        self.lock().push(line);
        self.changed.notify_all();
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// Waits until a line at index `from` or later matches; returns it and its index.
    pub fn wait(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&Line) -> bool,
    ) -> (usize, Line) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lock();
        loop {
            if let Some((i, line)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .map(|(i, l)| (i, Line::parse(l)))
                .find(|(_, line)| matches(line))
            {
                return (i, line);
            }
            let now = Instant::now();
            if now >= deadline {
                let so_far = lines.join("\n");
                drop(lines);
                panic!("timed out after {timeout:?} waiting for {what}; events so far:\n{so_far}");
            }
            lines = self
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One event line: a kind (the words before the first `key=`) and fields.
#[derive(Debug, Clone)]
pub struct Line {
    pub kind: String,
    pub fields: HashMap<String, String>,
    pub raw: String,
}

impl Line {
    pub fn parse(raw: &str) -> Line {
        let mut kind = Vec::new();
        let mut fields = HashMap::new();
        let mut rest = raw;
        while !rest.is_empty() {
            let word_end = rest.find(' ').unwrap_or(rest.len());
            let word = &rest[..word_end];
            if let Some((key, value)) = word.split_once('=') {
                if value.starts_with('"') {
                    // A quoted (Debug-formatted) value runs to the closing quote.
                    let start = key.len() + 1;
                    let mut end = start + 1;
                    let bytes = rest.as_bytes();
                    while end < bytes.len() && bytes[end] != b'"' {
                        end += if bytes[end] == b'\\' { 2 } else { 1 };
                    }
                    fields.insert(
                        key.to_owned(),
                        rest[start + 1..end.min(rest.len())].to_owned(),
                    );
                    rest = rest.get(end + 1..).unwrap_or("").trim_start();
                    continue;
                }
                fields.insert(key.to_owned(), value.to_owned());
            } else if fields.is_empty() {
                kind.push(word);
            }
            rest = rest[word_end..].trim_start();
        }
        Line {
            kind: kind.join(" "),
            fields,
            raw: raw.to_owned(),
        }
    }

    pub fn is(&self, kind: &str) -> bool {
        self.kind == kind
    }

    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }

    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("no numeric {key} in {:?}", self.raw))
    }
}
