//! nnU-Net's post-processing (`nnunetv2/postprocessing/remove_connected_components.py`), decided
//! on validation predictions: keep only the largest connected component, first of all foreground
//! labels together, then of each label, each step kept only where it raises the validation Dice.
//!
//! Components are 26-connected in 3D and 8-connected in 2D by default ([`Connectivity::Full`],
//! what nnU-Net's `skimage.measure.label` uses), or face-connected (6 / 4, [`Connectivity::Face`]).
//! The decision is a small JSON file; `predict` and `eval` apply the one beside their checkpoint
//! (`best.unetpp` -> `best.postprocess.json`, see [`beside`]) when there is one.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

/// Which neighbours join a component.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Connectivity {
    /// Faces, edges and corners: 26 neighbours in 3D, 8 in 2D (nnU-Net).
    #[default]
    Full,
    /// Faces only: 6 neighbours in 3D, 4 in 2D.
    Face,
}

impl Connectivity {
    pub const VALUES: &[Connectivity] = &[Connectivity::Full, Connectivity::Face];

    pub fn name(self) -> &'static str {
        match self {
            Connectivity::Full => "full",
            Connectivity::Face => "face",
        }
    }
}

crate::names::by_name!(Connectivity, "--connectivity");

/// Component id per voxel (0 background, 1.. in raster order of their first voxel) and each
/// component's size (index 0 unused).
pub fn components(mask: &[bool], shape: [usize; 3], conn: Connectivity) -> (Vec<u32>, Vec<usize>) {
    let [nz, ny, nx] = shape;
    let offsets: Vec<[isize; 3]> = (-1..=1isize)
        .flat_map(|z| (-1..=1isize).flat_map(move |y| (-1..=1isize).map(move |x| [z, y, x])))
        .filter(|o| {
            let n = o.iter().filter(|&&v| v != 0).count();
            n > 0 && (conn == Connectivity::Full || n == 1)
        })
        .collect();
    let mut id = vec![0u32; mask.len()];
    let mut sizes = vec![0usize];
    let mut stack = vec![];
    for start in 0..mask.len() {
        if !mask[start] || id[start] != 0 {
            continue;
        }
        let label = sizes.len() as u32;
        let mut size = 0;
        id[start] = label;
        stack.push(start);
        while let Some(i) = stack.pop() {
            size += 1;
            let c = [(i / (ny * nx)) as isize, (i / nx % ny) as isize, (i % nx) as isize];
            for o in &offsets {
                let [z, y, x] = [c[0] + o[0], c[1] + o[1], c[2] + o[2]];
                if z < 0 || y < 0 || x < 0 || z >= nz as isize || y >= ny as isize || x >= nx as isize {
                    continue;
                }
                let j = (z as usize * ny + y as usize) * nx + x as usize;
                if mask[j] && id[j] == 0 {
                    id[j] = label;
                    stack.push(j);
                }
            }
        }
        sizes.push(size);
    }
    (id, sizes)
}

/// Sets to background every voxel whose label is in `labels` outside the largest component of
/// those voxels together; components tied for largest are all kept, as nnU-Net's
/// (acvl_utils') `remove_all_but_largest_component` does.
pub fn keep_largest(pred: &mut [u8], shape: [usize; 3], labels: &[u8], conn: Connectivity) {
    let mut chosen = [false; 256];
    labels.iter().for_each(|&l| chosen[l as usize] = true);
    let mask: Vec<bool> = pred.iter().map(|&v| chosen[v as usize]).collect();
    let (id, sizes) = components(&mask, shape, conn);
    if sizes.len() <= 2 {
        return;
    }
    let largest = sizes[1..].iter().copied().max().unwrap_or(0);
    for (v, &c) in pred.iter_mut().zip(&id) {
        if c != 0 && sizes[c as usize] != largest {
            *v = 0;
        }
    }
}

/// Mean Dice per label (classes 1..; `classes == 1` means `> 0` is the one label), with nnU-Net's
/// convention: a case where a label is absent from both sides is left out of that label's mean.
/// Its values are the means of every label, then their mean ("foreground mean").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiceTable {
    pub per_label: Vec<(u8, f64)>,
    pub foreground_mean: f64,
}

/// A case for [`decide`]: a prediction, its reference and their `[z, y, x]` shape.
pub struct Case {
    pub name: String,
    pub pred: Vec<u8>,
    pub truth: Vec<u8>,
    pub shape: [usize; 3],
}

fn labels_of(classes: usize) -> Vec<u8> {
    if classes == 1 { vec![1] } else { (1..classes as u8).collect() }
}

fn dice_table(cases: &[Case], preds: &[Vec<u8>], classes: usize) -> DiceTable {
    let per_label: Vec<(u8, f64)> = labels_of(classes)
        .into_iter()
        .map(|c| {
            let is = |v: u8| if classes == 1 { v > 0 } else { v == c };
            let dice: Vec<f64> = cases
                .iter()
                .zip(preds)
                .map(|(case, p)| {
                    let p: Vec<bool> = p.iter().map(|&v| is(v)).collect();
                    let t: Vec<bool> = case.truth.iter().map(|&v| is(v)).collect();
                    let o = crate::metrics::binary(&p, &t);
                    if p.iter().chain(&t).any(|&v| v) { o.dice } else { f64::NAN }
                })
                .collect();
            (c, crate::metrics::nan_mean_std(&dice).0)
        })
        .collect();
    let means: Vec<f64> = per_label.iter().map(|l| l.1).collect();
    DiceTable { foreground_mean: crate::metrics::nan_mean_std(&means).0, per_label }
}

