//! Test-only crash injection.
//!
//! Built only with the `failpoints` feature: when `CRYPTFS_FAILPOINT` names the point reached,
//! the process aborts on the spot (no destructors, no cleanup), which is what a power cut does
//! to a process. Without the feature [`hit`] compiles to nothing.

/// Aborts the process if the failpoint `name` is armed.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("CRYPTFS_FAILPOINT").is_ok_and(|armed| armed == name) {
        eprintln!("cryptfs: failpoint {name} hit, aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Holds the process at `name` while a test looks at the state there (test-only, like [`hit`]):
/// when `CRYPTFS_HOLD_AT` names the point reached, waits until the file `CRYPTFS_HOLD_UNTIL`
/// exists, at most 30 s. The VM tier holds `recover-online` in the window between the hotzone's
/// resume and the table swap until its reader has read the regions around the hotzone there:
/// how long that window lasts otherwise depends on how fast the machine is. Without the
/// feature it compiles to nothing.
#[inline]
pub fn hold(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("CRYPTFS_HOLD_AT").is_ok_and(|armed| armed == name) {
        let until = std::env::var_os("CRYPTFS_HOLD_UNTIL").map(std::path::PathBuf::from);
        let started = std::time::Instant::now();
        let limit = std::time::Duration::from_secs(30);
        let released = loop {
            if until.as_deref().is_some_and(std::path::Path::exists) {
                break true;
            }
            if started.elapsed() >= limit {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        tracing::info!(
            point = name,
            released,
            held_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "test hold ended"
        );
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
