//! Faults of the upgrade path, as an operator hits them, under real load:
//! a new version that crashes right after saying ready, an old process
//! killed mid-upgrade, a new version that fails after claiming a Unix
//! socket. None of them may cost service.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::http::get;
use common::load::Load;
use common::{signal, wait_exit, Options, Server, DEADLINE};

fn inject(server: &Server, fault: &str) {
    server.inject_fault("http_server", fault);
}

fn refusals(errors: &[String]) -> usize {
    errors.iter().filter(|e| e.contains("refused")).count()
}

/// Starts an upgrade of the first generation to a successor with `fault`,
/// and waits until that successor has claimed its sockets. Returns the
/// successor's PID and where its events begin.
fn upgrade_to_faulty(server: &Server, fault: &str) -> (u32, usize) {
    let old = server.first_pid;
    inject(server, fault);
    let from = server.events.len();
    signal(old, libc::SIGHUP);
    let (_, listening) = server
        .events
        .wait(from, DEADLINE, "the successor to start", |l| {
            l.is("listening") && l.num("pid") != u64::from(old)
        });
    (listening.num("pid") as u32, from)
}

/// A process's fd limit (`RLIMIT_NOFILE`), read and set from outside.
struct FdLimit {
    pid: u32,
    initial: libc::rlimit,
}

impl FdLimit {
    fn of(pid: u32) -> FdLimit {
        let mut initial = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit with no new limit only writes the current one.
        let rc = unsafe {
            libc::prlimit(
                pid as i32,
                libc::RLIMIT_NOFILE,
                std::ptr::null(),
                &mut initial,
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        FdLimit { pid, initial }
    }

    fn set(&self, soft: u64) {
        let limit = libc::rlimit {
            rlim_cur: soft.min(self.initial.rlim_max),
            rlim_max: self.initial.rlim_max,
        };
        // SAFETY: prlimit only reads `limit`.
        let rc = unsafe {
            libc::prlimit(
                self.pid as i32,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    /// Leaves the process exactly `extra` fds to open: the limit bounds fd
    /// numbers, so it goes at the `extra`-th free one.
    fn leave(&self, extra: usize) {
        let open: std::collections::BTreeSet<u64> = fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        self.set((0..).filter(|n| !open.contains(n)).nth(extra).unwrap());
    }

    fn restore(&self) {
        self.set(self.initial.rlim_cur);
    }
}

#[test]
fn a_successor_that_crashes_after_ready_is_taken_back_under_load() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--probation")
            .arg("5"),
    );
    let old = server.first_pid;
    let load = Load::start(server.addr(), 2, 2);
    load.wait_for_more(50);
    inject(&server, "abort-after-ready=30");
    let from = server.events.len();
    let successor = server.upgrade().expect("the upgrade itself succeeds");
    let (_, rolled) = server.events.wait(from, DEADLINE, "the take-back", |l| {
        l.is("upgrade rolled-back") && l.num("pid") == u64::from(old)
    });
    assert_eq!(rolled.num("successor"), u64::from(successor));
    assert!(rolled.get("reason").contains("SIGABRT"), "{}", rolled.raw);
    server
        .events
        .wait(from, DEADLINE, "the old process to resume", |l| {
            l.is("resumed") && l.num("pid") == u64::from(old)
        });
    let during = load.stop();

    // After the take-back: the old process serves everything, alone.
    let after = Load::start(server.addr(), 2, 2);
    after.wait_for_more(200);
    let after = after.stop();
    println!(
        "take-back: {} ok / {} failed during the crash (errors {:?}); {} ok / {} failed after",
        during.ok, during.failed, during.errors, after.ok, after.failed
    );
    assert_eq!(
        refusals(&during.errors),
        0,
        "the listening socket never closed: nothing refused"
    );
    assert_eq!(after.failed, 0, "after the take-back: {:?}", after.errors);
    assert_eq!(after.pids.iter().copied().collect::<Vec<_>>(), vec![old]);
    assert_eq!(
        server.serving_pid(),
        old,
        "the PID file names the old process again"
    );
    assert!(
        server.stderr_all().contains("took the sockets back"),
        "the take-back is logged as an error"
    );
    // It can upgrade again, to a good binary this time.
    server.restore_binary("http_server");
    let new = server.upgrade_ok();
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(new));
}

#[test]
fn a_successor_whose_parent_is_killed_mid_upgrade_serves_alone() {
    let server = Server::start("http_server");
    let old = server.first_pid;
    let load = Load::start(server.addr(), 2, 2);
    load.wait_for_more(50);
    let (successor, from) = upgrade_to_faulty(&server, "slow-ready=1500");
    // The OOM killer takes the old process while its successor starts.
    signal(old, libc::SIGKILL);
    assert!(wait_exit(old, DEADLINE).is_some(), "the old process died");
    server
        .events
        .wait(from, DEADLINE, "the successor to be ready", |l| {
            l.is("ready") && l.num("pid") == u64::from(successor)
        });
    load.wait_for_more(100);
    let stats = load.stop();
    println!(
        "parent killed: {} ok, {} failed ({:?})",
        stats.ok, stats.failed, stats.errors
    );
    assert_eq!(
        refusals(&stats.errors),
        0,
        "nothing refused: {:?}",
        stats.errors
    );
    assert_eq!(
        server.serving_pid(),
        successor,
        "the PID file names the successor"
    );
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(successor));
    assert!(server.stderr_all().contains("serving alone"));
    // It is a full server: it upgrades later.
    server.restore_binary("http_server");
    let next = server.upgrade_ok();
    assert_ne!(next, successor);
}

#[test]
fn a_successor_that_fails_at_start_up_leaves_the_unix_socket_path() {
    let dir = common::TempDir::new("control-path");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let control = dir.path().join("control.sock");
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--control")
            .arg(control.to_str().unwrap()),
    );
    inject(&server, "exit-before-ready");
    let error = server.upgrade().expect_err("the successor exits 3");
    assert!(error.contains("status 3"), "{error}");
    assert!(
        control.exists(),
        "the failed successor must not remove its predecessor's socket path"
    );
    // The control socket still answers, from the old process.
    std::os::unix::net::UnixStream::connect(&control).expect("connect to the control socket");
    assert_eq!(
        get(server.addr(), "/").unwrap().pid(),
        Some(server.first_pid)
    );
}

