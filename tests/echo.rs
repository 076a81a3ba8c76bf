//! The `echo_server` example: a line in flight when the upgrade happens is
//! answered by the old process, and a load of short connections sees no
//! failure through several upgrades.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, DEADLINE};

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, DEADLINE).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// Sends one line on a new connection and returns the reply.
fn echo_once(addr: SocketAddr, line: &str) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, DEADLINE).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    if reply.is_empty() {
        return Err("closed without a reply".into());
    }
    Ok(reply)
}

#[test]
fn a_half_sent_line_is_answered_by_the_old_process() {
    let server = Server::start("echo_server");
    let old = server.first_pid;
    let mut stream = connect(server.addr());
    stream.write_all(b"hel").unwrap();
    // Make sure the old process holds the connection before the upgrade.
    let mut probe = connect(server.addr());
    probe.write_all(b"probe\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&mut probe).read_line(&mut reply).unwrap();
    assert_eq!(reply, format!("{old} probe\n"));
    drop(probe);

    let new = server.upgrade().expect("upgrade");
    server
        .events
        .wait(0, DEADLINE, "the old process to stop accepting", |l| {
            l.is("stopping") && l.num("pid") == u64::from(old)
        });
    // The old process is draining and still owes this connection a reply.
    stream.write_all(b"lo\n").unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).expect("reply, then EOF");
    assert_eq!(
        rest,
        format!("{old} hello\n"),
        "answered by the old process, then closed"
    );
    assert_eq!(
        echo_once(server.addr(), "hi").unwrap(),
        format!("{new} hi\n")
    );
    assert_eq!(common::wait_exit(old, DEADLINE), Some(Some(0)));
}

#[test]
fn short_connections_see_no_failure_through_upgrades() {
    let server = Server::start("echo_server");
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, exchanges) = (stop.clone(), exchanges.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let (mut ok, mut errors) = (0u64, Vec::new());
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                    let line = format!("client{i}-{ok}");
                    match echo_once(addr, &line) {
                        Ok(reply) if reply.ends_with(&format!(" {line}\n")) => {
                            ok += 1;
                            exchanges.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(reply) => errors.push(format!("wrong reply {reply:?}")),
                        Err(error) => errors.push(error),
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    let progressed = |n: u64| {
        let target = exchanges.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + DEADLINE;
        while exchanges.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the clients made no progress");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    progressed(50);
    for _ in 0..5 {
        server.upgrade_ok();
        progressed(50);
    }
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut errors) = (0, Vec::new());
    for client in clients {
        let (n, e) = client.join().unwrap();
        ok += n;
        errors.extend(e);
    }
    println!("echo: {ok} exchanges, {} failed", errors.len());
    assert!(errors.is_empty(), "failed exchanges: {errors:?}");
    assert!(ok > 100, "the load ran: {ok}");
}

/// A take-back after the drain already cut its connections: the cut is over
/// for the connections accepted afterwards, which are served as before (a
/// stale cut signal would close each the moment it is accepted).
#[test]
fn connections_after_a_take_back_that_followed_a_cut_are_served() {
    let server = Server::start_with(
        common::Options::new("echo_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--drain-timeout")
            .arg("0.2")
            .arg("--probation")
            .arg("10"),
    );
    let old = server.first_pid;
    // An idle connection the old process holds: the drain cuts it.
    let mut held = connect(server.addr());
    held.write_all(b"held\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&mut held).read_line(&mut reply).unwrap();
    assert_eq!(reply, format!("{old} held\n"));

    server.inject_fault("echo_server", "abort-after-ready=1500");
    let from = server.events.len();
    common::signal(old, libc::SIGHUP);
    let (_, exit_of_drain) =
        server
            .events
            .wait(from, DEADLINE, "the old process's drain to cut", |l| {
                l.is("stopping") && l.num("pid") == u64::from(old)
            });
    println!("{}", exit_of_drain.raw);
    server.events.wait(from, DEADLINE, "the take-back", |l| {
        l.is("resumed") && l.num("pid") == u64::from(old)
    });
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the held connection was closed by the cut");
    for i in 0..5 {
        let line = format!("after-take-back-{i}");
        let reply = echo_once(server.addr(), &line).expect("served after the take-back");
        assert_eq!(reply, format!("{old} {line}\n"));
    }
}
