//! 10,000 named TCP listeners and 4,500 Unix ones through upgrades. Their
//! names (`LISTEN_FDNAMES`) and the socket paths' identities
//! (`HANDOFF_SOCKET_PATHS`) are each longer than Linux takes in one
//! environment string (`MAX_ARG_STRLEN`, 128 KiB), so they reach the
//! successor another way; a successor that got them that way hands over
//! again.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::{signal, wait_exit, Line, Options, Server, TempDir, DEADLINE};

const TCP: usize = 10_000;
const UNIX: usize = 4_500;
/// Names such as `listener-with-a-rather-long-name-tcp-00042`: 42 bytes.
const PREFIX: &str = "listener-with-a-rather-long-name";
/// Linux's limit on one argument or environment string (32 pages of 4 KiB).
const MAX_ARG_STRLEN: usize = 32 * 4096;

fn name(kind: &str, i: usize) -> String {
    format!("{PREFIX}-{kind}-{i:05}")
}

/// Sets this process's (and so the server's) soft `RLIMIT_NOFILE` to
/// `want`, raising the hard limit if it is lower and this process may.
fn set_fd_limit(want: u64) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    let hard = limit.rlim_max;
    limit.rlim_cur = want;
    limit.rlim_max = hard.max(want);
    // SAFETY: setrlimit reads one rlimit from the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(format!(
            "RLIMIT_NOFILE is {hard} (hard) and cannot be raised to {want}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn answer(mut stream: impl Read) -> String {
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the answer");
    text
}

/// Every sampled listener of the `listening` line answers `<pid> <name>`.
fn sample_answers(line: &Line, dir: &Path, pid: u32) -> usize {
    let addrs: Vec<SocketAddr> = line
        .get("addrs")
        .split(',')
        .map(|a| a.parse().expect("address"))
        .collect();
    let mut tcp = addrs.iter();
    let mut checked = 0;
    for name in line.get("sample").split(',') {
        let stream: Box<dyn Read> = if name.contains("-tcp-") {
            let addr = tcp.next().expect("an address per sampled TCP name");
            let stream = TcpStream::connect_timeout(addr, DEADLINE).expect("connect");
            stream.set_read_timeout(Some(DEADLINE)).unwrap();
            Box::new(stream)
        } else {
            let i: usize = name.rsplit('-').next().unwrap().parse().unwrap();
            let stream = UnixStream::connect(dir.join(format!("{i}.sock"))).expect("connect");
            stream.set_read_timeout(Some(DEADLINE)).unwrap();
            Box::new(stream)
        };
        assert_eq!(answer(stream), format!("{pid} {name}\n"), "{name}");
        checked += 1;
    }
    checked
}

/// How many memfds of long variables (`HANDOFF_VARS_FD`) `pid` holds.
fn memfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the fd table")
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:handoff-vars"))
        })
        .count()
}

fn listening(server: &Server, pid: u32) -> Line {
    server
        .events
        .wait(0, DEADLINE, "the listening line", |l| {
            l.is("listening") && l.num("pid") == u64::from(pid)
        })
        .1
}

#[test]
fn ten_thousand_named_listeners_and_long_socket_paths_pass_through_two_upgrades() {
    let total = TCP + UNIX;
    // One fd per listener (the example keeps no copy of most), room for the
    // rest, and less than twice as many: a spawn that held two copies of
    // every listener would run out.
    let limit = (total + 2_000) as u64;
    if let Err(why) = set_fd_limit(limit) {
        eprintln!("SKIPPED: {total} listeners need {limit} fds: {why}");
        return;
    }
    let names: usize = (0..TCP).map(|i| name("tcp", i).len()).sum::<usize>()
        + (0..UNIX).map(|i| name("unix", i).len()).sum::<usize>()
        + total
        - 1;
    assert!(
        "LISTEN_FDNAMES=".len() + names + 1 > MAX_ARG_STRLEN,
        "the names must not fit in one environment string: {names} bytes"
    );

    let sockets = TempDir::new("many-listeners-sockets");
    let started = std::time::Instant::now();
    let server = Server::start_with(
        Options::new("many_listeners")
            .arg("--tcp")
            .arg(TCP.to_string())
            .arg("--unix")
            .arg(UNIX.to_string())
            .arg("--unix-dir")
            .arg(sockets.path().to_string_lossy())
            .arg("--name-prefix")
            .arg(PREFIX),
    );
    let first = listening(&server, server.first_pid);
    let digest = first.get("digest").to_owned();
    let mut checked = sample_answers(&first, sockets.path(), server.first_pid);
    println!(
        "{total} listeners bound in {:.2}s; LISTEN_FDNAMES would be {names} bytes",
        started.elapsed().as_secs_f64()
    );

    // What HANDOFF_SOCKET_PATHS holds: one field per fd, the identity
    // `dev,ino,ctime,nsec` of each Unix socket path the service bound.
    let mut paths = total - 1;
    for i in 0..UNIX {
        let meta = std::fs::symlink_metadata(sockets.path().join(format!("{i}.sock")))
            .expect("the socket path exists");
        paths += format!(
            "{},{},{},{}",
            meta.dev(),
            meta.ino(),
            meta.ctime(),
            meta.ctime_nsec()
        )
        .len();
    }
    assert!(
        "HANDOFF_SOCKET_PATHS=".len() + paths + 1 > MAX_ARG_STRLEN,
        "the path identities must not fit in one environment string: {paths} bytes"
    );

    let mut pids = vec![server.first_pid];
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let pid = server.upgrade_ok();
        let line = listening(&server, pid);
        println!(
            "upgrade to generation {} (pid {pid}) in {:.2}s",
            pids.len() + 1,
            started.elapsed().as_secs_f64()
        );
        // Every listener came back under its own name, at its own address.
        assert_eq!(line.get("digest"), digest, "name → address digest");
        assert_eq!(line.get("addrs"), first.get("addrs"));
        assert_eq!(line.get("sample"), first.get("sample"));
        checked += sample_answers(&line, sockets.path(), pid);
        assert_eq!(memfds(pid), 0, "pid {pid} kept the memfd it read");
        pids.push(pid);
    }
    let last = *pids.last().unwrap();
    assert_eq!(
        server.processes(),
        vec![last],
        "only the last generation is left"
    );

    // The last generation stops for good: it removes every socket path the
    // first one bound, which it knows from the identities that came through
    // two handovers.
    signal(last, libc::SIGTERM);
    assert_eq!(wait_exit(last, DEADLINE), Some(Some(0)));
    let left = std::fs::read_dir(sockets.path()).unwrap().count();
    assert_eq!(left, 0, "socket paths left behind");
    println!(
        "{} generations, {checked} sampled listeners answered by name; LISTEN_FDNAMES {names} bytes, HANDOFF_SOCKET_PATHS {paths} bytes",
        pids.len()
    );
}
