//! Where predictions and evaluation results go, and the checks that keep them off the inputs,
//! off the ground truth, off each other and off files unetpp did not write.
//!
//! Output names are built from the inputs' OS file names (not a lossy UTF-8 copy), so two inputs
//! whose names differ only in bytes that are not UTF-8 never share an output. Every file unetpp
//! predicts carries a mark (PNG `tEXt` `Software`, NIfTI `descrip`): re-running over the same
//! `--out` replaces unetpp's own earlier outputs, while a file without the mark is refused unless
//! the caller opts in (`predict --overwrite`). Inputs and ground truth are refused regardless.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};

use anyhow::bail;

use crate::data::Splits;
use crate::probabilities::Format;

/// The PNG `tEXt` keyword and value, and the NIfTI `descrip`, that mark a file as unetpp's output.
pub const PNG_KEYWORD: &str = "Software";
pub const MARK: &str = "unetpp";
pub const NIFTI_DESCRIP: &str = "unetpp prediction";

#[cfg(unix)]
fn strip_suffix(name: &OsStr, suffix: &str) -> Option<OsString> {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().strip_suffix(suffix.as_bytes()).map(|b| OsStr::from_bytes(b).to_owned())
}

#[cfg(not(unix))]
fn strip_suffix(name: &OsStr, suffix: &str) -> Option<OsString> {
    name.to_str()?.strip_suffix(suffix).map(OsString::from)
}

/// A file's name without its extension (`.nii.gz` counts as one), as the OS spells it.
pub fn os_stem(path: &Path) -> OsString {
    let name = path.file_name().unwrap_or_default();
    // A folder (a DICOM series) keeps its whole name: series folders are often named by UID.
    if path.is_dir() {
        return name.to_owned();
    }
    [".nii.gz", ".nii"]
        .into_iter()
        .find_map(|ext| strip_suffix(name, ext))
        .unwrap_or_else(|| path.file_stem().unwrap_or_default().to_owned())
}

/// `dir/STEM{suffix}` with the input's OS stem.
pub fn named(dir: &Path, input: &Path, suffix: &str) -> PathBuf {
    let mut name = os_stem(input);
    name.push(suffix);
    dir.join(name)
}

/// The files `predict` writes for `input`: the mask, then one probability map per class.
pub fn prediction_paths(out: &Path, input: &Path, classes: usize, probabilities: Option<Format>) -> Vec<PathBuf> {
    let ext = if crate::data::io::is_volume(input) { ".nii.gz" } else { ".png" };
    let mut paths = vec![named(out, input, ext)];
    if let Some(f) = probabilities {
        let ext = f.extension(input);
        paths.extend((0..classes).map(|c| named(out, input, &format!("_prob{c}{ext}"))));
    }
    paths
}

/// The absolute path with symbolic links and `..` resolved, also for a path (or its tail) that
/// does not exist yet: the existing part is canonicalised, the rest normalised as written.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    let mut real = true;
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if !real => {
                out.pop();
            }
            _ => {
                let next = out.join(c);
                if real {
                    if let Ok(r) = next.canonicalize() {
                        out = r;
                        continue;
                    }
                    real = false;
                }
                if c == Component::ParentDir {
                    out.pop();
                } else {
                    out = next;
                }
            }
        }
    }
    out
}

/// What identifies an existing file across hard and symbolic links.
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(path: &Path) -> Option<PathBuf> {
    path.canonicalize().ok()
}

/// Whether `path` is a prediction unetpp wrote (it carries the mark).
pub fn is_ours(path: &Path) -> bool {
    let name = path.to_string_lossy().to_lowercase();
    if crate::data::io::is_volume(path) {
        return nifti::NiftiHeader::from_file(path).is_ok_and(|h| h.descrip.starts_with(NIFTI_DESCRIP.as_bytes()));
    }
    if name.ends_with(".tif") || name.ends_with(".npy") {
        return crate::probabilities::is_ours(path);
    }
    if !name.ends_with(".png") {
        return false;
    }
    let Ok(f) = std::fs::File::open(path) else { return false };
    let Ok(reader) = png::Decoder::new(std::io::BufReader::new(f)).read_info() else { return false };
    reader.info().uncompressed_latin1_text.iter().any(|t| t.keyword == PNG_KEYWORD && t.text == MARK)
}

