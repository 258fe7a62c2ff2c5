//! Entry points for programs that embed the library instead of running the CLI (the Python
//! package in `python/`): a checkpoint loaded once that predicts in-memory arrays and single
//! files, and a training configuration filled in from partial settings. Every check and default
//! is the CLI's own; nothing here writes files.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use burn::prelude::*;

use crate::app::InferOptions;
use crate::backend::Backend;
use crate::checkpoint::{self, Meta};
use crate::data::{Sample, volume::spacing::Spacing};
use crate::infer;
use crate::model::{Mode, UNetPP};
use crate::postprocess::Decision;
use crate::train::{TrainConfig, TrainOptions};

enum Net {
    D2(UNetPP<4>),
    D3(UNetPP<5>),
}

/// A checkpoint loaded for inference (BatchNorm folded), with the post-processing decision saved
/// beside it, which its label maps get as `predict`'s do.
pub struct Model {
    pub path: PathBuf,
    pub meta: Meta,
    net: Net,
    postprocess: Option<Decision>,
    device: Device,
}

/// Labels (`shape`) and class probabilities (`classes` planes of `shape`) of one input.
pub struct Prediction {
    pub labels: Vec<u8>,
    pub probabilities: Vec<f32>,
    /// [depth, height, width]; depth 1 in 2D.
    pub shape: [usize; 3],
    pub classes: usize,
}

/// An image in memory: values in the array's own units, channels first.
pub struct Array<'a> {
    /// The values in C order of `shape`.
    pub values: &'a mut dyn Iterator<Item = f32>,
    /// The array's shape as given: `[H, W]`, `[C, H, W]` (2D models), `[D, H, W]`, `[C, D, H, W]`
    /// (3D models).
    pub shape: &'a [usize],
    /// The full scale of its element type, which `imagenet` normalisation divides by: 255 for
    /// 8-bit, 65535 for 16-bit, the maximum of other integer types, 1 for floating point.
    pub full_scale: f32,
}

impl Model {
    pub fn load(path: &Path, backend: Backend) -> anyhow::Result<Model> {
        let meta = checkpoint::read_meta(path)?;
        meta.model.validate().with_context(|| format!("checkpoint {}", path.display()))?;
        let device = backend.device();
        let net = match meta.model.dims {
            2 => Net::D2(checkpoint::load::<4>(path, &device)?.0.fold_batchnorm()),
            _ => Net::D3(checkpoint::load::<5>(path, &device)?.0.fold_batchnorm()),
        };
        let postprocess = Decision::load_beside(path, meta.model.classes)?;
        Ok(Model { path: path.to_path_buf(), meta, net, postprocess, device })
    }

    /// Segments an array as `predict` segments a file holding it: normalised as the checkpoint
    /// says, padded or windowed, post-processed. `spacing` (mm, in the array's axis order D, H, W)
    /// is needed only by checkpoints that resample volumes to a spacing, and only there allowed.
    pub fn predict_array(
        &self,
        a: Array,
        opts: &InferOptions,
        spacing: Option<[f64; 3]>,
    ) -> anyhow::Result<Prediction> {
        opts.validate(&self.meta.model)?;
        let (dims, want) = (self.meta.model.dims, self.meta.data.channels);
        let layouts = if dims == 2 { "H x W or C x H x W" } else { "D x H x W or C x D x H x W" };
        let (channels, spatial) = match (dims, a.shape.len()) {
            (2, 2) | (3, 3) => (1, a.shape),
            (2, 3) | (3, 4) => (a.shape[0], &a.shape[1..]),
            _ => bail!("the array has shape {:?}; this {dims}D model takes {layouts}", a.shape),
        };
        let shape = if dims == 2 { [1, spatial[0], spatial[1]] } else { [spatial[0], spatial[1], spatial[2]] };
        if channels != want {
            let hint = match a.shape.last() {
                Some(&c) if c == want && a.shape.len() == dims + 1 => " (channels last? move them first)",
                _ => "",
            };
            bail!(
                "the array has shape {:?}: {channels} channel(s) but the model takes {want} ({layouts}){hint}",
                a.shape
            );
        }
        ensure!(
            shape.iter().all(|&s| s >= 1),
            "the array has shape {:?}; every axis needs at least 1 element",
            a.shape
        );
        let mut image: Vec<f32> = a.values.collect();
        ensure!(image.len() == channels * shape.iter().product::<usize>(), "the array's values do not fill its shape");
        if let Some(i) = image.iter().position(|v| !v.is_finite()) {
            bail!("the array has a non-finite value at flat index {i}");
        }
        let cfg = &self.meta.data;
        let norms = cfg.nnunet.as_ref().map(|n| n.norms.as_slice()).unwrap_or_default();
        crate::data::intensity::normalize(&mut image, channels, norms, cfg.normalize, a.full_scale);
        let s = Sample {
            name: "array".into(),
            image,
            mask: vec![],
            channels,
            shape,
            source: PathBuf::from("<array>"),
            geometry: None,
        };
        let probabilities = match (cfg.spacing, spacing) {
            (None, None) => self.probabilities(&s, opts)?,
            (Some(target), Some([d, h, w])) if dims == 3 => {
                let spacing = [w, h, d];
                Spacing(spacing).check().map_err(|e| anyhow::anyhow!("spacing: {e}"))?;
                crate::data::volume::spacing::on_grid(&s, spacing, target, |r| Ok(vec![self.probabilities(r, opts)?]))?
                    .remove(0)
            }
            (Some(target), _) => bail!(
                "checkpoint {} resamples volumes to {target} mm: pass the array's spacing (mm, D, H, W)",
                self.path.display()
            ),
            (None, Some(_)) => bail!(
                "spacing: checkpoint {} works on each input's own grid (it was trained without --spacing); \
                 leave spacing out",
                self.path.display()
            ),
        };
        Ok(self.finish(probabilities, shape))
    }

