//! Failpoints in the migration saga, for tests only.
//!
//! Built with the `failpoints` feature (the end-to-end test crate turns it
//! on; `scripts/demo.sh` and packages build without it, where every
//! failpoint compiles to nothing). A failpoint is named after a persisted
//! boundary of the saga, `STEP.before` (the step's start is recorded, its
//! action has not run) or `STEP.after` (the action ran and its end is
//! recorded), and is armed through the `FAILPOINTS` environment variable
//! of ferryd, in `fail`'s syntax: `FAILPOINTS='commit.before=return(crash)'`.
//! The value in `return(…)` picks what happens there:
//!
//! | action | effect |
//! |---|---|
//! | `fail` | the step fails with an injected error (before the commit the saga unwinds; after it, the step is retried) |
//! | `crash` | ferryd kills itself with SIGKILL, right there: the recovery on restart must finish the job |
//! | `twice` | the step's action runs a second time (it must be idempotent) |
//!
//! Omicron's saga test helpers (fail each node, run each node twice, crash
//! between nodes) are the model.

/// What an armed failpoint asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    Fail,
    Twice,
}

/// Evaluates failpoint `name`: `None` when it is not armed (always, in a
/// build without the `failpoints` feature). `crash` does not return.
pub fn check(name: &str) -> Option<Injected> {
    let action = armed(name)?;
    match action.as_str() {
        "crash" => {
            tracing::warn!(failpoint = name, "failpoint: killing ferryd");
            let _ = nix_free_kill_self();
            unreachable!("SIGKILL ends the process")
        }
        "twice" => Some(Injected::Twice),
        // `fail`, or anything else: a failure is the safe reading of a typo.
        _ => Some(Injected::Fail),
    }
}

#[cfg(feature = "failpoints")]
fn armed(name: &str) -> Option<String> {
    fail::fail_point!(name, |arg: Option<String>| Some(
        arg.unwrap_or_else(|| "fail".to_string())
    ));
    None
}

#[cfg(not(feature = "failpoints"))]
fn armed(_name: &str) -> Option<String> {
    None
}

/// SIGKILL to ourselves: no destructor, no flush, no atexit — what a
/// power cut or the OOM killer does to ferryd.
fn nix_free_kill_self() -> std::io::Result<()> {
    // SAFETY: kill(2) with our own pid and a valid signal number has no
    // memory-safety preconditions.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    if rc == 0 {
        // Delivery is asynchronous in principle; never go on past here.
        loop {
            std::thread::park();
        }
    }
    Err(std::io::Error::last_os_error())
}

/// Arms the failpoints named in `FAILPOINTS` (ferryd calls it once at
/// start). A no-op without the feature.
pub fn setup_from_env() {
    #[cfg(feature = "failpoints")]
    {
        if std::env::var_os("FAILPOINTS").is_some() {
            // The scenario is kept for the life of the process.
            std::mem::forget(fail::FailScenario::setup());
            tracing::warn!(failpoints = ?std::env::var("FAILPOINTS").ok(), "failpoints armed");
        }
    }
}