/// The folders of a data set that hold images or ground truth: `images/`, `masks/`, `labels/`.
fn data_folders(split: &Path) -> Vec<(PathBuf, &'static str)> {
    if let Ok(Some(s)) = crate::data::layout::split(split) {
        return [(s.images, "image"), (s.labels, "ground-truth")].into_iter().filter(|(p, _)| p.is_dir()).collect();
    }
    [("images", "image"), ("masks", "ground-truth"), ("labels", "ground-truth")]
        .into_iter()
        .map(|(d, what)| (split.join(d), what))
        .filter(|(p, _)| p.is_dir())
        .collect()
}

/// Refuses an eval `--out` equal to or inside a folder of the data set's images or masks.
pub fn check_eval_out(data: &Path, out: &Path) -> anyhow::Result<()> {
    let s = Splits::find(data)?;
    let target = resolve(out);
    for split in [s.train, s.val, s.test].into_iter().flatten() {
        for (dir, what) in data_folders(&split) {
            let dir = resolve(&dir);
            if target.starts_with(&dir) {
                bail!(
                    "--out {} is inside the data set's {what} folder {}: evaluation results must not be written \
                     among the files they are computed from; choose a folder outside the data set",
                    out.display(),
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Checks a prediction run before anything is written and returns each input's output files.
///
/// `input` is what the user passed (a file, a folder, or a data folder with `images/`), `image_dir`
/// the folder the inputs `files` are in. Refused: an `--out` that is the inputs' folder, the data folder or its
/// `masks/`/`labels/`; two inputs with the same stem (`a.tif` + `a.png`) or whose outputs share a
/// name; an output that would replace an input; and, unless `overwrite`, an existing file that
/// unetpp did not write.
pub fn plan_predictions(
    input: &Path,
    image_dir: &Path,
    files: &[PathBuf],
    out: &Path,
    classes: usize,
    probabilities: Option<Format>,
    overwrite: bool,
) -> anyhow::Result<Vec<(PathBuf, Vec<PathBuf>)>> {
    for f in files {
        probabilities.map(|p| p.check(f)).transpose()?;
    }
    let target = resolve(out);
    let image_dir = resolve(image_dir);
    let mut protected = vec![(image_dir.clone(), "the folder of the input images")];
    if input.is_dir() {
        protected.push((resolve(input), "the input folder"));
    }
    // A data set's ground truth sits beside its images/.
    if image_dir.file_name() == Some(OsStr::new("images"))
        && let Some(root) = image_dir.parent()
    {
        let truth = data_folders(root).into_iter().filter(|(_, what)| *what == "ground-truth");
        protected.extend(truth.map(|(d, _)| (resolve(&d), "the ground-truth folder")));
    }
    if let Ok(Some(s)) = crate::data::layout::split(&image_dir) {
        protected.push((resolve(&s.labels), "the ground-truth folder"));
    }
    for (dir, what) in &protected {
        if &target == dir {
            bail!(
                "--out {} is {what} {}: predictions would overwrite or mix with the files they are made from; \
                 choose another folder",
                out.display(),
                dir.display()
            );
        }
    }

    // Any data set's images/, masks/ or labels/ (one with images/ beside it), not only the inputs'.
    if let (Some(name), Some(root)) = (target.file_name(), target.parent())
        && (["images", "masks", "labels"].iter().any(|d| name == OsStr::new(d)) && root.join("images").is_dir()
            || ["imagesTr", "labelsTr", "imagesTs", "labelsTs"].iter().any(|d| name == OsStr::new(d))
                && crate::data::layout::is_nnunet(root))
    {
        bail!(
            "--out {} is the {}/ folder of the data set {}: predictions must not be mixed into a data set's \
             images or ground truth; choose another folder",
            out.display(),
            name.to_string_lossy(),
            root.display()
        );
    }
    let mut by_stem: HashMap<OsString, &PathBuf> = HashMap::new();
    for f in files {
        if let Some(prev) = by_stem.insert(os_stem(f), f) {
            bail!(
                "inputs {} and {} have the same name without extension, so their predictions would overwrite \
                 each other; rename or move one of them (nothing was written)",
                prev.display(),
                f.display()
            );
        }
    }
    let ids: HashMap<_, &PathBuf> = files.iter().filter_map(|f| Some((file_id(f)?, f))).collect();
    let mut plan = vec![];
    let mut owner: HashMap<PathBuf, &PathBuf> = HashMap::new();
    let mut foreign = vec![];
    for f in files {
        let paths = prediction_paths(out, f, classes, probabilities);
        for p in &paths {
            if let Some(prev) = owner.insert(p.clone(), f) {
                bail!(
                    "inputs {} and {} would both be written to {}; rename one of them (nothing was written)",
                    prev.display(),
                    f.display(),
                    p.display()
                );
            }
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if let Some(i) = file_id(p).and_then(|id| ids.get(&id)) {
                    bail!("output {} would replace the input {} (nothing was written)", p.display(), i.display());
                }
                if m.is_dir() {
                    bail!("output {} exists and is a folder (nothing was written)", p.display());
                }
                if !overwrite && !is_ours(p) {
                    foreign.push(p.display().to_string());
                }
            }
        }
        plan.push((f.clone(), paths));
    }
    if !foreign.is_empty() {
        let n = foreign.len();
        foreign.truncate(5);
        bail!(
            "{n} file(s) in --out {} were not written by unetpp and would be replaced: {}{}; pass --overwrite to \
             replace them, or choose another --out (nothing was written)",
            out.display(),
            foreign.join(", "),
            if n > 5 { ", ..." } else { "" }
        );
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_keep_double_extensions_and_os_names() {
        assert_eq!(os_stem(Path::new("a/b c.d-e.nii.gz")), "b c.d-e");
        assert_eq!(os_stem(Path::new("a/x.nii")), "x");
        assert_eq!(os_stem(Path::new("x/img 1.tif")), "img 1");
        assert_eq!(named(Path::new("o"), Path::new("i/v.nii.gz"), "_prob0.nii.gz"), Path::new("o/v_prob0.nii.gz"));
    }

    #[cfg(unix)]
    #[test]
    fn names_that_are_not_utf8_stay_apart() {
        use std::os::unix::ffi::OsStrExt;
        let a = Path::new(OsStr::from_bytes(b"d/\xff.png"));
        let b = Path::new(OsStr::from_bytes(b"d/\xfe.png"));
        assert_eq!(a.to_string_lossy(), b.to_string_lossy());
        assert_ne!(named(Path::new("o"), a, ".png"), named(Path::new("o"), b, ".png"));
        assert_eq!(os_stem(a).as_bytes(), b"\xff");
    }

    #[test]
    fn own_outputs_carry_the_mark_and_others_do_not() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        crate::data::io::write_png(&d.join("m.png"), &[0, 255, 0, 255], [1, 2, 2]).unwrap();
        image::GrayImage::new(2, 2).save(d.join("user.png")).unwrap();
        std::fs::write(d.join("junk.png"), b"not a png").unwrap();
        assert!(is_ours(&d.join("m.png")));
        assert!(!is_ours(&d.join("user.png")) && !is_ours(&d.join("junk.png")) && !is_ours(&d.join("none.png")));
        assert_eq!(image::open(d.join("m.png")).unwrap().to_luma8().into_raw(), vec![0, 255, 0, 255]);

        let vol = ndarray::Array3::<f32>::zeros((3, 4, 5));
        nifti::writer::WriterOptions::new(d.join("ref.nii")).write_nifti(&vol).unwrap();
        assert!(!is_ours(&d.join("ref.nii")));
        for name in ["p.nii", "p.nii.gz"] {
            // The uncompressed writer's size check must accept a complete file.
            crate::data::io::write_nifti(&d.join(name), &[1u8; 60], [5, 4, 3], &d.join("ref.nii")).unwrap();
            assert!(is_ours(&d.join(name)), "{name}");
            assert_eq!(crate::data::io::read_raw(&d.join(name)).unwrap().data, vec![1.0; 60]);
        }
    }

    #[test]
    fn resolve_handles_dot_dot_links_and_missing_tails() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("x/images")).unwrap();
        assert_eq!(resolve(&root.join("x/../x/images")), root.join("x/images"));
        assert_eq!(resolve(&root.join("x/new/../images")), root.join("x/images"));
        assert_eq!(resolve(&root.join("x/new/deeper")), root.join("x/new/deeper"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("x/images"), root.join("link")).unwrap();
            assert_eq!(resolve(&root.join("link")), root.join("x/images"));
            assert_eq!(resolve(&root.join("link/./")), root.join("x/images"));
        }
    }
}
