//! uvicorn (it takes only fd 3 and sends no `READY=1`) under `handoff run
//! --ready http=URL`, where the URL is the shared socket the old child
//! also accepts on: the probe counts only the new child's answers.

mod common;

use std::time::{Duration, Instant};

use common::http::get;
use common::peers::{exec_module, SERVERS};
use common::supervised::{text, write_launcher, Supervised};
use common::DEADLINE;

fn uvicorn(app: &str) -> Option<String> {
    let uvicorn = exec_module("uvicorn")?;
    let servers = SERVERS;
    Some(format!(
        "{uvicorn} --fd 3 --app-dir {servers} --no-access-log {app}"
    ))
}

#[test]
fn a_readiness_probe_is_never_answered_by_the_old_child() {
    let (Some(good), Some(hung)) = (uvicorn("asgi_app:app"), uvicorn("asgi_app:hung")) else {
        return;
    };
    // The probe goes to the very socket both generations accept on. (The
    // timeout leaves a loaded machine time to import uvicorn and then
    // probe until the new child accepts one of the connections.)
    let sup = Supervised::start_child(
        &["--ready", "http=http://{addr}/", "--upgrade-timeout", "10s"],
        &[],
        Some(&|_| good.clone()),
    );
    let old = sup.wait_serving();

    // A deploy whose startup hangs: uvicorn never accepts, the old child
    // answers every probe; that is not readiness.
    write_launcher(&sup.launcher, &hung);
    let start = Instant::now();
    let out = sup.upgrade();
    let error = text(&out.stderr);
    println!(
        "hung deploy: handoff upgrade exit {:?} after {:?}: {}",
        out.status.code(),
        start.elapsed(),
        error.trim()
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the upgrade failed\n{}",
        sup.log()
    );
    assert!(error.contains("was not ready within 10s"), "{error}");
    assert_eq!(
        get(sup.addr, "/").expect("GET /").pid(),
        Some(old),
        "the old uvicorn serves on"
    );

    // A good deploy is ready by its own answer, on the same shared socket.
    write_launcher(&sup.launcher, &good);
    let out = sup.upgrade();
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), sup.log());
    let new: u32 = text(&out.stdout).trim().parse().expect("the new PID");
    let deadline = Instant::now() + DEADLINE;
    while get(sup.addr, "/").ok().and_then(|r| r.pid()) != Some(new) {
        assert!(
            Instant::now() < deadline,
            "new connections never reached {new}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
