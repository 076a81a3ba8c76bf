//! A `SIGHUP` (a `systemctl reload`) that reaches the old main process after
//! it handed over is for the service, whenever it comes (in the probation,
//! or in the drain after it): the old process tells systemd
//! `MAINPID=<successor>`, waits for the answer, passes the signal on, and
//! from then on never takes the sockets back, since systemd no longer knows
//! it as main. The test plays systemd's notify socket.

mod common;

use common::http::{KeepAlive, Response};
use common::notify::Manager;
use common::{is_zombie, signal, wait_exit, Options, Server, TempDir, DEADLINE};

/// `http_server` under the fake manager, with `args`.
fn start(manager_dir: &TempDir, args: &[&str]) -> (Manager, Server) {
    let socket_path = manager_dir.path().join("notify.sock");
    let manager = Manager::bind(&socket_path);
    let mut options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0");
    for arg in args {
        options = options.arg(*arg);
    }
    options.env.push((
        "NOTIFY_SOCKET".into(),
        socket_path.to_string_lossy().into_owned(),
    ));
    (manager, Server::start_with(options))
}

/// Upgrades the first generation; the successor's PID and the index of
/// the commit's `READY=1`.
fn first_upgrade(manager: &Manager, server: &Server) -> (u32, usize) {
    let ready = manager.wait(0, "READY=1 at start", |m| m.has("READY=1"));
    signal(server.first_pid, libc::SIGHUP);
    let committed = manager.wait(ready + 1, "READY=1 at the commit", |m| m.has("READY=1"));
    let (_, line) = server
        .events
        .wait(0, DEADLINE, "the upgrade to succeed", |l| {
            l.is("upgrade succeeded")
        });
    (line.num("successor") as u32, committed)
}

/// Waits for `MAINPID=<successor>` from `first`, then answers its barrier;
/// the index of the barrier.
fn handover(manager: &Manager, from: usize, first: u32, successor: u32) -> usize {
    let handover = manager.wait(from, "MAINPID=", |m| m.value("MAINPID").is_some());
    manager.with(handover, |m| {
        assert_eq!(m.pid, first);
        assert_eq!(m.value("MAINPID"), Some(successor.to_string().as_str()));
    });
    let barrier = manager.wait(handover + 1, "BARRIER=1", |m| m.has("BARRIER=1"));
    let answer = manager.with(barrier, |m| m.fds.pop().expect("BARRIER=1 carries an fd"));
    drop(answer);
    barrier
}

/// Once the signal is passed on, the successor (main now) tells systemd
/// `RELOADING=1` itself and upgrades to a generation of its own.
fn successor_upgrades(manager: &Manager, server: &Server, barrier: usize, second: u32) {
    let reloading = manager.wait(barrier + 1, "RELOADING=1 from the successor", |m| {
        m.has("RELOADING=1")
    });
    manager.with(reloading, |m| assert_eq!(m.pid, second));
    let (_, line) = server
        .events
        .wait(0, DEADLINE, "the successor's own upgrade", |l| {
            l.is("upgrade succeeded") && l.num("pid") == u64::from(second)
        });
    assert_ne!(line.num("successor") as u32, second);
}

