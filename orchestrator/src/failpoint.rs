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