    /// Segments one image or volume file as `predict` does, the results on the file's own voxel
    /// grid (a volume's in its file's axis order, z, y, x as SimpleITK's arrays).
    pub fn predict_file(&self, path: &Path, opts: &InferOptions) -> anyhow::Result<Prediction> {
        opts.validate(&self.meta.model)?;
        crate::data::ensure_dims(
            &[path.to_path_buf()],
            self.meta.model.dims,
            &format!("checkpoint {}", self.path.display()),
        )?;
        let s = infer::read_unlabelled(path, &self.meta.data)?;
        let p = crate::data::volume::spacing::on_input_grid(&s, self.meta.data.spacing, |r| {
            Ok(vec![self.probabilities(r, opts)?])
        })?
        .remove(0);
        let mut out = self.finish(p, s.shape);
        if let Some(f) = &s.geometry {
            let classes = out.classes;
            out.labels = f.orientation.undo(&out.labels, 1, f.file_shape);
            out.probabilities = f.orientation.undo(&out.probabilities, classes, f.file_shape);
            out.shape = f.file_shape;
        }
        Ok(out)
    }

    /// Windows slide as `predict`'s do (mirrored by default for volumes), so that an array gives
    /// what the CLI gives for a file holding it.
    fn probabilities(&self, s: &Sample, opts: &InferOptions) -> anyhow::Result<Vec<f32>> {
        let (sliding, modes) = (opts.sliding(&self.meta.model), [opts.mode()]);
        let mut all = match &self.net {
            Net::D2(m) => infer::probabilities(std::slice::from_ref(m), s, &modes, &sliding, &self.device),
            Net::D3(m) => infer::probabilities(std::slice::from_ref(m), s, &modes, &sliding, &self.device),
        }?;
        Ok(all.remove(0))
    }

    fn finish(&self, probabilities: Vec<f32>, shape: [usize; 3]) -> Prediction {
        let classes = self.meta.model.classes;
        let mut labels = infer::labels(&probabilities, classes);
        if let Some(pp) = &self.postprocess {
            pp.apply(&mut labels, shape);
        }
        Prediction { labels, probabilities, shape, classes }
    }

    /// The modes this model runs: `accurate` and `fast:j` for each head.
    pub fn modes(&self) -> Vec<Mode> {
        std::iter::once(Mode::Accurate).chain(self.meta.model.head_columns().into_iter().map(Mode::Fast)).collect()
    }
}

/// A whole training configuration from partial settings (JSON, as in `config.toml`): `data`
/// (default the bundled sample) and the recipe keys among them (see [`recipe_options`]) set the
/// defaults `train --data` with those flags would take, then every given key replaces its
/// default, tables key by key. `input.channels`/`input.classes` follow
/// `model.in_channels`/`model.classes` unless given. Unknown keys are errors naming them.
pub fn train_config(partial: serde_json::Value) -> anyhow::Result<TrainConfig> {
    let serde_json::Value::Object(given) = partial else {
        bail!("a training configuration must be a table of settings")
    };
    let data = match given.get("data") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(PathBuf::from(s)),
        Some(v) => bail!("data must be a folder path, got {v}"),
    };
    let mut given = given;
    // `normalize` as the CLI spells it: "imagenet", "window:-1000:400", ...
    if let Some(n) = given.get_mut("input").and_then(|i| i.get_mut("normalize"))
        && let serde_json::Value::String(s) = n
    {
        let parsed: crate::data::Normalize = s.parse().map_err(|e: String| anyhow::anyhow!("input.normalize: {e}"))?;
        *n = serde_json::to_value(parsed)?;
    }
    let mut cfg = serde_json::to_value(TrainConfig::from_options(&recipe_options(data, &given)?)?)?;
    merge(&mut cfg, &serde_json::Value::Object(given.clone()));
    let model = given.get("model");
    let input_given = given.get("input");
    for (input_key, model_key) in [("channels", "in_channels"), ("classes", "classes")] {
        let set_in_input = input_given.and_then(|i| i.get(input_key)).is_some();
        if let (false, Some(v)) = (set_in_input, model.and_then(|m| m.get(model_key))) {
            cfg["input"][input_key] = v.clone();
        }
    }
    let cfg: TrainConfig = serde_json::from_value(cfg).context("invalid training configuration")?;
    cfg.validate()?;
    Ok(cfg)
}

