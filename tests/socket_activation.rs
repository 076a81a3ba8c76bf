//! Socket activation by the real `systemd-socket-activate`: the server takes
//! the two named sockets it was given, and every later generation serves on
//! the very same kernel sockets (same inode), through upgrades under load.

mod common;

use common::load::Load;
use common::{free_port, socket_inode, Options, Server};

#[test]
fn activated_sockets_are_kept_through_10_upgrades_under_load() {
    let tool = "/usr/bin/systemd-socket-activate";
    if !std::path::Path::new(tool).exists() {
        eprintln!("SKIPPED: {tool} is missing (Debian package `systemd`); .ci/run installs it");
        return;
    }
    let (a, b) = (free_port(), free_port());
    let mut options = Options::new("http_server");
    options.wrapper = vec![
        tool.into(),
        "-l".into(),
        a.to_string(),
        "-l".into(),
        b.to_string(),
        "--fdname=http0:http1".into(),
        // It passes only the variables named here; the harness needs its tag
        // (to find and kill every generation) and the log level.
        "-E".into(),
        "TEST_SERVER_TAG".into(),
        "-E".into(),
        "RUST_LOG".into(),
    ];
    options.connect_first = Some(a);
    let options = options
        .arg("--listen")
        .arg(a.to_string())
        .arg("--listen")
        .arg(b.to_string());
    let server = Server::start_with(options);
    assert_eq!(
        server.addrs,
        vec![a, b],
        "it serves on the activated sockets"
    );
    // The sockets systemd-socket-activate bound sit at fds 3 and 4.
    let inodes = |pid| [socket_inode(pid, 3), socket_inode(pid, 4)];
    let original = inodes(server.first_pid);
    assert!(
        original.iter().all(Option::is_some),
        "fds 3 and 4 are sockets"
    );

    let (load_a, load_b) = (Load::start(a, 2, 2), Load::start(b, 2, 2));
    load_a.wait_for_more(100);
    for _ in 0..10 {
        let pid = server.upgrade_ok();
        assert_eq!(
            inodes(pid),
            original,
            "generation with pid {pid} got the same sockets"
        );
        load_a.wait_for_more(50);
        load_b.wait_for_more(50);
    }
    let (stats_a, stats_b) = (load_a.stop(), load_b.stop());
    println!(
        "socket activation: {} + {} requests ok, {} + {} failed",
        stats_a.ok, stats_b.ok, stats_a.failed, stats_b.failed
    );
    assert_eq!(
        stats_a.failed + stats_b.failed,
        0,
        "failed: {:?} {:?}",
        stats_a.errors,
        stats_b.errors
    );
}