/// A candidate that is never ready is rolled back under load without a single
/// failed request: it accepts nothing before its parent commits, so nothing
/// it holds dies with it.
#[test]
fn a_candidate_that_is_rolled_back_loses_no_connection() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--upgrade-timeout")
            .arg("1"),
    );
    let load = Load::start(server.addr(), 4, 4);
    load.wait_for_more(50);
    inject(&server, "never-ready");
    for _ in 0..3 {
        let error = server.upgrade().expect_err("never ready: rolled back");
        assert!(error.contains("not ready within"), "{error}");
        load.wait_for_more(50);
    }
    let stats = load.stop();
    println!(
        "rolled-back candidates: {} ok, {} failed ({:?})",
        stats.ok, stats.failed, stats.errors
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(server.processes(), vec![server.first_pid]);
}

/// `kill -HUP $(cat pidfile)` right after an upgrade lands on a successor
/// that is still getting ready: the request is kept and runs once it serves.
#[test]
fn a_sighup_to_a_successor_still_getting_ready_is_kept() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--probation")
            .arg("0"),
    );
    for round in 0..10 {
        let old = server.serving_pid();
        let from = server.events.len();
        signal(old, libc::SIGHUP);
        // As soon as the PID file names the successor, signal it: it is then
        // between writing the PID file and its parent's commit.
        let mut new = old;
        server.wait_until("the PID file to name the successor", || {
            new = fs::read_to_string(&server.pid_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(old);
            new != old
        });
        signal(new, libc::SIGHUP);
        server.events.wait(
            from,
            DEADLINE,
            "the successor to run the kept SIGHUP",
            |l| l.is("upgrade succeeded") && l.num("pid") == u64::from(new),
        );
        server.wait_until("the round's old generations to exit", || {
            server.processes().len() == 1
        });
        println!("round {round}: {old} -> {new} -> {}", server.serving_pid());
    }
}

/// systemd's `ExecReload=kill -HUP $MAINPID` signals the old process while
/// its probation runs (it is still the main process): the request is passed
/// on to the successor, which upgrades.
#[test]
fn a_sighup_to_a_process_in_probation_is_passed_on() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--probation")
            .arg("30"),
    );
    let old = server.first_pid;
    let second = server.upgrade().expect("first upgrade");
    let from = server.events.len();
    signal(old, libc::SIGHUP);
    let (_, line) = server
        .events
        .wait(from, DEADLINE, "the successor to upgrade", |l| {
            l.is("upgrade succeeded") && l.num("pid") == u64::from(second)
        });
    let third = line.num("successor") as u32;
    // The probation ended with the pass: the old process exits long before 30 s.
    assert_eq!(wait_exit(old, DEADLINE), Some(Some(0)));
    server.wait_until("the third generation to answer", || {
        get(server.addr(), "/").ok().and_then(|r| r.pid()) == Some(third)
    });
}

