//! The process's CPU and I/O scheduling classes.
//!
//! `cryptfs.service` runs in the idle classes (`CPUSchedulingPolicy=idle`,
//! `IOSchedulingClass=idle`) so that re-encryption stays out of the workload's way. Its
//! `ExecStopPost=` inherits them, yet it repairs a stack whose suspended hotzone stalls every
//! I/O to that region of the root: starved behind the workload, it ran past `TimeoutStopSec=`
//! on a loaded guest and was killed mid-repair.

/// `ioprio_set(2)`'s "who" for one process, and its best-effort class.
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_BE: libc::c_int = 2;
/// The class sits above the 13 bits of priority data.
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
/// The best-effort class's default level (0 highest, 7 lowest).
const IOPRIO_BE_NORMAL: libc::c_int = 4;

/// Moves this process from the idle classes to the normal ones (CPU `SCHED_OTHER` at nice 0,
/// I/O best-effort at its default level). Best effort: a refusal is logged and the work goes
/// on at the old priority.
pub fn leave_idle_class() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on this process with a valid, initialised parameter.
    let cpu = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    if cpu != 0 {
        tracing::warn!(
            "cannot leave the idle CPU class: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: as above; `which` and `who` name this process.
    let nice = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) };
    if nice != 0 {
        tracing::warn!(
            "cannot reset the nice level: {}",
            std::io::Error::last_os_error()
        );
    }
    let value = (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | IOPRIO_BE_NORMAL;
    // SAFETY: ioprio_set(2) takes three integers; 0 names this process.
    let io = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, value) };
    if io != 0 {
        tracing::warn!(
            "cannot leave the idle I/O class: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the I/O priority back: the class really changed (run as any user: raising
    /// best-effort from idle needs no privilege since Linux 2.6.25 for one's own process).
    #[test]
    fn leaves_the_idle_classes() {
        let idle = 3 << IOPRIO_CLASS_SHIFT;
        // SAFETY: as in leave_idle_class.
        let set = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, idle) };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: as in leave_idle_class.
        let cpu = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        assert_eq!(cpu, 0, "{}", std::io::Error::last_os_error());
        leave_idle_class();
        // SAFETY: ioprio_get(2) on this process.
        let got = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
        assert_eq!(got >> IOPRIO_CLASS_SHIFT, i64::from(IOPRIO_CLASS_BE));
        // SAFETY: sched_getscheduler(2) on this process.
        let policy = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(policy, libc::SCHED_OTHER);
    }
}
