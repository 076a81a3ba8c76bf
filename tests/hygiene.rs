//! Nothing leaks: no fd accumulates over many upgrades, and the application's
//! own subprocesses inherit neither sockets nor handoff variables.

mod common;

use std::collections::BTreeMap;

use common::http::get;
use common::Server;

/// The serving process's fds, by what they point to (`socket`, `anon_inode:…`, paths).
fn fd_table(pid: u32) -> BTreeMap<String, usize> {
    let mut table = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the fd table")
        .flatten()
    {
        let target = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        // socket:[1234] → socket; pipe:[…] → pipe: the inode differs per process.
        let kind = target.split(":[").next().unwrap_or("?").to_owned();
        *table.entry(kind).or_default() += 1;
    }
    table
}

#[test]
fn no_fd_accumulates_over_50_upgrades() {
    let server = Server::start("http_server");
    let first = server.upgrade_ok();
    let after_first = fd_table(first);
    let mut serving = first;
    for _ in 1..50 {
        serving = server.upgrade_ok();
    }
    let after_fifty = fd_table(serving);
    println!("fds after 1 upgrade: {after_first:?}; after 50: {after_fifty:?}");
    assert_eq!(
        after_first, after_fifty,
        "fd table of generation 2 vs generation 51"
    );
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(serving));
    assert_eq!(server.processes(), vec![serving]);
}

/// `GET /subprocess` after an upgrade (a successor, started with `LISTEN_*`
/// and `HANDOFF_*` in its environment): the listing shows no socket and no
/// handoff variable.
fn a_subprocess_inherits_nothing(example: &str) {
    let server = Server::start(example);
    let serving = server.upgrade_ok();
    let response = get(server.addr(), "/subprocess").expect("GET /subprocess");
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(serving));
    let body = response.body;
    assert!(body.contains(" 0 -> "), "the listing ran: {body}");
    assert!(
        body.lines().any(|l| l.starts_with("TEST_SERVER_TAG=")),
        "the environment listing ran: {body}"
    );
    let mut fds = 0;
    for line in body.lines() {
        fds += usize::from(line.contains(" -> "));
        assert!(
            !line.contains("socket:"),
            "a socket leaked into the subprocess: {line}"
        );
        for prefix in ["LISTEN_", "HANDOFF_", "NOTIFY_SOCKET="] {
            assert!(
                !line.starts_with(prefix),
                "a handoff variable leaked into the subprocess: {line}"
            );
        }
    }
    println!("{example} subprocess: {fds} fds listed, none a socket; no handoff variable");
}

#[test]
fn a_subprocess_of_the_application_inherits_no_socket_and_no_variable() {
    a_subprocess_inherits_nothing("http_server");
}

/// `axum_server` builds its `Handoff` inside `#[tokio::main]`: the
/// environment was scrubbed before `main` all the same.
#[test]
fn a_subprocess_of_a_tokio_main_server_inherits_no_socket_and_no_variable() {
    a_subprocess_inherits_nothing("axum_server");
}
