//! Ordered, bounded shutdown: components registered in stages close stage
//! after stage (say: stop taking HTTP requests, then let the workers finish
//! their jobs, then flush the stores), each stage within its own deadline and
//! the whole within an overall one. The outcome is a [`ShutdownReport`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Close = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send>;

struct Component {
    name: String,
    close: Close,
}

/// One stage: its components close together (or one by one), within a deadline.
pub struct Stage {
    name: String,
    deadline: Duration,
    sequential: bool,
    components: Vec<Component>,
}

impl Stage {
    /// Close this stage's components one after another, in the order added,
    /// instead of all at once.
    pub fn sequential(&mut self) -> &mut Self {
        self.sequential = true;
        self
    }

    /// Adds a component: `close` runs when its stage comes; an `Err` is
    /// reported as a failure.
    ///
    /// ```
    /// let mut shutdown = handoff::Shutdown::new(std::time::Duration::from_secs(10));
    /// shutdown
    ///     .stage("stores", std::time::Duration::from_secs(5))
    ///     .add("db", || async { Ok::<(), std::io::Error>(()) });
    /// ```
    pub fn add<F, Fut, E>(&mut self, name: &str, close: F) -> &mut Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        self.components.push(Component {
            name: name.to_owned(),
            close: Box::new(move || {
                let future = close();
                Box::pin(async move { future.await.map_err(|e| e.to_string()) })
            }),
        });
        self
    }
}

/// The shutdown plan: stages in order, and the overall deadline.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// let mut shutdown = handoff::Shutdown::new(Duration::from_secs(30));
/// shutdown.stage("http", Duration::from_secs(10)).add("listener", || async { Ok::<(), String>(()) });
/// shutdown.stage("stores", Duration::from_secs(5)).add("db", || async { Ok::<(), String>(()) });
/// let report = shutdown.run(std::future::pending()).await;
/// assert_eq!(report.exit_code(), 0);
/// # }
/// ```
pub struct Shutdown {
    overall: Duration,
    stages: Vec<Stage>,
}

/// How one component's close went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It closed.
    Closed,
    /// It returned an error.
    Failed(String),
    /// It missed its stage's deadline (or the overall one); it was abandoned.
    TimedOut,
    /// Its stage never came: the shutdown was forced or ran out of time first.
    Skipped,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct ComponentReport {
    /// The stage it belongs to.
    pub stage: String,
    /// The component's name.
    pub name: String,
    /// How it went.
    pub outcome: Outcome,
    /// How long its close ran.
    pub elapsed: Duration,
}

/// The outcome of a shutdown.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    /// Every component, in the order they were registered.
    pub components: Vec<ComponentReport>,
    /// The overall deadline passed.
    pub overall_timed_out: bool,
    /// A force signal (a second `SIGTERM`) ended it.
    pub forced: bool,
    /// How long it took.
    pub elapsed: Duration,
}

impl ShutdownReport {
    /// The components that missed a deadline or were never closed.
    pub fn late(&self) -> Vec<&str> {
        self.components
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::TimedOut | Outcome::Skipped))
            .map(|c| c.name.as_str())
            .collect()
    }

    /// An exit status: 0 when every component closed, 1 when one failed or
    /// missed its stage deadline, 2 when the shutdown was forced (a second
    /// signal) or ran out of overall time.
    pub fn exit_code(&self) -> u8 {
        if self.forced || self.overall_timed_out {
            2
        } else if self.components.iter().all(|c| c.outcome == Outcome::Closed) {
            0
        } else {
            1
        }
    }
}

impl Shutdown {
    /// A plan that must finish within `overall`.
    pub fn new(overall: Duration) -> Self {
        Shutdown {
            overall,
            stages: Vec::new(),
        }
    }

    /// The overall deadline.
    pub(crate) fn overall(&self) -> Duration {
        self.overall
    }