/// What to apply to every prediction, and the validation Dice that decided it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub connectivity: Connectivity,
    pub classes: usize,
    /// Keep only the largest component of all foreground labels together.
    pub keep_largest_foreground: bool,
    /// Then keep only the largest component of each of these labels, in this order.
    pub keep_largest_per_label: Vec<u8>,
    pub cases: usize,
    pub dice_before: DiceTable,
    pub dice_after: DiceTable,
}

impl Decision {
    /// Post-processes one predicted label map in place.
    pub fn apply(&self, pred: &mut [u8], shape: [usize; 3]) {
        if self.keep_largest_foreground {
            keep_largest(pred, shape, &(1..=255).collect::<Vec<u8>>(), self.connectivity);
        }
        for &c in &self.keep_largest_per_label {
            keep_largest(pred, shape, &[c], self.connectivity);
        }
    }

    /// Whether it changes anything at all.
    pub fn is_noop(&self) -> bool {
        !self.keep_largest_foreground && self.keep_largest_per_label.is_empty()
    }

    /// Reads a decision written by [`decide`]'s caller; errors name the file.
    pub fn load(path: &Path) -> anyhow::Result<Decision> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a post-processing decision", path.display()))
    }

    /// The decision beside checkpoint `ck`, if there is one, checked against its class count.
    pub fn load_beside(ck: &Path, classes: usize) -> anyhow::Result<Option<Decision>> {
        let path = beside(ck);
        if !path.exists() {
            return Ok(None);
        }
        let d = Decision::load(&path)?;
        ensure!(
            d.classes == classes,
            "{} was decided for {} class(es) but checkpoint {} has {classes}; remove it or decide again",
            path.display(),
            d.classes,
            ck.display()
        );
        Ok(Some(d))
    }
}

/// What was decided, for printing.
pub fn describe(d: &Decision) -> String {
    let mut s = format!(
        "{} case(s), {:?} connectivity: keep the largest foreground component: {}",
        d.cases,
        d.connectivity,
        if d.keep_largest_foreground { "yes" } else { "no" }
    );
    if d.classes > 2 {
        s += &format!("; keep the largest component of labels {:?}", d.keep_largest_per_label);
    }
    s += &format!(
        "\nvalidation mean Dice (foreground mean) {:.4} -> {:.4}",
        d.dice_before.foreground_mean, d.dice_after.foreground_mean
    );
    s
}

/// Where `predict` and `eval` look for a checkpoint's decision: `best.unetpp` ->
/// `best.postprocess.json` in the same folder.
pub fn beside(ck: &Path) -> PathBuf {
    ck.with_extension("postprocess.json")
}

/// nnU-Net's procedure on validation cases: keep-largest of all foreground is adopted when it
/// raises the foreground mean Dice and lowers no label's mean; then (multi-class) keep-largest of
/// each label in turn, on top of what was adopted, when it raises that label's mean Dice.
pub fn decide(cases: &[Case], classes: usize, connectivity: Connectivity) -> Decision {
    let mut current: Vec<Vec<u8>> = cases.iter().map(|c| c.pred.clone()).collect();
    let before = dice_table(cases, &current, classes);
    let all: Vec<u8> = (1..=255).collect();
    let trial: Vec<Vec<u8>> = cases
        .iter()
        .zip(&current)
        .map(|(c, p)| {
            let mut p = p.clone();
            keep_largest(&mut p, c.shape, &all, connectivity);
            p
        })
        .collect();
    let after = dice_table(cases, &trial, classes);
    let worse = before.per_label.iter().zip(&after.per_label).any(|(b, a)| a.1 < b.1);
    let keep_largest_foreground = after.foreground_mean > before.foreground_mean && !worse;
    let mut table = before.clone();
    if keep_largest_foreground {
        current = trial;
        table = after;
    }
    let mut per_label = vec![];
    if classes > 2 {
        for (i, c) in labels_of(classes).into_iter().enumerate() {
            let trial: Vec<Vec<u8>> = cases
                .iter()
                .zip(&current)
                .map(|(case, p)| {
                    let mut p = p.clone();
                    keep_largest(&mut p, case.shape, &[c], connectivity);
                    p
                })
                .collect();
            let t = dice_table(cases, &trial, classes);
            if t.per_label[i].1 > table.per_label[i].1 {
                per_label.push(c);
                current = trial;
                table = t;
            }
        }
    }
    Decision {
        connectivity,
        classes,
        keep_largest_foreground,
        keep_largest_per_label: per_label,
        cases: cases.len(),
        dice_before: before,
        dice_after: table,
    }
}

