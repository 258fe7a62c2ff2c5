//! The command line's view of a run: every option the user may leave out, and the defaults that
//! fill them in from the data (2D or 3D), the bundled sample or a checkpoint being fine-tuned.

use std::path::PathBuf;

use super::TrainConfig;
use crate::backend::Backend;
use crate::data::{DataConfig, Normalize};
use crate::model::{Arch, Encoder, ModelConfig, Preset};

/// Model options; `None` takes the default of [`ModelOptions::config`].
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    /// Default `unetpp`.
    pub arch: Option<Arch>,
    /// Default `modern`.
    pub preset: Option<Preset>,
    /// Default 4; 5 with a ResNet encoder, as smp.
    pub depth: Option<usize>,
    /// Default the paper's blocks ([`Encoder::Plain`]).
    pub encoder: Option<Encoder>,
    pub decoder_channels: Option<Vec<usize>>,
    /// Default the preset's (32; 35 for wide-unet).
    pub width: Option<usize>,
    /// Default the data's.
    pub dims: Option<usize>,
    /// Default 1, or the channels an nnU-Net data set's dataset.json names.
    pub channels: Option<usize>,
    /// Default 1 (binary), or the labels an nnU-Net data set's dataset.json names.
    pub classes: Option<usize>,
    pub no_deep_supervision: bool,
    /// Pooling per level and axis (`ModelConfig::pool`; `--pool` or a plan's); default 2 on every
    /// axis (empty).
    pub pool: Option<Vec<[usize; 3]>>,
}

impl ModelOptions {
    /// The architecture for data of `dims` spatial dimensions (unless `dims` was given).
    pub fn config(&self, dims: usize) -> ModelConfig {
        let encoder = self.encoder.unwrap_or_default();
        let depth = self.depth.unwrap_or(if encoder == Encoder::Plain { 4 } else { 5 });
        let base = ModelConfig::new(self.arch.unwrap_or(Arch::Unetpp), self.preset.unwrap_or(Preset::Modern), depth);
        let cfg = ModelConfig {
            width: self.width.unwrap_or(base.width),
            in_channels: self.channels.unwrap_or(1),
            classes: self.classes.unwrap_or(1),
            dims: self.dims.unwrap_or(dims),
            deep_supervision: base.deep_supervision && !self.no_deep_supervision,
            pool: self.pool.clone().unwrap_or_default(),
            ..base
        };
        let ds = cfg.deep_supervision;
        let cfg = cfg.with_encoder(encoder, ds);
        match &self.decoder_channels {
            Some(d) => ModelConfig { decoder_channels: d.clone(), ..cfg },
            None => cfg,
        }
    }
}

/// Training options; `None` takes the default of [`TrainConfig::from_options`].
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Default the bundled nuclei sample.
    pub data: Option<PathBuf>,
    pub model: ModelOptions,
    /// Default 10 (5 on the bundled sample).
    pub epochs: Option<usize>,
    /// Default 20 (10 on the bundled sample).
    pub steps_per_epoch: Option<usize>,
    /// Default 8 (4 on the bundled sample).
    pub batch_size: Option<usize>,
    /// Default 3e-4.
    pub lr: Option<f64>,
    /// Default 96x96 (2D) or 64^3 (3D).
    pub patch: Option<[usize; 3]>,
    /// Default 0.33.
    pub foreground: Option<f64>,
    /// Default 5.
    pub patience: Option<usize>,
    /// Default 42.
    pub seed: Option<u64>,
    /// Default percentile 0.5..99.5 (2D) or zscore (3D); a fine-tuned checkpoint's own; per
    /// channel by modality on an nnU-Net data set (given, it replaces those for every channel).
    pub normalize: Option<Normalize>,
    /// Default: none (each volume's own grid); a fine-tuned checkpoint's own.
    pub spacing: Option<crate::data::volume::spacing::Spacing>,
    /// Default 0.2.
    pub val_fraction: Option<f64>,
    /// Default [`crate::app::default_tile`].
    pub tile: Option<[usize; 3]>,
    pub skip_bad: bool,
    pub backend: Backend,
    /// Fine-tune from this checkpoint: its architecture replaces `model`.
    pub weights: Option<PathBuf>,
    /// Follow this plan ([`crate::plan`]); default `DATA/unetpp_plan/plan.toml`, made first for 3D data.
    pub plan: Option<PathBuf>,
    /// Training time the plan's steps fill; default the plan's own (2 h for one made by `train`).
    pub budget: Option<std::time::Duration>,
    /// Default [`crate::data::cache::CacheChoice::Auto`].
    pub cache: crate::data::cache::CacheChoice,
    /// Default the paper's loss, constant step size.
    pub recipe: super::recipe::Recipe,
}

