//! Every kind of named fd survives upgrades: TCP on IPv4 and IPv6, UDP, Unix
//! stream and datagram sockets, and a plain file. When the last generation
//! stops, the Unix socket paths the service bound are removed.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;

use common::{signal, wait_exit, Options, Server, DEADLINE};

fn read_all(mut stream: impl Read) -> String {
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the answer");
    text
}

fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Asks every socket who answers, and checks it is `pid`.
fn all_answer(server: &Server, udp: SocketAddr, dir: &Path, pid: u32) {
    for addr in &server.addrs {
        let stream = TcpStream::connect_timeout(addr, DEADLINE).expect("connect tcp");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(read_all(stream), format!("{pid} tcp\n"), "tcp {addr}");
    }
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client.send_to(b"who", udp).unwrap();
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).expect("udp reply");
    assert_eq!(&buf[..n], format!("{pid} udp").as_bytes());

    let stream = UnixStream::connect(dir.join("stream.sock")).expect("connect unix");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(read_all(stream), format!("{pid} unix\n"));

    let reply_path = dir.join(format!("client-{pid}.sock"));
    let client = UnixDatagram::bind(&reply_path).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client.send_to(b"who", dir.join("dgram.sock")).unwrap();
    let n = client.recv(&mut buf).expect("unix datagram reply");
    assert_eq!(&buf[..n], format!("{pid} unix-dgram").as_bytes());
    std::fs::remove_file(reply_path).unwrap();
}

fn start_every_kind(dir: &Path) -> (Server, SocketAddr) {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut options = Options::new("multi_socket").arg("--tcp").arg("127.0.0.1:0");
    if ipv6_loopback() {
        options = options.arg("--tcp").arg("[::1]:0");
    }
    let options = options
        .arg("--udp")
        .arg("127.0.0.1:0")
        .arg("--unix")
        .arg(path("stream.sock"))
        .arg("--unix-dgram")
        .arg(path("dgram.sock"))
        .arg("--log")
        .arg(path("server.log"));
    let server = Server::start_with(options);
    let (_, listening) = server
        .events
        .wait(0, DEADLINE, "the listening line", |l| l.is("listening"));
    let udp: SocketAddr = listening.get("udp").parse().expect("udp address");
    (server, udp)
}

/// A successor that crashes right after it said ready: the old process
/// takes every kind of socket back and answers on each again.
#[test]
fn every_kind_of_fd_is_taken_back_from_a_successor_that_crashes() {
    let dir = common::TempDir::new("fd-kinds-take-back");
    let (server, udp) = start_every_kind(dir.path());
    let old = server.first_pid;
    server.inject_fault("multi_socket", "abort-after-ready=30");
    let from = server.events.len();
    server.upgrade().expect("the upgrade itself succeeds");
    server.events.wait(from, DEADLINE, "the take-back", |l| {
        l.is("resumed") && l.num("pid") == u64::from(old)
    });
    all_answer(&server, udp, dir.path(), old);
    assert_eq!(server.serving_pid(), old);
}

#[test]
fn every_kind_of_fd_is_handed_over_and_cleaned_up() {
    let dir = common::TempDir::new("fd-kinds");
    let (server, udp) = start_every_kind(dir.path());
    all_answer(&server, udp, dir.path(), server.first_pid);

    // Rename the log: later generations must keep writing through the fd
    // they inherit, not reopen the path.
    std::fs::rename(dir.path().join("server.log"), dir.path().join("moved.log")).unwrap();
    let mut pids = vec![server.first_pid];
    for _ in 0..3 {
        let pid = server.upgrade_ok();
        all_answer(&server, udp, dir.path(), pid);
        pids.push(pid);
    }
    let log = std::fs::read_to_string(dir.path().join("moved.log")).unwrap();
    let expected: Vec<String> = pids
        .iter()
        .enumerate()
        .map(|(i, pid)| format!("pid={pid} generation={}", i + 1))
        .collect();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        expected,
        "one line per generation, one file"
    );
    assert!(
        !dir.path().join("server.log").exists(),
        "nobody reopened the log path"
    );

    // The last generation stops for good: it removes the socket paths the
    // first generation bound, and its PID file.
    let last = *pids.last().unwrap();
    signal(last, libc::SIGTERM);
    assert_eq!(wait_exit(last, DEADLINE), Some(Some(0)));
    assert!(
        !dir.path().join("stream.sock").exists(),
        "stream socket path removed"
    );
    assert!(
        !dir.path().join("dgram.sock").exists(),
        "datagram socket path removed"
    );
    assert!(!server.pid_file.exists(), "PID file removed");
}