/// A `GET /sleep?ms=MS` to the first generation, waited for until it is in
/// its handler.
fn slow_request(server: &Server, ms: u64) -> std::thread::JoinHandle<Result<Response, String>> {
    let addr = server.addr();
    let path = format!("/sleep?ms={ms}");
    let slow = std::thread::spawn(move || KeepAlive::new(addr).get(&path));
    server
        .events
        .wait(0, DEADLINE, "the slow request", |l| l.is("sleeping"));
    slow
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

/// In the probation: the signal goes on only once systemd answered, and the
/// old process is still there until then.
#[test]
fn in_the_probation_it_is_passed_on_once_systemd_knows_the_successor() {
    let dir = TempDir::new("handover-probation");
    let (manager, server) = start(&dir, &["--probation", "30"]);
    let first = server.first_pid;
    let (second, committed) = first_upgrade(&manager, &server);
    signal(first, libc::SIGHUP);
    let handover = manager.wait(committed + 1, "MAINPID=", |m| m.value("MAINPID").is_some());
    manager.with(handover, |m| {
        assert_eq!(m.pid, first);
        assert_eq!(m.value("MAINPID"), Some(second.to_string().as_str()));
    });
    let barrier = manager.wait(handover + 1, "BARRIER=1", |m| m.has("BARRIER=1"));
    let answer = manager.with(barrier, |m| m.fds.pop().expect("BARRIER=1 carries an fd"));
    // Until systemd answers, the old process neither passes the signal on
    // nor exits.
    assert!(
        alive(first),
        "the old process exited before systemd confirmed MAINPID="
    );
    assert!(
        !server
            .events
            .snapshot()
            .iter()
            .any(|l| l.starts_with(&format!("upgrade started pid={second} "))),
        "the successor upgraded before systemd knew it as the main process"
    );
    drop(answer);
    successor_upgrades(&manager, &server, barrier, second);
    assert_eq!(wait_exit(first, DEADLINE), Some(Some(0)));
}

/// After the probation, while the old process still drains a slow request
/// (and is still systemd's main process): passed on too. (It used to be
/// ignored: the reload was lost.)
#[test]
fn in_the_drain_after_the_probation_it_is_passed_on_too() {
    let dir = TempDir::new("handover-drain");
    let (manager, server) = start(&dir, &["--probation", "0"]);
    let first = server.first_pid;
    let slow = slow_request(&server, 4000);
    let (second, committed) = first_upgrade(&manager, &server);
    server
        .events
        .wait(0, DEADLINE, "the old process to drain", |l| {
            l.is("stopping") && l.num("pid") == u64::from(first)
        });
    signal(first, libc::SIGHUP);
    let barrier = handover(&manager, committed + 1, first, second);
    successor_upgrades(&manager, &server, barrier, second);
    let response = slow.join().unwrap().expect("the slow request completes");
    assert_eq!((response.status, response.pid()), (200, Some(first)));
    assert_eq!(wait_exit(first, DEADLINE), Some(Some(0)));
}

/// Once the old process has told systemd `MAINPID=<successor>` to pass a
/// signal on, a successor that then dies is not taken back: systemd would
/// refuse the old process's `MAINPID=` (it is not main any more), and the
/// unit would fail with the old process serving unseen. (It used to take
/// the sockets back and send `MAINPID=<old>`.)
#[test]
fn once_systemd_knows_the_successor_a_crash_is_not_taken_back() {
    let dir = TempDir::new("handover-no-take-back");
    let (manager, server) = start(&dir, &["--probation", "30"]);
    let first = server.first_pid;
    // The old process drains a slow request, so it is still there when the
    // successor, which aborts 1 s after it says ready, dies.
    let slow = slow_request(&server, 3000);
    server.inject_fault("http_server", "abort-after-ready=1000");
    let (second, committed) = first_upgrade(&manager, &server);
    server.restore_binary("http_server");
    signal(first, libc::SIGHUP);
    let barrier = handover(&manager, committed + 1, first, second);
    assert_eq!(
        wait_exit(second, DEADLINE),
        Some(None),
        "the successor dies of its fault"
    );
    let response = slow.join().unwrap().expect("the slow request completes");
    assert_eq!((response.status, response.pid()), (200, Some(first)));
    // The old process must just exit.
    assert_eq!(
        wait_exit(first, DEADLINE),
        Some(Some(0)),
        "the old process exits"
    );
    let events = server.events.snapshot();
    assert!(
        !events
            .iter()
            .any(|l| l.starts_with(&format!("resumed pid={first} "))
                || l.starts_with(&format!("upgrade rolled-back pid={first} "))),
        "the old process took the sockets back: {events:#?}"
    );
    let told_back = manager
        .all()
        .into_iter()
        .skip(barrier)
        .filter(|(pid, text)| {
            *pid == first && text.lines().any(|l| l == format!("MAINPID={first}"))
        })
        .count();
    assert_eq!(
        told_back, 0,
        "MAINPID= of the old process after the handover"
    );
}