impl TrainConfig {
    /// The run `o` asks for, with every option left out filled in from the data. Not yet
    /// validated: [`crate::train::train`] does that.
    pub fn from_options(o: &TrainOptions) -> anyhow::Result<TrainConfig> {
        let data = match &o.data {
            Some(d) => d.clone(),
            None => crate::app::bundled("nuclei")?,
        };
        // The bundled sample is four small crops: a short run shows the whole loop in minutes.
        let (epochs, steps, batch) = if o.data.is_some() { (10, 20, 8) } else { (5, 10, 4) };
        if o.data.is_none() {
            eprintln!(
                "no --data given: training on the bundled sample {} (pass --data DIR for your own)",
                data.display()
            );
        }
        let dims = crate::app::detect_dims(&data)?;
        // A plan fills in what the flags leave out; its per-channel normalisation replaces the data set's.
        let plan = crate::plan::for_training(o, &data, dims)?;
        let o = &plan.as_ref().map_or_else(|| o.clone(), |p| p.fill(o));
        let planned_norms =
            plan.as_ref().map(|p| p.channel_norms.clone()).filter(|n| !n.is_empty() && o.normalize.is_none());
        // An nnU-Net data set names its channels and labels, and picks each channel's normalisation.
        let mut nnunet = crate::data::layout::defaults(&data, o.normalize.is_some() || planned_norms.is_some())?;
        if let (Some(n), Some(norms)) = (&mut nnunet, planned_norms) {
            n.norms = norms;
        }
        let found = |f: fn(&crate::data::layout::NnunetInput) -> usize| nnunet.as_ref().map(f);
        // Fine-tuning keeps the checkpoint's architecture and, unless told otherwise, its input normalisation.
        let (model, normalize, spacing) = match &o.weights {
            Some(w) => {
                let meta = crate::checkpoint::read_meta(w)?;
                (meta.model, o.normalize.or(Some(meta.data.normalize)), o.spacing.or(meta.data.spacing))
            }
            None => {
                let channels = o.model.channels.or(found(|n| n.channel_names.len()));
                let classes = o.model.classes.or(found(|n| n.labels.len()));
                (ModelOptions { channels, classes, ..o.model.clone() }.config(dims), o.normalize, o.spacing)
            }
        };
        let three = model.dims == 3;
        let normalize =
            normalize.unwrap_or(if three { Normalize::ZScore } else { Normalize::Percentile { low: 0.5, high: 99.5 } });
        Ok(TrainConfig {
            data,
            input: DataConfig { nnunet, spacing, ..DataConfig::new(model.in_channels, model.classes, normalize) },
            epochs: o.epochs.unwrap_or(epochs),
            steps_per_epoch: o.steps_per_epoch.unwrap_or(steps),
            batch_size: o.batch_size.unwrap_or(batch),
            lr: o.lr.unwrap_or(3e-4),
            patch: o.patch.unwrap_or(if three { [64; 3] } else { [1, 96, 96] }),
            foreground: o.foreground.unwrap_or(0.33),
            patience: o.patience.unwrap_or(5),
            seed: o.seed.unwrap_or(42),
            val_fraction: o.val_fraction.unwrap_or(0.2),
            tile: o.tile.unwrap_or(crate::app::default_tile(&model)),
            val_crop: if three { [64, 192, 192] } else { [1, 384, 384] },
            skip_bad: o.skip_bad,
            backend: o.backend,
            weights: o.weights.clone(),
            fold: None,
            cache: o.cache.clone(),
            recipe: o.recipe,
            model,
            plan,
        })
    }

    /// A whole run configuration from a TOML file (as written to `RUN/config.toml`), checked,
    /// with errors naming the file.
    pub fn read(path: &std::path::Path) -> anyhow::Result<TrainConfig> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: TrainConfig = toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
        // `train` checks again; here the message can say which file holds the bad value.
        cfg.validate().with_context(|| format!("--config {}", path.display()))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_data() {
        let sample = Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/samples/nuclei")));
        let c = TrainConfig::from_options(&TrainOptions { data: sample.clone(), ..Default::default() }).unwrap();
        assert_eq!((c.model.dims, c.patch, c.val_crop, c.tile), (2, [1, 96, 96], [1, 384, 384], [1, 1024, 1024]));
        assert_eq!((c.epochs, c.steps_per_epoch, c.batch_size, c.seed), (10, 20, 8, 42));
        assert_eq!(c.input.normalize, Normalize::Percentile { low: 0.5, high: 99.5 });
        assert_eq!((c.model.depth, c.model.arch, c.model.in_channels), (4, Arch::Unetpp, 1));
        // Forcing 3D takes the volume defaults.
        let model = ModelOptions { dims: Some(3), ..Default::default() };
        let c = TrainConfig::from_options(&TrainOptions { data: sample, model, ..Default::default() }).unwrap();
        assert_eq!((c.patch, c.val_crop, c.tile), ([64; 3], [64, 192, 192], [64, 128, 128]));
        assert_eq!(c.input.normalize, Normalize::ZScore);
        let resnet = ModelOptions { encoder: Some(Encoder::Resnet18), ..Default::default() }.config(2);
        assert_eq!(resnet.depth, 5);
    }
}