/// A fd table full at any step of starting the successor (the pipe, the
/// channel, the fork, the pidfd): the upgrade fails with a reason, nothing is
/// left behind, the server keeps serving and still stops on SIGTERM.
#[test]
fn running_out_of_fds_at_any_step_of_the_spawn_rolls_back_cleanly() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--probation")
            .arg("0"),
    );
    let pid = server.first_pid;
    let limit = FdLimit::of(pid);
    let mut failures = Vec::new();
    for extra in 0..8 {
        limit.leave(extra);
        let outcome = server.upgrade();
        limit.restore();
        match outcome {
            Ok(_) => break,
            Err(error) => {
                server.wait_until("the failed successor to be reaped", || {
                    server.processes() == vec![pid] && common::zombie_children(pid).is_empty()
                });
                assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(pid));
                failures.push(error);
            }
        }
    }
    println!("fd exhaustion: {failures:#?}");
    assert!(
        !failures.is_empty(),
        "the limit never bit: the test proves nothing"
    );
    let serving = server.serving_pid();
    signal(serving, libc::SIGTERM);
    assert!(
        wait_exit(serving, DEADLINE).is_some(),
        "SIGTERM still stops the server"
    );
}

/// The readiness channel has no address: no socket of the server is bound
/// to a name or path another user could send to, even mid-upgrade.
#[test]
fn the_readiness_channel_cannot_be_reached_by_another_user() {
    let server = Server::start("http_server");
    let old = server.first_pid;
    let (successor, from) = upgrade_to_faulty(&server, "slow-ready=1000");
    // Every Unix socket either process holds, by inode, and its name if any.
    let named: std::collections::HashMap<u64, String> = fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(6)?.parse().ok()?;
            Some((inode, fields.get(7)?.to_string()))
        })
        .collect();
    for pid in [old, successor] {
        for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            else {
                continue;
            };
            let inode: u64 = inode.parse().unwrap();
            assert!(
                !named.contains_key(&inode),
                "pid {pid} holds a Unix socket bound to {:?}, which any local user could reach",
                named[&inode]
            );
        }
    }
    server
        .events
        .wait(from, DEADLINE, "the upgrade to finish", |l| {
            l.is("upgrade succeeded") && l.num("pid") == u64::from(old)
        });
}

/// A server that is PID 1 (a container without an init) would take its
/// successor down when it exits: the upgrade is refused, never silently.
#[test]
fn a_server_that_is_pid_1_refuses_to_upgrade_and_says_why() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: unshare --pid needs root");
        return;
    }
    let server = Server::start_with(Options {
        wrapper: vec![
            "unshare".into(),
            "--pid".into(),
            "--fork".into(),
            "--kill-child".into(),
        ],
        namespace_pid: Some(1),
        ..Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
    });
    let host_pid = common::all_processes()
        .into_iter()
        .find(|p| p.ppid == server.first_pid)
        .expect("the server under unshare")
        .pid;
    let from = server.events.len();
    signal(host_pid, libc::SIGHUP);
    let (_, failed) = server
        .events
        .wait(from, DEADLINE, "the refusal", |l| l.is("upgrade failed"));
    assert!(failed.get("error").contains("PID 1"), "{}", failed.raw);
    assert!(
        failed.get("error").contains("handoff run"),
        "{}",
        failed.raw
    );
    assert_eq!(
        get(server.addr(), "/").unwrap().pid(),
        Some(1),
        "still serving"
    );
}

/// A stop during an upgrade abandons it and says so, rather than claiming
/// the process is "still serving".
#[test]
fn an_upgrade_cut_short_by_sigterm_is_reported_as_abandoned() {
    let server = Server::start("http_server");
    let old = server.first_pid;
    let (candidate, from) = upgrade_to_faulty(&server, "slow-ready=30000");
    signal(old, libc::SIGTERM);
    let (_, failed) = server
        .events
        .wait(from, DEADLINE, "the upgrade's outcome", |l| {
            l.is("upgrade failed") && l.num("pid") == u64::from(old)
        });
    assert!(failed.get("error").contains("abandoned"), "{}", failed.raw);
    assert_eq!(wait_exit(old, DEADLINE), Some(Some(0)));
    assert!(
        wait_exit(candidate, DEADLINE).is_some(),
        "the candidate was stopped"
    );
    let log = server.stderr_all();
    assert!(log.contains("upgrade abandoned"), "{log}");
    assert!(!log.contains("still serving"), "{log}");
}

/// SIGHUPs that reach a new generation while it is still starting (the
/// operator reloads twice): one is kept, never more, and runs once it serves.
#[test]
fn sighups_during_start_up_run_one_upgrade_once_serving() {
    let server = Server::start("http_server");
    let (new, from) = upgrade_to_faulty(&server, "slow-ready=500");
    for _ in 0..3 {
        signal(new, libc::SIGHUP);
    }
    let (_, line) = server
        .events
        .wait(from, DEADLINE, "the kept SIGHUP to run", |l| {
            l.is("upgrade succeeded") && l.num("pid") == u64::from(new)
        });
    let third = line.num("successor") as u32;
    server
        .events
        .wait(from, DEADLINE, "the third generation to be ready", |l| {
            l.is("ready") && l.num("pid") == u64::from(third)
        });
    let started_by_new = server
        .events
        .snapshot()
        .iter()
        .filter(|l| l.starts_with(&format!("upgrade started pid={new} ")))
        .count();
    assert_eq!(
        started_by_new, 1,
        "three SIGHUPs while starting: one upgrade"
    );
}

