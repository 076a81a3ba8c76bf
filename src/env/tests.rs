//! The tests of `env.rs`: parsing every start mode, strictly.

use super::*;

fn run(vars: &[(&str, &str)], pid: u32) -> Result<StartEnv, EnvError> {
    run_with_memfd(vars, pid, |fd| {
        panic!("no memfd in this test, yet fd {fd} was read")
    })
}

/// [`run`], with `memfd` reading the `HANDOFF_VARS_FD` memfd.
fn run_with_memfd(
    vars: &[(&str, &str)],
    pid: u32,
    memfd: impl FnOnce(RawFd) -> Result<Vec<u8>, String>,
) -> Result<StartEnv, EnvError> {
    parse(
        |name| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| OsString::from(value))
        },
        pid,
        memfd,
    )
}

fn err(vars: &[(&str, &str)]) -> String {
    run(vars, 100).expect_err("must be rejected").to_string()
}

const GOOD: [(&str, &str); 5] = [
    ("HANDOFF_GENERATION", "3"),
    ("HANDOFF_CHANNEL_FD", "5"),
    ("LISTEN_PID", "100"),
    ("LISTEN_FDS", "2"),
    ("LISTEN_FDNAMES", "http:admin"),
];

/// The good successor environment with `var` set to `value`.
fn with<'a>(var: &'a str, value: &str) -> Vec<(&'a str, String)> {
    let mut vars: Vec<(&str, String)> = GOOD
        .iter()
        .filter(|(k, _)| *k != var)
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect();
    vars.push((var, value.to_owned()));
    vars
}

fn err_with(var: &str, value: &str) -> String {
    let vars = with(var, value);
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    err(&refs)
}

#[test]
fn successor_is_parsed() {
    let env = run(&GOOD, 100).unwrap();
    assert_eq!(env.mode, StartMode::Successor);
    assert_eq!(env.generation, 3);
    assert_eq!(
        env.fds,
        vec![(3, Some("http".to_owned())), (4, Some("admin".to_owned()))]
    );
    assert_eq!(env.channel, Some(5));
}

#[test]
fn socket_path_identities_follow_the_fds() {
    let vars = with("HANDOFF_SOCKET_PATHS", "2049,77,1700000000,5:");
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let env = run(&refs, 100).unwrap();
    assert_eq!(env.path_ids.len(), 2);
    assert_eq!(
        env.path_ids[0].map(|id| id.to_string()).as_deref(),
        Some("2049,77,1700000000,5")
    );
    assert_eq!(env.path_ids[1], None);
}

#[test]
fn nothing_set_is_fresh() {
    let env = run(&[], 100).unwrap();
    assert_eq!(env.mode, StartMode::Fresh);
    assert_eq!(env.generation, 1);
    assert!(env.fds.is_empty());
}

#[test]
fn garbage_in_each_variable_names_it() {
    for (var, value) in [
        ("HANDOFF_GENERATION", "two"),
        ("HANDOFF_GENERATION", "1"),
        ("HANDOFF_GENERATION", "-4"),
        ("HANDOFF_GENERATION", "99999999999999999999999"),
        ("LISTEN_PID", "abc"),
        ("LISTEN_PID", "101"),
        ("LISTEN_FDS", "2x"),
        ("LISTEN_FDS", " 2"),
        ("LISTEN_FDS", "100000000"),
        ("LISTEN_FDNAMES", "http"),
        ("LISTEN_FDNAMES", "http:admin:extra"),
        ("LISTEN_FDNAMES", "http:http"),
        ("LISTEN_FDNAMES", "http:"),
        ("LISTEN_FDNAMES", "http:bad\u{7}name"),
        ("HANDOFF_CHANNEL_FD", "4"),
        ("HANDOFF_CHANNEL_FD", "x"),
        ("HANDOFF_NOTIFY_UPSTREAM", "relative/path"),
        ("HANDOFF_SOCKET_PATHS", "1,2,3,4"),
        ("HANDOFF_SOCKET_PATHS", "1,2,3:"),
        ("HANDOFF_SOCKET_PATHS", "1,2,3,4,5:"),
        ("HANDOFF_SOCKET_PATHS", "a,b,c,d:"),
    ] {
        let message = err_with(var, value);
        assert!(message.contains(var), "{var}={value:?}: {message}");
    }
}

