//! Atomic file writes: every file unetpp writes goes through here. The bytes go to a temporary
//! file in the destination's folder (same file system, so the rename is atomic), are flushed to
//! disk, and only then renamed over the destination; on any failure (full disk, encoder error,
//! panic) the temporary file is removed and the destination is left as it was.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The temporary name used while `path` is written: `.tmp-PID-NAME` beside it. Hidden (data
/// folders skip hidden files), the process id keeps two writers apart, and the name keeps its
/// extension because encoders pick the format (PNG, `.nii.gz` compression) from it.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(format!(".tmp-{}-", std::process::id()));
    name.push(path.file_name().unwrap_or_default());
    path.with_file_name(name)
}

/// Whether `path` is one of [`temp_path`]'s temporary files (left behind only by a kill).
pub fn is_temp(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
}

/// Removes the temporary file unless disarmed (so a panic inside a writer cleans up too).
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Makes the rename itself durable (the folder's entry), where the platform allows.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Writes `path` atomically through `write`, which receives the temporary path to create.
/// The destination appears complete or not at all.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let tmp = temp_path(path);
    let guard = TempGuard(Some(tmp.clone()));
    failpoint("fsio.before-write");
    write(&tmp).with_context(|| format!("cannot write {}", path.display()))?;
    failpoint("fsio.after-write");
    File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
    failpoint("fsio.before-rename");
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    std::mem::forget(guard);
    failpoint("fsio.after-rename");
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_with(path, |tmp| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(f.flush()?)
    })
}

/// A test hook: with `UNETPP_FAILPOINT=SITE:N` in the environment the process kills itself with
/// SIGKILL (no destructor, no temp-file cleanup: exactly what a kill or power cut leaves) the N-th
/// time it reaches `site`, so tests can cut a run at every write and every commit step and check
/// that `--resume` is exact. Without the variable this is one load of a cached value.
pub fn failpoint(site: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SPEC: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("UNETPP_FAILPOINT").ok()?;
        let (s, n) = v.rsplit_once(':')?;
        Some((s.to_string(), n.parse().ok()?))
    });
    if let Some((s, n)) = spec
        && s == site
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        eprintln!("failpoint {site}:{n} reached: killing the process");
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_keeps_the_old_file_and_removes_the_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"old").unwrap();
        let err = write_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk full"), "{err:#}");
        assert!(format!("{err:#}").contains("a.txt"), "{err:#}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary left behind");
    }

    #[test]
    fn panicking_writer_removes_the_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bin");
        let r = std::panic::catch_unwind(|| {
            let _ = write_with(&p, |tmp| {
                std::fs::write(tmp, b"x").unwrap();
                panic!("encoder bug")
            });
        });
        assert!(r.is_err());
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary left behind");
    }

    #[test]
    fn full_disk_is_an_error_naming_the_file() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let full = Path::new("/dev/full");
        if !full.exists() {
            panic!("this test needs /dev/full (Linux)");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        let err = write_with(&p, |_| {
            let mut f = std::fs::OpenOptions::new().write(true).open(full)?;
            f.write_all(&[0u8; 1 << 16])?;
            Ok(f.flush()?)
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("c.png"), "{err:#}");
        assert!(!p.exists());
    }
}