/// Not every exit of a successor is a crash: one stopped on purpose (exit 0),
/// or one that upgraded again, is never taken back by its predecessor.
#[test]
fn a_successor_that_exits_cleanly_or_upgrades_again_is_not_taken_back() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--probation")
            .arg("30"),
    );
    // Upgraded again: the second generation hands over to a third, which
    // ends the first one's probation at once (not after 30 s).
    let first = server.first_pid;
    let second = server.upgrade().expect("first upgrade");
    let third = server.upgrade().expect("second upgrade");
    assert_eq!(
        wait_exit(first, DEADLINE),
        Some(Some(0)),
        "the first generation exits"
    );
    // Stopped on purpose: SIGTERM to the third generation while the second
    // is in its probation. The second must not resume.
    let from = server.events.len();
    signal(third, libc::SIGTERM);
    // Its parent (the second generation) reaps it; its own line says how it ended.
    server
        .events
        .wait(from, DEADLINE, "the third generation's exit", |l| {
            l.is("exit") && l.num("pid") == u64::from(third) && l.num("cut") == 0
        });
    assert!(wait_exit(third, DEADLINE).is_some());
    assert_eq!(
        wait_exit(second, DEADLINE),
        Some(Some(0)),
        "the second one exits too"
    );
    let lines = server.events.snapshot();
    assert!(
        !lines[from..].iter().any(|l| l.starts_with("resumed")),
        "nobody took the sockets back:\n{}",
        lines.join("\n")
    );
    assert!(
        server
            .stderr_all()
            .contains("the successor exited cleanly; not taking back"),
        "{}",
        server.stderr_tail()
    );
}

/// Accepting when the fd table is full backs off and warns at most once a
/// second (not once per failed accept), and serving resumes when fds free up.
#[test]
fn accept_failures_back_off_with_rate_limited_warnings() {
    let server = Server::start("http_server");
    let pid = server.first_pid;
    let limit = FdLimit::of(pid);
    limit.leave(0);
    // Clients waiting in the backlog: every accept now fails with EMFILE.
    let waiting: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(server.addr()).expect("queued in the backlog"))
        .collect();
    let warnings = || server.stderr_all().matches("accept failed").count();
    server.wait_until("the first accept failure", || warnings() >= 1);
    let since = std::time::Instant::now();
    server.wait_until("two seconds of failing accepts", || {
        since.elapsed() >= std::time::Duration::from_secs(2)
    });
    let count = warnings();
    println!("accept failures: {count} warnings in about 2 s");
    assert!(count <= 4, "at most one warning a second, got {count}");
    limit.restore();
    drop(waiting);
    server.wait_until("serving again", || {
        get(server.addr(), "/").ok().and_then(|r| r.pid()) == Some(pid)
    });
}

/// In the server before `exec`: a seccomp filter that makes every
/// `pidfd_open` fail with `EMFILE` (inherited by everything it starts).
#[cfg(target_arch = "x86_64")]
fn deny_pidfd_open() -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let filter = [
        stmt(load, 4), // seccomp_data.arch
        jump(AUDIT_ARCH_X86_64, 0, 3),
        stmt(load, 0), // seccomp_data.nr
        jump(libc::SYS_pidfd_open as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EMFILE as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with these options reads `program` (alive here) and only
    // changes this process's own syscall filter.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `pidfd_open` fails after the fork (EMFILE, or a seccomp policy): the new
/// process is killed and reaped, the upgrade fails with the reason, nothing
/// hangs, and SIGTERM still stops the server.
#[test]
fn a_failing_pidfd_open_rolls_back_without_a_hang() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("SKIPPED: the seccomp filter is written for x86_64");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let server = Server::start_with(Options {
            pre_exec: Some(deny_pidfd_open),
            ..Options::new("http_server")
                .arg("--listen")
                .arg("127.0.0.1:0")
        });
        let pid = server.first_pid;
        let error = server.upgrade().expect_err("no pidfd, no upgrade");
        assert!(error.contains("cannot open a pidfd"), "{error}");
        server.wait_until("the new process to be killed and reaped", || {
            server.processes() == vec![pid] && common::zombie_children(pid).is_empty()
        });
        assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(pid));
        signal(pid, libc::SIGTERM);
        assert_eq!(
            wait_exit(pid, DEADLINE),
            Some(Some(0)),
            "SIGTERM still works"
        );
    }
}