#[test]
fn a_generation_above_the_bound_is_refused() {
    let vars = with("HANDOFF_GENERATION", &MAX_GENERATION.to_string());
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(run(&refs, 100).unwrap().generation, MAX_GENERATION);
    for value in [
        (MAX_GENERATION + 1).to_string(),
        u64::MAX.to_string(),
        (u64::MAX - 1).to_string(),
    ] {
        let message = err_with("HANDOFF_GENERATION", &value);
        assert!(message.contains("HANDOFF_GENERATION"), "{value}: {message}");
        assert!(
            message.contains(&MAX_GENERATION.to_string()),
            "{value}: {message}"
        );
    }
}

#[test]
fn successor_requires_its_companions() {
    for missing in ["HANDOFF_CHANNEL_FD", "LISTEN_PID", "LISTEN_FDNAMES"] {
        let vars: Vec<(&str, &str)> = GOOD
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let message = err(&vars);
        assert!(message.contains(missing), "{missing}: {message}");
    }
}

#[test]
fn activation_follows_sd_listen_fds() {
    let env = run(&[("LISTEN_PID", "100"), ("LISTEN_FDS", "2")], 100).unwrap();
    assert_eq!(env.mode, StartMode::SocketActivated);
    assert_eq!(env.fds, vec![(3, None), (4, None)]);
    // Another process's fds are not ours: ignored, not an error.
    let env = run(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "2")], 100).unwrap();
    assert_eq!(env.mode, StartMode::Fresh);
    // No LISTEN_PID at all: ignored, as sd_listen_fds does.
    let env = run(&[("LISTEN_FDS", "2")], 100).unwrap();
    assert!(env.fds.is_empty());
    // systemd may repeat names (one socket unit, several ListenStream=).
    let env = run(
        &[
            ("LISTEN_PID", "100"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "web:web"),
        ],
        100,
    )
    .unwrap();
    assert_eq!(env.fds.len(), 2);
    for (vars, var) in [
        (
            &[("LISTEN_PID", "x1"), ("LISTEN_FDS", "1")][..],
            "LISTEN_PID",
        ),
        (
            &[("LISTEN_PID", "100"), ("LISTEN_FDS", "0")][..],
            "LISTEN_FDS",
        ),
        (
            &[("LISTEN_PID", "100"), ("LISTEN_FDS", "one")][..],
            "LISTEN_FDS",
        ),
        (
            &[
                ("LISTEN_PID", "100"),
                ("LISTEN_FDS", "1"),
                ("LISTEN_FDNAMES", "a:b"),
            ][..],
            "LISTEN_FDNAMES",
        ),
    ] {
        let message = err(vars);
        assert!(message.contains(var), "{vars:?}: {message}");
    }
}

#[test]
fn a_bad_inherited_name_cannot_break_the_error_line() {
    let message = err_with("LISTEN_FDNAMES", "http:x\nERROR forged\u{1b}[2K");
    assert!(message.contains("LISTEN_FDNAMES"), "{message}");
    assert!(!message.chars().any(char::is_control), "{message}");
}

#[test]
fn names_are_checked() {
    assert_eq!(name_problem("http"), None);
    assert!(name_problem("").is_some());
    assert!(name_problem("a:b").is_some());
    assert!(name_problem(&"x".repeat(256)).is_some());
    assert!(name_problem("tab\there").is_some());
}

/// The good successor environment with the long variables in a memfd
/// (read through `memfd`) instead of `LISTEN_FDNAMES`.
fn run_memfd(
    vars: &[(&str, &str)],
    memfd: impl FnOnce(RawFd) -> Result<Vec<u8>, String>,
) -> Result<StartEnv, EnvError> {
    let mut all: Vec<(&str, &str)> = GOOD
        .iter()
        .copied()
        .filter(|(k, _)| *k != "LISTEN_FDNAMES")
        .collect();
    all.push(("HANDOFF_VARS_FD", "6"));
    for &(var, value) in vars {
        all.retain(|(k, _)| *k != var);
        all.push((var, value));
    }
    run_with_memfd(&all, 100, memfd)
}

