//! Containers and Kubernetes (the README's "Containers and Kubernetes"): the
//! server runs in a PID namespace of its own (`unshare --pid`, as in a
//! container) and is stopped the way a kubelet stops a pod: `SIGTERM` to
//! PID 1, `SIGKILL` after the grace period. The lame duck (`--drain-delay`)
//! answers `/readyz` with 503 while `/` still answers 200, then the listener
//! closes, the request in flight finishes, and the container exits 0 well
//! within the grace period. Needs root (skipped otherwise); the init is
//! tini (Debian package tini, which `.ci/run` installs).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::{get, Response};
use common::supervised::{text, write_launcher, Supervised};
use common::{signal, wait_exit, Events, Options, Server, DEADLINE};

/// The README's pod spec, scaled down: the server's lame duck and drain
/// deadline; the supervisor's stop deadline, which must cover both (and a
/// second); the pod's grace period, which must cover the supervisor's
/// deadline (and a margin for the exit).
const DRAIN_DELAY: Duration = Duration::from_secs(2);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const SUPERVISOR_DRAIN_TIMEOUT: &str = "8s";
const GRACE: Duration = Duration::from_secs(10);
/// The request in flight at `SIGTERM`: it outlasts the lame duck, so the
/// drain has to wait for it.
const SLOW_MS: u64 = 3000;

const UNSHARE: [&str; 4] = ["unshare", "--pid", "--fork", "--kill-child"];

fn root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("SKIPPED: unshare --pid needs root");
    }
    root
}

/// `tini` (Debian package tini, which `.ci/run` installs); without it the
/// test is skipped, unless `REQUIRE_TEST_PEERS` is set (as CI sets it).
fn tini() -> Option<&'static str> {
    const TINI: &str = "/usr/bin/tini";
    if Path::new(TINI).exists() {
        return Some(TINI);
    }
    let how = format!("{TINI} is missing: apt-get install tini (.ci/run does)");
    assert!(
        std::env::var_os("REQUIRE_TEST_PEERS").is_none(),
        "REQUIRE_TEST_PEERS is set but {how}"
    );
    eprintln!("SKIPPED: {how}");
    None
}

/// The host PID of the only child of `parent` (unshare's child: PID 1 of
/// the new namespace).
fn only_child(parent: u32) -> u32 {
    let children: Vec<u32> = common::all_processes()
        .into_iter()
        .filter(|p| p.ppid == parent)
        .map(|p| p.pid)
        .collect();
    assert_eq!(children.len(), 1, "children of {parent}: {children:?}");
    children[0]
}

/// The server's own flags: the lame duck and the drain deadline.
fn server_flags() -> String {
    format!(
        "--drain-delay {} --drain-timeout {}",
        DRAIN_DELAY.as_secs(),
        DRAIN_TIMEOUT.as_secs()
    )
}

/// What the clients saw of a pod's stop, from the `SIGTERM` on.
#[derive(Debug)]
struct Stop {
    readyz_503_after: Duration,
    /// `/` answered 200 and `/readyz` 503 this many times each in the lame duck.
    served: u32,
    not_ready: u32,
    /// The first connection refused: the listener closed.
    refused_after: Duration,
    slow_done_after: Duration,
    exit_after: Duration,
    /// What the server's `exit` line says it waited for its connections.
    drain_waited_ms: u64,
}