    /// Adds a stage, run after the stages added before it.
    pub fn stage(&mut self, name: &str, deadline: Duration) -> &mut Stage {
        self.stages.push(Stage {
            name: name.to_owned(),
            deadline,
            sequential: false,
            components: Vec::new(),
        });
        self.stages.last_mut().expect("just pushed")
    }

    /// Runs the stages in order. `force` (e.g. [`Handoff::forced`](crate::Handoff::forced))
    /// ends the shutdown at once: what is still closing is abandoned.
    pub async fn run(self, force: impl Future<Output = ()>) -> ShutdownReport {
        let start = Instant::now();
        let overall = tokio::time::sleep(self.overall);
        tokio::pin!(overall, force);
        let mut report = ShutdownReport {
            components: Vec::new(),
            overall_timed_out: false,
            forced: false,
            elapsed: Duration::ZERO,
        };
        for stage in self.stages {
            if report.forced || report.overall_timed_out {
                for c in stage.components {
                    report.components.push(ComponentReport {
                        stage: stage.name.clone(),
                        name: c.name,
                        outcome: Outcome::Skipped,
                        elapsed: Duration::ZERO,
                    });
                }
                continue;
            }
            tracing::info!(stage = %stage.name, components = stage.components.len(), "shutdown stage");
            let deadline = tokio::time::sleep(stage.deadline);
            tokio::pin!(deadline);
            let groups: Vec<Vec<Component>> = if stage.sequential {
                stage.components.into_iter().map(|c| vec![c]).collect()
            } else {
                vec![stage.components]
            };
            let mut stage_over = false;
            for group in groups {
                let names: Vec<String> = group.iter().map(|c| c.name.clone()).collect();
                let mut results: Vec<Option<(Outcome, Duration)>> = vec![None; names.len()];
                if !stage_over {
                    let mut set = JoinSet::new();
                    // A panicking close leaves only its task id: which
                    // component it was, and since when it ran.
                    let mut tasks = HashMap::new();
                    for (i, c) in group.into_iter().enumerate() {
                        let started = Instant::now();
                        let task =
                            set.spawn(async move { (i, (c.close)().await, started.elapsed()) });
                        tasks.insert(task.id(), (i, started));
                    }
                    loop {
                        tokio::select! {
                            joined = set.join_next() => match joined {
                                None => break,
                                Some(Ok((i, result, took))) => {
                                    let outcome = result.map_or_else(Outcome::Failed, |()| Outcome::Closed);
                                    results[i] = Some((outcome, took));
                                }
                                Some(Err(e)) => {
                                    if let Some(&(i, started)) = tasks.get(&e.id()) {
                                        let outcome = Outcome::Failed(join_error_message(e));
                                        results[i] = Some((outcome, started.elapsed()));
                                    }
                                }
                            },
                            () = &mut deadline => { stage_over = true; break; }
                            () = &mut overall => { report.overall_timed_out = true; stage_over = true; break; }
                            () = &mut force => { report.forced = true; stage_over = true; break; }
                        }
                    }
                    set.abort_all();
                }
                for (name, result) in names.into_iter().zip(results) {
                    let (outcome, elapsed) = result.unwrap_or(if stage_over {
                        (Outcome::TimedOut, stage.deadline.min(start.elapsed()))
                    } else {
                        (Outcome::Skipped, Duration::ZERO)
                    });
                    log(&stage.name, &name, &outcome, elapsed);
                    report.components.push(ComponentReport {
                        stage: stage.name.clone(),
                        name,
                        outcome,
                        elapsed,
                    });
                }
            }
        }
        report.elapsed = start.elapsed();
        let late = report.late();
        if late.is_empty() {
            tracing::info!(ms = report.elapsed.as_millis() as u64, "shutdown complete");
        } else {
            tracing::warn!(ms = report.elapsed.as_millis() as u64, late = ?late, forced = report.forced, "shutdown incomplete");
        }
        report
    }
}

/// What a close task that did not return says: its panic message where
/// there is one (a `&str` or `String` payload), else just that it panicked.
fn join_error_message(error: tokio::task::JoinError) -> String {
    if !error.is_panic() {
        return "cancelled".to_owned();
    }
    let payload = error.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    match message {
        Some(message) => format!("panicked: {message}"),
        None => "panicked".to_owned(),
    }
}

