//! Helpers every integration test file shares: running the binary and checking how it ended.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn unetpp<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unetpp")).args(args).output().expect("binary runs")
}

/// stdout then stderr, for messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    ok_both(args).0
}

/// [`ok`], returning stdout and stderr together.
pub fn ok_text<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let (o, e) = ok_both(args);
    o + &e
}

/// [`ok`], returning stdout and stderr apart.
pub fn ok_both<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> (String, String) {
    let out = unetpp(args);
    assert!(out.status.success(), "unetpp {args:?} failed:\n{}", text(&out));
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a command that must fail cleanly (exit 1, ours, not a panic) with every needle in its
/// message; returns stderr.
pub fn fails<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], needles: &[&str]) -> String {
    fails_with(args, 1, needles)
}

/// [`fails`] with exit `code` (1: ours, 2: clap's).
pub fn fails_with<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], code: i32, needles: &[&str]) -> String {
    let out = unetpp(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "unetpp {args:?} should fail with exit {code}:\n{}", text(&out));
    assert!(!err.contains("panicked"), "panic instead of an error:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
    err
}

/// A folder of the bundled samples.
pub fn samples(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
