//! `predict --shard I/N`: a deterministic share of a folder's cases, so that any scheduler (a Slurm
//! job array, a Kubernetes indexed job, GNU parallel) can fan prediction out over machines, and a
//! per-shard manifest of what was done. Shards are 0-based as nnU-Net's `-part_id`/`-num_parts`
//! and Kubernetes' `JOB_COMPLETION_INDEX`: shard I of N takes cases I, I+N, I+2N, ... of the
//! sorted inputs, so shards stay balanced and together take every case exactly once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Shard `index` of `count` (0 <= index < count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard must be I/N with 0 <= I < N (e.g. 0/3, 1/3, 2/3), got `{s}`");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) =
            (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether the `k`-th of the sorted cases is this shard's.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }

    /// The manifest's file name: one per shard, so that shards writing to one shared `--out`
    /// never write the same file.
    pub fn manifest_name(&self) -> String {
        format!("manifest.shard-{}-of-{}.jsonl", self.index, self.count)
    }
}

/// Whether a case's outputs were all written completely by unetpp: outputs are written
/// atomically, so one that exists and carries unetpp's mark is whole.
pub fn done(outputs: &[PathBuf]) -> bool {
    !outputs.is_empty() && outputs.iter().all(|p| p.is_file() && crate::output::is_ours(p))
}

/// One manifest line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub input: PathBuf,
    pub outputs: Vec<PathBuf>,
    pub mode: String,
    /// Wall time of the case; 0 where it was skipped.
    pub seconds: f64,
    /// Its outputs were already complete (an earlier run of the shard wrote them).
    pub skipped: bool,
}

/// The JSON-lines manifest of a shard (or of a whole run), rewritten atomically after each case
/// so that a kill leaves the lines of every finished case and never a torn one. Lines of an
/// earlier run of the same shard are kept, except those of cases done again now.
pub struct Manifest {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl Manifest {
    /// Opens `dir/name`, keeping the readable lines of an earlier run (a line that does not parse,
    /// e.g. a file edited by hand, is dropped with a warning rather than stopping the run).
    pub fn open(dir: &Path, name: &str) -> Manifest {
        let path = dir.join(name);
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| match serde_json::from_str(l) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        eprintln!("warning: {}: dropping an unreadable line ({e})", path.display());
                        None
                    }
                })
                .collect(),
            Err(_) => vec![],
        };
        Manifest { path, entries }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Adds (or replaces, by input) a case's line and writes the manifest.
    pub fn record(&mut self, entry: Entry) -> anyhow::Result<()> {
        self.entries.retain(|e| e.input != entry.input);
        self.entries.push(entry);
        let mut text = String::new();
        for e in &self.entries {
            text.push_str(&serde_json::to_string(e)?);
            text.push('\n');
        }
        crate::fsio::write_atomic(&self.path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_with_the_option() {
        assert_eq!("1/3".parse::<Shard>().unwrap(), Shard { index: 1, count: 3 });
        assert_eq!("0/1".parse::<Shard>().unwrap().to_string(), "0/1");
        for bad in ["3/3", "1/0", "a/3", "1", "-1/3", "1/3/4"] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert!(e.contains("--shard") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn shards_cover_every_case_once_and_are_balanced() {
        for count in 1..6 {
            let owners: Vec<Vec<usize>> =
                (0..17).map(|k| (0..count).filter(|&i| Shard { index: i, count }.owns(k)).collect()).collect();
            assert!(owners.iter().all(|o| o.len() == 1), "{owners:?}");
            let sizes: Vec<usize> =
                (0..count).map(|i| (0..17).filter(|&k| Shard { index: i, count }.owns(k)).count()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }

    #[test]
    fn manifest_keeps_earlier_lines_replaces_redone_ones_and_drops_torn_ones() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |input: &str, seconds| Entry {
            input: input.into(),
            outputs: vec![format!("{input}.png").into()],
            mode: "accurate".into(),
            seconds,
            skipped: false,
        };
        let mut m = Manifest::open(dir.path(), "m.jsonl");
        m.record(entry("a", 1.0)).unwrap();
        m.record(entry("b", 2.0)).unwrap();
        // A torn last line, as an append cut by a kill would leave (we never append).
        let path = m.path().to_path_buf();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"input\": \"c\", \"outp");
        std::fs::write(&path, text).unwrap();
        let mut m = Manifest::open(dir.path(), "m.jsonl");
        assert_eq!(m.entries().len(), 2);
        m.record(entry("a", 3.0)).unwrap();
        let m = Manifest::open(dir.path(), "m.jsonl");
        let got: Vec<(String, f64)> = m.entries().iter().map(|e| (e.input.display().to_string(), e.seconds)).collect();
        assert_eq!(got, [("b".to_string(), 2.0), ("a".to_string(), 3.0)]);
    }
}
