//! Symlink-switch deploys: `releases/v1`, `releases/v2` and `current ->
//! releases/vN`, the server started as `cd current && ./http_server` (by a
//! shell, which keeps the logical directory in `PWD`). Switching the symlink
//! and upgrading runs the release it points to now, from that release's
//! directory; switching back rolls back. Both for the library server and
//! for `handoff run`.

mod common;

use std::path::{Path, PathBuf};

use common::supervised::Supervised;
use common::{example_path, Options, Server, TempDir};

/// `dir/releases/v1` and `v2`, each with a copy of `http_server`, and
/// `dir/current -> releases/v1`.
fn releases(dir: &Path) -> PathBuf {
    for release in ["v1", "v2"] {
        let path = dir.join("releases").join(release);
        std::fs::create_dir_all(&path).unwrap();
        let _lock = common::binary_lock();
        std::fs::copy(example_path("http_server"), path.join("http_server")).unwrap();
    }
    switch(dir, "v1");
    dir.join("current")
}

/// Points `current` at `release` the way deploy tools do: a new symlink
/// renamed over the old one, atomically.
fn switch(dir: &Path, release: &str) {
    let next = dir.join("current.next");
    let _ = std::fs::remove_file(&next);
    std::os::unix::fs::symlink(format!("releases/{release}"), &next).unwrap();
    std::fs::rename(&next, dir.join("current")).unwrap();
}

/// The release a process runs from and works in: its binary's and its
/// working directory's release names.
fn release_of(pid: u32) -> (String, String) {
    let name = |link: &str| {
        let target = std::fs::read_link(format!("/proc/{pid}/{link}")).unwrap();
        let release = if link == "exe" {
            target.parent().unwrap().to_path_buf()
        } else {
            target
        };
        release.file_name().unwrap().to_string_lossy().into_owned()
    };
    (name("exe"), name("cwd"))
}

fn both(release: &str) -> (String, String) {
    (release.to_owned(), release.to_owned())
}

/// `cd DIR && exec CMD...` in a shell, as an operator types it.
fn in_dir(dir: &Path) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("cd '{}' && exec \"$@\"", dir.display()),
        "sh".into(),
    ]
}

#[test]
fn the_library_server_upgrades_into_the_release_the_symlink_names() {
    let dir = TempDir::new("releases");
    let current = releases(dir.path());
    // The harness appends its own copy of the binary: the shell skips it
    // and runs ./http_server from `current` instead.
    let mut wrapper = in_dir(&current);
    wrapper[2] = format!(
        "cd '{}' && shift && exec ./http_server \"$@\"",
        current.display()
    );
    let server = Server::start_with(Options {
        wrapper,
        ..Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
    });
    assert_eq!(release_of(server.first_pid), both("v1"));

    switch(dir.path(), "v2");
    let second = server.upgrade_ok();
    assert_eq!(release_of(second), both("v2"), "the deploy took effect");
    // Once more: the successor, started in v2 through `current`, finds it too.
    let third = server.upgrade_ok();
    assert_eq!(release_of(third), both("v2"));
    // A rollback is a switch back.
    switch(dir.path(), "v1");
    let fourth = server.upgrade_ok();
    assert_eq!(release_of(fourth), both("v1"), "the rollback took effect");
}

#[test]
fn handoff_run_starts_each_child_from_the_release_the_symlink_names() {
    let dir = TempDir::new("releases-run");
    let current = releases(dir.path());
    let wrapper = in_dir(&current);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let sup = Supervised::spawn_wrapped(&wrapper, &["./http_server", "--listen", "{addr}"]);
    let first = sup.wait_serving();
    assert_eq!(release_of(first), both("v1"));

    switch(dir.path(), "v2");
    let out = sup.upgrade();
    assert!(
        out.status.success(),
        "{}",
        common::supervised::text(&out.stderr)
    );
    let second: u32 = common::supervised::text(&out.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(release_of(second), both("v2"), "the deploy took effect");
    switch(dir.path(), "v1");
    let out = sup.upgrade();
    assert!(
        out.status.success(),
        "{}",
        common::supervised::text(&out.stderr)
    );
    let third: u32 = common::supervised::text(&out.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(release_of(third), both("v1"), "the rollback took effect");
}