/// Reads the predictions in `predictions` and their references in `labels` (paired by file
/// name without extension; `predict --probabilities` maps beside their mask are skipped).
pub fn read_cases(predictions: &Path, labels: &Path, classes: usize) -> anyhow::Result<Vec<Case>> {
    let list = |dir: &Path| -> anyhow::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && crate::data::io::is_supported(p)
                    && !p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
            })
            .collect();
        v.sort();
        Ok(v)
    };
    let stem = |p: &Path| crate::output::os_stem(p);
    let preds = list(predictions)?;
    let refs = list(labels)?;
    let pred_stems: Vec<_> = preds.iter().map(|p| stem(p)).collect();
    let is_prob_map = |s: &std::ffi::OsStr| {
        let s = s.to_string_lossy();
        s.rfind("_prob").is_some_and(|i| {
            let digits = &s[i + 5..];
            !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && pred_stems.iter().any(|o| o.to_string_lossy() == s[..i])
        })
    };
    let mut cases = vec![];
    let mut used = vec![false; refs.len()];
    for (p, s) in preds.iter().zip(&pred_stems) {
        if is_prob_map(s) {
            continue;
        }
        let Some(j) = refs.iter().position(|r| stem(r) == *s) else {
            bail!("prediction {} has no reference with the same name in {}", p.display(), labels.display());
        };
        used[j] = true;
        let (pred, shape) = crate::data::io::read_mask(p, classes)?;
        let (truth, tshape) = crate::data::io::read_mask(&refs[j], classes)?;
        ensure!(
            shape == tshape,
            "size mismatch: prediction {} is {} but reference {} is {}",
            p.display(),
            crate::data::io::fmt_shape(shape),
            refs[j].display(),
            crate::data::io::fmt_shape(tshape)
        );
        cases.push(Case { name: s.to_string_lossy().into_owned(), pred, truth, shape });
    }
    if let Some(j) = used.iter().position(|u| !u) {
        bail!(
            "reference {} has no prediction in {}: post-processing is decided on the whole validation set",
            refs[j].display(),
            predictions.display()
        );
    }
    ensure!(!cases.is_empty(), "no predictions found in {}", predictions.display());
    Ok(cases)
}

/// `unetpp postprocess`: decides on the predictions in `predictions` against `labels` and writes
/// the decision to `out` (refused inside either input folder). Defaults: 1 class (binary), full
/// connectivity.
pub fn run(
    predictions: &Path,
    labels: &Path,
    out: &Path,
    classes: Option<usize>,
    connectivity: Option<Connectivity>,
) -> anyhow::Result<Decision> {
    let (classes, connectivity) = (classes.unwrap_or(1), connectivity.unwrap_or_default());
    ensure!((1..=255).contains(&classes), "--classes {classes}: allowed 1 (binary) to 255");
    let cases = read_cases(predictions, labels, classes)?;
    let target = crate::output::resolve(out);
    for dir in [predictions, labels] {
        ensure!(
            !target.starts_with(crate::output::resolve(dir)),
            "--out {} is inside {}: the decision must not be written among the files it is decided from",
            out.display(),
            dir.display()
        );
    }
    let decision = decide(&cases, classes, connectivity);
    crate::fsio::write_atomic(out, serde_json::to_string_pretty(&decision)?.as_bytes())?;
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_neighbours_join_only_with_full_connectivity() {
        // Two voxels touching at a corner in 3D, and two pixels touching at a corner in 2D.
        let mut m = vec![false; 8];
        m[0] = true;
        m[7] = true;
        assert_eq!(components(&m, [2, 2, 2], Connectivity::Full).1, vec![0, 2]);
        assert_eq!(components(&m, [2, 2, 2], Connectivity::Face).1, vec![0, 1, 1]);
        let p = [true, false, false, true];
        assert_eq!(components(&p, [1, 2, 2], Connectivity::Full).1, vec![0, 2]);
        assert_eq!(components(&p, [1, 2, 2], Connectivity::Face).1, vec![0, 1, 1]);
        // A face neighbour across z.
        let z = [true, false, true, false];
        assert_eq!(components(&z, [2, 1, 2], Connectivity::Face).1, vec![0, 2]);
    }

    #[test]
    fn keep_largest_removes_the_rest_of_those_labels_only() {
        // 1x1x8: label 1 at 0..3 and 6, label 2 at 4.
        let mut p = vec![1, 1, 1, 0, 2, 0, 1, 0];
        keep_largest(&mut p, [1, 1, 8], &[1], Connectivity::Full);
        assert_eq!(p, vec![1, 1, 1, 0, 2, 0, 0, 0]);
        keep_largest(&mut p, [1, 1, 8], &[1, 2], Connectivity::Full);
        assert_eq!(p, vec![1, 1, 1, 0, 0, 0, 0, 0]);
        // Two components tied for largest both stay.
        let mut p = vec![1, 1, 0, 2, 2, 0, 1, 0];
        keep_largest(&mut p, [1, 1, 8], &[1, 2], Connectivity::Full);
        assert_eq!(p, vec![1, 1, 0, 2, 2, 0, 0, 0]);
    }
}