#[test]
fn long_variables_are_read_from_the_memfd_after_the_channel() {
    let env = run_memfd(&[], |fd| {
        assert_eq!(fd, 6, "the memfd follows the channel (fd 5)");
        Ok(b"LISTEN_FDNAMES=http:admin\0HANDOFF_SOCKET_PATHS=:2049,77,1700000000,5\0".to_vec())
    })
    .unwrap();
    assert_eq!(
        env.fds,
        vec![(3, Some("http".to_owned())), (4, Some("admin".to_owned()))]
    );
    assert_eq!(env.path_ids[0], None);
    assert_eq!(
        env.path_ids[1].map(|id| id.to_string()).as_deref(),
        Some("2049,77,1700000000,5")
    );
    assert_eq!(env.channel, Some(5));
}

#[test]
fn a_bad_memfd_or_its_announcement_is_an_error_naming_it() {
    let never = |fd: RawFd| -> Result<Vec<u8>, String> { panic!("fd {fd} must not be read") };
    for value in ["5", "7", "x", ""] {
        let message = run_memfd(&[("HANDOFF_VARS_FD", value)], never)
            .expect_err(value)
            .to_string();
        assert!(message.contains("HANDOFF_VARS_FD"), "{value:?}: {message}");
    }
    let refused = |reason: &str| {
        let reason = reason.to_owned();
        run_memfd(&[], move |_| Err(reason))
            .expect_err("must be rejected")
            .to_string()
    };
    let message = refused("fd 6 is not a memfd but a pipe");
    assert!(
        message.contains("HANDOFF_VARS_FD") && message.contains("not a memfd but a pipe"),
        "{message}"
    );
    for (content, why) in [
        (&b""[..], "empty"),
        (b"LISTEN_FDNAMES=http:admin", "NUL"),
        (b"LISTEN_FDNAMES=http:admin\0LISTEN_FDNAMES=a:b\0", "twice"),
        (
            b"LISTEN_FDS=2\0",
            "only LISTEN_FDNAMES and HANDOFF_SOCKET_PATHS",
        ),
        (
            b"PATH=/bin\0",
            "only LISTEN_FDNAMES and HANDOFF_SOCKET_PATHS",
        ),
        (b"LISTEN_FDNAMES\0", "not NAME=value"),
        (b"LISTEN_FDNAMES=http:\xff\0", "UTF-8"),
    ] {
        let content = content.to_vec();
        let message = run_memfd(&[], move |_| Ok(content))
            .expect_err(why)
            .to_string();
        assert!(
            message.contains("HANDOFF_VARS_FD") && message.contains(why),
            "{why}: {message}"
        );
    }
    // In both places: which one counts would be a guess.
    let message = run_memfd(&[("LISTEN_FDNAMES", "http:admin")], |_| {
        Ok(b"LISTEN_FDNAMES=http:admin\0".to_vec())
    })
    .expect_err("twice")
    .to_string();
    assert!(
        message.contains("HANDOFF_VARS_FD") && message.contains("both"),
        "{message}"
    );
    // Wrong content inside a variable names it, and where it came from.
    for (content, var) in [
        (&b"LISTEN_FDNAMES=http\0"[..], "LISTEN_FDNAMES"),
        (b"LISTEN_FDNAMES=http:http\0", "LISTEN_FDNAMES"),
        (
            b"LISTEN_FDNAMES=http:admin\0HANDOFF_SOCKET_PATHS=1,2,3\0",
            "HANDOFF_SOCKET_PATHS",
        ),
    ] {
        let content = content.to_vec();
        let message = run_memfd(&[], move |_| Ok(content))
            .expect_err(var)
            .to_string();
        assert!(
            message.contains(var) && message.contains("read from HANDOFF_VARS_FD"),
            "{var}: {message}"
        );
    }
    // Without LISTEN_FDNAMES anywhere the successor's fds have no names.
    let message = run_memfd(&[], |_| Ok(b"HANDOFF_SOCKET_PATHS=:\0".to_vec()))
        .expect_err("no names")
        .to_string();
    assert!(message.contains("LISTEN_FDNAMES is missing"), "{message}");
}

#[test]
fn a_long_value_is_cut_in_the_error() {
    let names = vec!["http"; 50_000].join(":");
    let message = err_with("LISTEN_FDNAMES", &names);
    assert!(message.contains("LISTEN_FDNAMES"), "{message}");
    assert!(message.contains("(249999 bytes)"), "{message}");
    assert!(message.len() < 1_000, "{} bytes", message.len());
}