/// The CLI's options for the settings' recipe keys (`epochs`, `steps_per_epoch`, `batch_size`,
/// `patch`, `model.depth`, `input.spacing`): as their flags do in `train`, any of them means no
/// plan is made for 3D data, and what derives from them (the pooling of each level) follows.
fn recipe_options(
    data: Option<PathBuf>,
    given: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<TrainOptions> {
    type Map = serde_json::Map<String, serde_json::Value>;
    // `table.key` (or `key` at the top without a table), parsed where given.
    fn at<T: serde::de::DeserializeOwned>(given: &Map, table: Option<&str>, key: &str) -> anyhow::Result<Option<T>> {
        let v = match table {
            Some(t) => given.get(t).and_then(|t| t.get(key)),
            None => given.get(key),
        };
        let name = table.map_or(key.to_string(), |t| format!("{t}.{key}"));
        let parsed = v.map(|v| serde_json::from_value(v.clone()));
        parsed.transpose().with_context(|| format!("invalid training configuration: {name}"))
    }
    Ok(TrainOptions {
        data,
        epochs: at(given, None, "epochs")?,
        steps_per_epoch: at(given, None, "steps_per_epoch")?,
        batch_size: at(given, None, "batch_size")?,
        patch: at(given, None, "patch")?,
        spacing: at(given, Some("input"), "spacing")?,
        model: crate::train::ModelOptions { depth: at(given, Some("model"), "depth")?, ..Default::default() },
        ..Default::default()
    })
}

fn merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        // A tagged value (a normalisation: `kind`) is replaced whole: its fields depend on the tag.
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) if !o.contains_key("kind") => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_settings_replace_defaults_key_by_key() {
        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/nuclei");
        let cfg = train_config(serde_json::json!({
            "data": data, "epochs": 2, "model": {"width": 4, "depth": 2, "classes": 2}, "patch": [1, 32, 32],
            "input": {"normalize": "window:0:255"}
        }))
        .unwrap();
        assert_eq!((cfg.epochs, cfg.model.width, cfg.model.depth, cfg.patch), (2, 4, 2, [1, 32, 32]));
        // Untouched settings keep the CLI's defaults; the input follows the model's classes.
        assert_eq!((cfg.steps_per_epoch, cfg.model.arch, cfg.input.classes), (20, crate::model::Arch::Unetpp, 2));
        assert_eq!(cfg.input.normalize, crate::data::Normalize::Window { low: 0.0, high: 255.0 });
        let cfg =
            train_config(serde_json::json!({"data": data, "input": {"normalize": {"kind": "imagenet"}}})).unwrap();
        assert_eq!(cfg.input.normalize, crate::data::Normalize::Imagenet);
        let err = format!("{:#}", train_config(serde_json::json!({"data": data, "epoch": 2})).unwrap_err());
        assert!(err.contains("unknown field `epoch`"), "{err}");
        let err = format!("{:#}", train_config(serde_json::json!({"data": data, "lr": 0.0})).unwrap_err());
        assert!(err.contains("--lr"), "{err}");
    }

    /// As `train --data VOLUMES --epochs 1 --depth 2`: no plan is made, and the pooling is the
    /// one of a depth-2 model (a plan's would be of depth 4, which depth 2 refuses).
    #[test]
    fn recipe_keys_on_volumes_make_no_plan() {
        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/lesions");
        let cfg = train_config(serde_json::json!({"data": data, "epochs": 1, "model": {"depth": 2}})).unwrap();
        assert!(cfg.plan.is_none() && cfg.input.spacing.is_none());
        assert_eq!((cfg.model.depth, cfg.epochs), (2, 1));
        assert!(cfg.model.pool.len() <= 2, "{:?}", cfg.model.pool);
        let err = format!("{:#}", train_config(serde_json::json!({"data": data, "patch": [16, 32]})).unwrap_err());
        assert!(err.contains("patch"), "{err}");
    }
}