/// Stops a container as a kubelet stops a pod, with a slow request in
/// flight: `SIGTERM` to `pid1` (a host PID), then waits for `container`
/// (the host process whose exit is the container's) to exit within the
/// grace period. `pid` is the serving process's PID as its event lines say
/// it (in its namespace). Checks the lame duck, the drain and the exit, and
/// returns the figures.
fn stop_like_a_pod(addr: SocketAddr, events: &Events, pid: u64, pid1: u32, container: u32) -> Stop {
    assert_eq!(get(addr, "/readyz").unwrap().status, 200, "ready before");
    let from = events.len();
    let slow = std::thread::spawn(move || {
        let response = get(addr, &format!("/sleep?ms={SLOW_MS}"));
        (response, Instant::now())
    });
    events.wait(from, DEADLINE, "the slow request to start", |l| {
        l.is("sleeping") && l.num("pid") == pid
    });
    let signalled = Instant::now();
    signal(pid1, libc::SIGTERM);
    // Not ready at once, though still serving: a real request each time.
    let readyz_503_after = loop {
        match get(addr, "/readyz")
            .expect("/readyz answers in the lame duck")
            .status
        {
            503 => break signalled.elapsed(),
            200 => {}
            status => panic!("/readyz answered {status}"),
        }
        assert!(signalled.elapsed() < DEADLINE, "/readyz never said 503");
    };
    events.wait(from, DEADLINE, "the lame-duck line", |l| {
        l.is("lame-duck") && l.num("pid") == pid
    });
    // Until the listener closes, every request is answered: `/` with 200,
    // `/readyz` with 503. Then new clients are refused, not left waiting.
    let (mut served, mut not_ready) = (0, 0);
    let refused_after = loop {
        let (path, expected) = if served <= not_ready {
            ("/", 200)
        } else {
            ("/readyz", 503)
        };
        let asked = Instant::now();
        match get(addr, path) {
            Ok(Response { status, .. }) => {
                assert_eq!(status, expected, "GET {path} in the lame duck");
                if expected == 200 {
                    served += 1;
                } else {
                    not_ready += 1;
                }
            }
            Err(error) => {
                // The listener closed: this connection was refused, or reset
                // in the backlog as it closed, either way at once. From now on
                // every client is refused: none waits in a backlog nobody
                // accepts.
                let refused_after = signalled.elapsed();
                let waited = asked.elapsed();
                assert!(
                    waited < DRAIN_DELAY / 4,
                    "GET {path} failed after {waited:?} waiting, {refused_after:?} after SIGTERM: \
                     {error}; a client must be refused once the server stopped accepting, not \
                     left in a backlog"
                );
                let again = std::net::TcpStream::connect(addr);
                assert!(
                    again
                        .as_ref()
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
                    "connect after {error}: {again:?}"
                );
                break refused_after;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
        assert!(signalled.elapsed() < DEADLINE, "the listener never closed");
    };
    events.wait(from, DEADLINE, "the stopping line", |l| {
        l.is("stopping") && l.num("pid") == pid
    });
    let (response, slow_done) = slow.join().unwrap();
    let response = response.expect("the request in flight completes");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.pid(), Some(pid as u32), "answered by the server");
    let slow_done_after = slow_done - signalled;
    let left = GRACE.saturating_sub(signalled.elapsed());
    let status = wait_exit(container, left);
    let exit_after = signalled.elapsed();
    assert_eq!(
        status,
        Some(Some(0)),
        "the container exits 0 within the {GRACE:?} grace period ({exit_after:?} after SIGTERM)"
    );
    let (_, exit) = events.wait(from, DEADLINE, "the exit line", |l| {
        l.is("exit") && l.num("pid") == pid
    });
    assert_eq!(exit.num("cut"), 0, "nothing was cut: {}", exit.raw);
    let stop = Stop {
        readyz_503_after,
        served,
        not_ready,
        refused_after,
        slow_done_after,
        exit_after,
        drain_waited_ms: exit.num("waited_ms"),
    };
    println!("{stop:?}");
    assert!(
        stop.readyz_503_after < DRAIN_DELAY / 4,
        "/readyz said 503 at once: {stop:?}"
    );
    assert!(
        stop.served >= 5 && stop.not_ready >= 5,
        "requests kept succeeding through the lame duck: {stop:?}"
    );
    assert!(
        stop.refused_after >= DRAIN_DELAY,
        "the listener closed only after the drain delay: {stop:?}"
    );
    assert!(
        stop.refused_after < stop.slow_done_after,
        "new clients were refused while the request in flight drained: {stop:?}"
    );
    assert!(
        stop.slow_done_after >= Duration::from_millis(SLOW_MS) - DRAIN_DELAY / 2
            && stop.exit_after >= stop.slow_done_after,
        "the exit waited for the request in flight: {stop:?}"
    );
    assert!(
        stop.drain_waited_ms > 0,
        "the drain waited for the request in flight: {stop:?}"
    );
    assert!(
        stop.exit_after < DRAIN_DELAY + DRAIN_TIMEOUT,
        "the exit came within the server's own bound, well before the grace period: {stop:?}"
    );
    stop
}

/// The container case `handoff run` is for: the supervisor is PID 1 and a
/// library server (`http_server`) its child. As PID 1 it reaps an orphan;
/// `kill -HUP 1` inside the namespace (as `kubectl exec POD -- kill -HUP 1`
/// would) upgrades in place: the supervisor stays PID 1 and its child
/// changes. Then the pod's stop: `SIGTERM` reaches the child, whose lame
/// duck and drain run as the kubelet expects, and the supervisor exits 0.
#[test]
fn handoff_run_as_pid_1_upgrades_in_place_reaps_orphans_and_stops_like_a_pod() {
    if !root() {
        return;
    }
    let server = common::example_path("http_server")
        .to_string_lossy()
        .into_owned();
    let child = move |addr: SocketAddr| format!("exec {server} --listen {addr} {}", server_flags());
    let sup = Supervised::start_child(
        &["--drain-timeout", SUPERVISOR_DRAIN_TIMEOUT],
        &UNSHARE,
        Some(&child),
    );
    let unshare = sup.supervisor.id();
    let pid1 = only_child(unshare);
    let first = u64::from(sup.wait_serving());
    assert_ne!(first, 1, "the supervisor is PID 1, not the server");
    // The next child leaves an orphan behind: a subshell starts `sleep` and
    // exits at once, so `sleep` is reparented to PID 1, the supervisor.
    write_launcher(&sup.launcher, &format!("(sleep 1 &)\n{}", child(sup.addr)));
    let from = sup.events.len();
    let pid1_arg = pid1.to_string();
    let hup = Command::new("nsenter")
        .args(["--target", &pid1_arg, "--pid", "--", "kill", "-HUP", "1"])
        .output()
        .expect("run nsenter");
    assert!(hup.status.success(), "kill -HUP 1: {}", text(&hup.stderr));
    let (_, ready) = sup
        .events
        .wait(from, DEADLINE, "the new child to be ready", |l| {
            l.is("ready") && l.num("pid") != first
        });
    let second = ready.num("pid");
    // The orphan appears under PID 1, exits, and must not stay a zombie.
    common::wait_orphan_reaped(pid1, "sleep");
    // The old child drains and exits; its lame duck answers the readiness
    // probes it happens to accept on the shared socket meanwhile.
    let (mut ready_200, mut ready_503) = (0, 0);
    let deadline = Instant::now() + DEADLINE;
    let exited = |l: &common::Line| l.is("exit") && l.num("pid") == first;
    while !sup.events.snapshot()[from..]
        .iter()
        .any(|l| exited(&common::Line::parse(l)))
    {
        match get(sup.addr, "/readyz").map(|r| r.status) {
            Ok(200) => ready_200 += 1,
            Ok(503) => ready_503 += 1,
            other => panic!("/readyz during the upgrade: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(Instant::now() < deadline, "the old child never exited");
    }
    println!(
        "in-place upgrade: /readyz answered 200 {ready_200} times (the new child) and 503 \
         {ready_503} times (the old child's lame duck) until the old child exited"
    );
    assert_eq!(get(sup.addr, "/").unwrap().pid(), Some(second as u32));
    // The supervisor is still PID 1 (unshare's child), its child changed.
    assert_eq!(only_child(unshare), pid1, "the supervisor kept its PID");
    // The old child printed its last line; once it is reaped, one child is left.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let children: Vec<String> = common::all_processes()
            .into_iter()
            .filter(|p| p.ppid == pid1)
            .map(|p| p.comm)
            .collect();
        if children == ["http_server"] {
            break;
        }
        assert!(Instant::now() < deadline, "children of PID 1: {children:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop_like_a_pod(sup.addr, &sup.events, second, pid1, unshare);
}

/// A library server under `unshare --pid` with `init` after it (an init,
/// or nothing: the server is PID 1), at `namespace_pid` in the namespace,
/// with `flags`. Returns it and the host PID of the namespace's PID 1.
fn library_server_in_a_namespace(init: &[&str], namespace_pid: u32, flags: &str) -> (Server, u32) {
    let mut wrapper: Vec<String> = UNSHARE.iter().map(|a| a.to_string()).collect();
    wrapper.extend(init.iter().map(|a| a.to_string()));
    let mut options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0");
    for flag in flags.split_whitespace() {
        options = options.arg(flag);
    }
    let server = Server::start_with(Options {
        wrapper,
        namespace_pid: Some(namespace_pid),
        ..options
    });
    let pid1 = only_child(server.first_pid);
    (server, pid1)
}

/// The library server behind an init (`tini`, what `docker run --init`
/// runs): the kubelet's `SIGTERM` goes to tini, which passes it on; the
/// lame duck and the drain run, and tini exits with the server's 0.
#[test]
fn a_library_server_under_tini_stops_like_a_pod() {
    if !root() {
        return;
    }
    let Some(tini) = tini() else {
        return;
    };
    let (server, pid1) = library_server_in_a_namespace(&[tini, "--"], 2, &server_flags());
    stop_like_a_pod(server.addr(), &server.events, 2, pid1, server.first_pid);
}

/// The library server as PID 1 itself (no init): it refuses to upgrade
/// (`faults::a_server_that_is_pid_1_refuses_to_upgrade_and_says_why`) but
/// stops like a pod: a handled `SIGTERM` reaches PID 1.
#[test]
fn a_library_server_as_pid_1_stops_like_a_pod() {
    if !root() {
        return;
    }
    let (server, pid1) = library_server_in_a_namespace(&[], 1, &server_flags());
    stop_like_a_pod(server.addr(), &server.events, 1, pid1, server.first_pid);
}

/// Why a library server that upgrades in place needs `handoff run` in a
/// container, and an init does not do: tini passes `SIGHUP` on, the server
/// upgrades, and when the first generation exits (after its probation)
/// tini exits with it, as a container ends with its first process; the
/// kernel then kills the rest of the namespace, the successor included.
#[test]
fn under_tini_an_in_place_upgrade_ends_the_container() {
    if !root() {
        return;
    }
    let Some(tini) = tini() else {
        return;
    };
    let (server, pid1) = library_server_in_a_namespace(&[tini, "--"], 2, "");
    let from = server.events.len();
    signal(pid1, libc::SIGHUP);
    let (_, succeeded) = server
        .events
        .wait(from, DEADLINE, "the upgrade to succeed", |l| {
            l.is("upgrade succeeded") && l.num("pid") == 2
        });
    let successor = succeeded.num("successor");
    server
        .events
        .wait(from, DEADLINE, "the successor to be ready", |l| {
            l.is("ready") && l.num("pid") == successor
        });
    server.events.wait(
        from,
        DEADLINE,
        "the first generation to stop accepting",
        |l| l.is("stopping") && l.num("pid") == 2,
    );
    assert_eq!(
        get(server.addr(), "/").unwrap().pid(),
        Some(successor as u32),
        "the successor serves"
    );
    server
        .events
        .wait(from, DEADLINE, "the first generation's exit", |l| {
            l.is("exit") && l.num("pid") == 2
        });
    assert_eq!(
        wait_exit(server.first_pid, DEADLINE),
        Some(Some(0)),
        "tini exits with its child"
    );
    assert!(
        server.processes().is_empty(),
        "the successor went with the namespace: {:?}",
        server.processes()
    );
    assert!(get(server.addr(), "/").is_err(), "nothing serves any more");
}
