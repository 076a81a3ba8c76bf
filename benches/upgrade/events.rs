//! The event lines the servers print on stdout, parsed and time-stamped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::ChildStdout;
use std::sync::mpsc::Sender;
use std::time::Instant;

/// The kinds of event line the servers print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Listening,
    Ready,
    UpgradeStarted,
    UpgradeSucceeded,
    UpgradeFailed,
    Stopping,
    Exit,
    /// A line of no interest here (e.g. `sleeping`).
    Other,
    /// Not a line: the stdout pipe of the process started as `pid` closed.
    Closed,
}

/// One event line, stamped when the benchmark read it.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub kind: Kind,
    pub pid: i32,
    pub generation: u64,
    pub successor: Option<i32>,
    pub addrs: Vec<SocketAddr>,
    pub line: String,
}

const PREFIXES: [(&str, Kind); 7] = [
    ("listening ", Kind::Listening),
    ("ready ", Kind::Ready),
    ("upgrade started ", Kind::UpgradeStarted),
    ("upgrade succeeded ", Kind::UpgradeSucceeded),
    ("upgrade failed ", Kind::UpgradeFailed),
    ("stopping ", Kind::Stopping),
    ("exit ", Kind::Exit),
];

impl Event {
    /// Parses `kind words key=value key="quoted value" …`.
    pub fn parse(line: &str, at: Instant) -> Event {
        let (kind, rest) = PREFIXES
            .iter()
            .find_map(|(prefix, kind)| line.strip_prefix(prefix).map(|rest| (*kind, rest)))
            .unwrap_or((Kind::Other, ""));
        let mut event = Event {
            at,
            kind,
            pid: 0,
            generation: 0,
            successor: None,
            addrs: Vec::new(),
            line: line.to_owned(),
        };
        for (key, value) in fields(rest) {
            match key.as_str() {
                "pid" => event.pid = value.parse().unwrap_or(0),
                "generation" => event.generation = value.parse().unwrap_or(0),
                "successor" => event.successor = value.parse().ok(),
                "addrs" => event.addrs = value.split(',').filter_map(|a| a.parse().ok()).collect(),
                _ => {}
            }
        }
        event
    }
}

/// Splits `key=value key="a \"quoted\" value"` into pairs.
fn fields(mut rest: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].to_owned();
        let after = &rest[eq + 1..];
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => {
                let (mut value, mut escaped, mut end) = (String::new(), false, quoted.len());
                for (i, c) in quoted.char_indices() {
                    match c {
                        _ if escaped => {
                            value.push(c);
                            escaped = false;
                        }
                        '\\' => escaped = true,
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        _ => value.push(c),
                    }
                }
                (value, &quoted[end..])
            }
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_owned(), &after[end..])
            }
        };
        out.push((key, value));
        rest = tail;
    }
    out
}

/// Sends every line of a process's stdout (shared with its successors) as an
/// event, then a [`Kind::Closed`] event when every writer has closed it.
pub fn read_events(started: i32, stdout: ChildStdout, events: Sender<Event>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if events.send(Event::parse(&line, Instant::now())).is_err() {
            return;
        }
    }
    let mut closed = Event::parse("", Instant::now());
    closed.kind = Kind::Closed;
    closed.pid = started;
    let _ = events.send(closed);
}
