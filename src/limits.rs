//! How much memory work may ask for: the machine's limit and the check every size-dependent
//! option goes through before anything is allocated.

use anyhow::Context;

/// The environment variable that replaces the memory limit (GiB), for when the estimate or
/// the available-memory reading is wrong for this machine.
pub const MEMORY_ENV: &str = "UNETPP_MEMORY_GB";

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes this process may allocate and where the figure comes from: `UNETPP_MEMORY_GB` when
/// set, else Linux's MemAvailable (lowered to a cgroup v2 limit's headroom where there is one);
/// `None` where neither is known (no check is made there).
pub fn memory_limit() -> anyhow::Result<Option<(f64, String)>> {
    if let Ok(v) = std::env::var(MEMORY_ENV) {
        let gib = v.trim().parse::<f64>().ok().filter(|g| g.is_finite() && *g > 0.0);
        let gib = gib.with_context(|| format!("{MEMORY_ENV}={v}: must be a positive number of GiB"))?;
        return Ok(Some((gib * GIB, format!("{MEMORY_ENV}={v}"))));
    }
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mut limit = read("/proc/meminfo").and_then(|info| {
        let kb = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
        let kb: f64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some((kb * 1024.0, "MemAvailable in /proc/meminfo".to_string()))
    });
    let cgroup = || -> Option<f64> {
        let max: f64 = read("/sys/fs/cgroup/memory.max")?.trim().parse().ok()?;
        let used: f64 = read("/sys/fs/cgroup/memory.current")?.trim().parse().ok()?;
        Some((max - used).max(0.0))
    };
    if let Some(c) = cgroup()
        && limit.as_ref().is_none_or(|(l, _)| c < *l)
    {
        limit = Some((c, "the cgroup's memory.max less memory.current".to_string()));
    }
    Ok(limit)
}

/// Refuses work estimated to need more memory than the machine has, before it allocates
/// (and aborts, or drives the machine into swap). `what` names the options responsible.
pub fn ensure_memory(bytes: f64, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    let Some((limit, source)) = memory_limit()? else { return Ok(()) };
    anyhow::ensure!(
        bytes <= limit,
        "{} would need about {:.1} GiB, more than the {:.1} GiB available ({source}); choose smaller values, \
         or set {MEMORY_ENV} to override the limit",
        what(),
        bytes / GIB,
        limit / GIB
    );
    Ok(())
}