fn log(stage: &str, name: &str, outcome: &Outcome, elapsed: Duration) {
    let ms = elapsed.as_millis() as u64;
    match outcome {
        Outcome::Closed => tracing::info!(stage, component = name, ms, "closed"),
        Outcome::Failed(error) => {
            tracing::error!(stage, component = name, ms, %error, "close failed")
        }
        Outcome::TimedOut => tracing::warn!(stage, component = name, ms, "close timed out"),
        Outcome::Skipped => {
            tracing::warn!(stage, component = name, "not closed: shutdown ended first")
        }
    }
}

/// Background workers: each gets a cancellation token that says "take no new
/// work", and a tracker the shutdown waits on, so each finishes its current
/// job. A worker spawned after the shutdown began is still tracked.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let workers = handoff::Workers::new();
/// workers.spawn(|stop| async move {
///     while !stop.is_cancelled() {
///         // take a job, finish it
///         tokio::select! { _ = stop.cancelled() => break, _ = tokio::task::yield_now() => {} }
///     }
/// });
/// workers.close().await; // cancels, then waits for every worker
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Workers {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Workers {
    /// No workers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a tracked worker; `work` gets the token that is cancelled when
    /// the shutdown begins.
    pub fn spawn<F, Fut>(&self, work: F) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work(self.stop.clone()))
    }

    /// The token workers watch.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Tells every worker to stop taking work and waits until all are done
    /// (including any spawned from now on).
    pub async fn close(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> (
        Arc<Mutex<Vec<String>>>,
        impl Fn(&str) + Clone + Send + 'static,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let log = log.clone();
            move |s: &str| log.lock().unwrap().push(s.to_owned())
        };
        (log, writer)
    }

    fn sleeper(
        ms: u64,
        note: impl Fn(&str) + Send + 'static,
        name: &'static str,
    ) -> impl FnOnce() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        move || {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                note(name);
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn stages_run_in_order_and_a_stage_closes_concurrently() {
        let (log, note) = recorder();
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        shutdown
            .stage("first", Duration::from_secs(10))
            .add("a", sleeper(300, note.clone(), "a"))
            .add("b", sleeper(300, note.clone(), "b"))
            .add("c", sleeper(300, note.clone(), "c"));
        shutdown
            .stage("second", Duration::from_secs(10))
            .add("d", sleeper(10, note.clone(), "d"));
        let started = Instant::now();
        let report = shutdown.run(std::future::pending()).await;
        let took = started.elapsed();
        assert_eq!(report.exit_code(), 0);
        assert_eq!(
            log.lock().unwrap().last().map(String::as_str),
            Some("d"),
            "the second stage ran last"
        );
        // Three 300 ms closes at once: near 300 ms, not 900 ms.
        assert!(
            took < Duration::from_millis(750),
            "concurrent stage took {took:?}"
        );
    }

    #[tokio::test]
    async fn a_sequential_stage_closes_one_after_another() {
        let (log, note) = recorder();
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        shutdown
            .stage("seq", Duration::from_secs(10))
            .sequential()
            .add("slow", sleeper(200, note.clone(), "slow"))
            .add("fast", sleeper(1, note.clone(), "fast"));
        let started = Instant::now();
        let report = shutdown.run(std::future::pending()).await;
        assert_eq!(report.exit_code(), 0);
        assert_eq!(
            *log.lock().unwrap(),
            vec!["slow", "fast"],
            "in the order added"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_hanging_component_times_out_and_later_stages_still_run() {
        let (log, note) = recorder();
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        shutdown
            .stage("first", Duration::from_millis(200))
            .add("hangs", std::future::pending::<Result<(), String>>)
            .add("ok", sleeper(1, note.clone(), "ok"));
        shutdown
            .stage("second", Duration::from_secs(5))
            .add("later", sleeper(1, note.clone(), "later"));
        let report = shutdown.run(std::future::pending()).await;
        let outcome = |n: &str| {
            report
                .components
                .iter()
                .find(|c| c.name == n)
                .unwrap()
                .outcome
                .clone()
        };
        assert_eq!(outcome("hangs"), Outcome::TimedOut);
        assert_eq!(outcome("ok"), Outcome::Closed);
        assert_eq!(outcome("later"), Outcome::Closed);
        assert_eq!(report.late(), vec!["hangs"]);
        assert_eq!(report.exit_code(), 1);
        assert!(log.lock().unwrap().contains(&"later".to_owned()));
    }

    #[tokio::test]
    async fn the_overall_deadline_forces_the_end_and_names_the_late() {
        let mut shutdown = Shutdown::new(Duration::from_millis(300));
        shutdown
            .stage("first", Duration::from_secs(10))
            .add("slow", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<(), String>(())
            });
        shutdown
            .stage("second", Duration::from_secs(10))
            .add("never", || async { Ok::<(), String>(()) });
        let started = Instant::now();
        let report = shutdown.run(std::future::pending()).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(report.overall_timed_out);
        assert_eq!(report.exit_code(), 2);
        assert_eq!(report.late(), vec!["slow", "never"]);
    }

    #[tokio::test]
    async fn failures_and_force_are_reported() {
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        shutdown
            .stage("first", Duration::from_secs(10))
            .add("broken", || async { Err::<(), _>("disk full") });
        shutdown
            .stage("second", Duration::from_secs(10))
            .add("slow", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<(), String>(())
            });
        let report = shutdown
            .run(tokio::time::sleep(Duration::from_millis(200)))
            .await;
        assert_eq!(
            report.components[0].outcome,
            Outcome::Failed("disk full".into())
        );
        assert_eq!(report.components[1].outcome, Outcome::TimedOut);
        assert!(report.forced);
        assert_eq!(report.exit_code(), 2);
    }

    #[tokio::test]
    async fn a_panicking_close_is_a_failure_with_its_message_and_time() {
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        shutdown
            .stage("first", Duration::from_secs(10))
            .add("slow", || async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<(), String>(())
            })
            .add("literal", || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                panic!("disk on fire");
                #[allow(unreachable_code)]
                Ok::<(), String>(())
            })
            .add("formatted", || async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let code = 7;
                panic!("error code {code}");
                #[allow(unreachable_code)]
                Ok::<(), String>(())
            });
        let report = shutdown.run(std::future::pending()).await;
        let component = |n: &str| report.components.iter().find(|c| c.name == n).unwrap();
        assert_eq!(component("slow").outcome, Outcome::Closed);
        for (name, message, at_least) in [
            ("literal", "disk on fire", 50),
            ("formatted", "error code 7", 100),
        ] {
            let c = component(name);
            match &c.outcome {
                Outcome::Failed(error) => assert!(error.contains(message), "{name}: {error}"),
                other => panic!("{name}: {other:?} ({:?})", c.elapsed),
            }
            assert!(
                c.elapsed >= Duration::from_millis(at_least),
                "{name} ran {:?}",
                c.elapsed
            );
        }
        assert_eq!(report.exit_code(), 1);
    }

    #[tokio::test]
    async fn workers_finish_their_job_and_late_ones_are_still_tracked() {
        let workers = Workers::new();
        let done = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let done = done.clone();
            workers.spawn(move |stop| async move {
                // One job in progress when the stop comes: it finishes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                done.lock().unwrap().push(i);
                assert!(stop.is_cancelled(), "the stop came during the job");
            });
        }
        let closing = {
            let workers = workers.clone();
            tokio::spawn(async move { workers.close().await })
        };
        tokio::task::yield_now().await;
        let late = done.clone();
        workers.spawn(move |_| async move { late.lock().unwrap().push(99) });
        closing.await.unwrap();
        let mut finished = done.lock().unwrap().clone();
        finished.sort();
        assert_eq!(finished, vec![0, 1, 2, 99]);
    }
}
