//! Addresses as people write them: a host name in `handoff run --listen`
//! (resolved once, and a line says where it was bound), and `[::]` bound as
//! std binds it (dual-stack where the system says so), by the library and by
//! the supervisor, with `--ipv6-only` for a socket that takes IPv6 only.

mod common;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use common::http::get;
use common::supervised::Supervised;
use common::{example_path, Server, DEADLINE};

/// Waits until `GET /` on `addr` answers; the answering PID.
fn wait_answer(addr: SocketAddr, log: impl Fn() -> String) -> u32 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(response) = get(addr, "/") {
            return response.pid().expect("pid in the body");
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never answered:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Why dual-stack cannot be tested here, if it cannot: no IPv6 loopback, or
/// the system makes IPv6 sockets v6-only by default.
fn no_dual_stack() -> Option<String> {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        return Some("no IPv6 loopback".into());
    }
    let default = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap_or_default();
    (default.trim() != "0").then(|| {
        format!(
            "net.ipv6.bindv6only is {:?}: IPv6 sockets are v6-only here",
            default.trim()
        )
    })
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

#[test]
fn handoff_run_listens_at_a_host_name_and_says_where() {
    let server = example_path("http_server").to_string_lossy().into_owned();
    let sup = Supervised::spawn_listening(
        "web=tcp://localhost:{port}",
        &[],
        &[&server, "--listen", "{addr}"],
    );
    // The line that says where it listens, and it is one of localhost's.
    let deadline = Instant::now() + DEADLINE;
    let line = loop {
        let log = sup.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("listening") && l.contains("listener=web"))
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no line says where web listens:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        line.contains(&format!("asked=localhost:{}", sup.addr.port())),
        "{line}"
    );
    let first: SocketAddr = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {line}"));
    let resolved: Vec<SocketAddr> = ("localhost", sup.addr.port())
        .to_socket_addrs()
        .expect("localhost resolves")
        .collect();
    assert!(
        resolved.contains(&first),
        "{first} is not one of {resolved:?}"
    );
    let pid = wait_answer(first, || sup.log());
    assert_ne!(pid, 0);
    // The child got it under the supervisor's name, at its own address.
    let out = sup.upgrade();
    assert!(
        out.status.success(),
        "{}",
        common::supervised::text(&out.stderr)
    );
    assert_ne!(wait_answer(first, || sup.log()), 0);
}

#[test]
fn a_listen_address_without_a_port_is_refused_with_examples() {
    let out =
        common::supervised::handoff(&["run", "--listen", "web=tcp://localhost", "--", "/bin/true"]);
    let stderr = common::supervised::text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is not HOST:PORT") && stderr.contains("localhost:8080"),
        "{stderr}"
    );
}

/// The library server on `[::]:0`: IPv4 and IPv6 clients reach it, before
/// and after an upgrade (the successor inherits the same socket).
#[test]
fn the_library_binds_the_ipv6_wildcard_dual_stack_as_std_does() {
    if let Some(why) = no_dual_stack() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let server = Server::start_with(
        common::Options::new("http_server")
            .arg("--listen")
            .arg("[::]:0"),
    );
    let port = server.addr().port();
    assert!(server.addr().is_ipv6(), "{}", server.addr());
    for round in 0..2 {
        let pid = server.serving_pid();
        for addr in [v4(port), v6(port)] {
            let response = get(addr, "/").unwrap_or_else(|e| panic!("round {round}: {addr}: {e}"));
            assert_eq!(response.pid(), Some(pid), "round {round}: {addr}");
        }
        server.upgrade_ok();
    }
}

/// The supervisor on `[::]`: dual-stack by default; with `--ipv6-only` an
/// IPv4 client is refused while IPv6 ones are served.
#[test]
fn the_supervisor_binds_the_ipv6_wildcard_dual_stack_unless_ipv6_only() {
    if let Some(why) = no_dual_stack() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let server = example_path("http_server").to_string_lossy().into_owned();
    let child = [server.as_str(), "--listen", "[::]:{port}"];
    let dual = Supervised::spawn_listening("web=tcp://[::]:{port}", &[], &child);
    let port = dual.addr.port();
    let pid = wait_answer(v6(port), || dual.log());
    assert_eq!(
        get(v4(port), "/").map(|r| r.pid()),
        Ok(Some(pid)),
        "IPv4 too"
    );
    drop(dual);

    let only = Supervised::spawn_listening("web=tcp://[::]:{port}", &["--ipv6-only"], &child);
    let port = only.addr.port();
    wait_answer(v6(port), || only.log());
    let refused = std::net::TcpStream::connect_timeout(&v4(port), Duration::from_secs(5));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "an IPv4 client of an IPv6-only socket: {refused:?}"
    );
}
