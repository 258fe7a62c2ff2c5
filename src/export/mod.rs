//! `unetpp export`: a checkpoint as PyTorch-named `.safetensors` (weights only, 2D `modern`) or
//! as a self-contained ONNX inference graph ([`onnx`]).

pub mod onnx;
pub mod proto;

use std::path::Path;

use anyhow::{Context, bail};
use burn::prelude::*;

use crate::checkpoint::{self, Meta};
use crate::model::Mode;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Weights with pytorch-nested-unet's names (2D `modern` models)
    #[default]
    Safetensors,
    /// The inference graph (opset 17), probabilities out
    Onnx,
}

impl Format {
    pub const VALUES: &[Format] = &[Format::Safetensors, Format::Onnx];

    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Onnx => "onnx",
        }
    }
}

crate::names::by_name!(Format, "--format");

/// Writes checkpoint `ck` to `out` (atomically) in `format`; `mode` (ONNX only, default
/// `accurate`) picks the heads and nodes the graph holds.
pub fn export(ck: &Path, out: &Path, format: Format, mode: Option<Mode>, device: &Device) -> anyhow::Result<()> {
    let meta = checkpoint::read_meta(ck)?;
    match format {
        Format::Safetensors => {
            if let Some(mode) = mode {
                bail!("--mode {mode} applies to --format onnx only; safetensors holds every head's weights");
            }
            anyhow::ensure!(
                meta.model.dims == 2,
                "only 2D models export to the NestedUNet layout (--format onnx takes 3D)"
            );
            let (model, _) = checkpoint::load::<4>(ck, device)?;
            crate::import::export(&model, out)
        }
        Format::Onnx => {
            fn load_encode<const D: usize>(ck: &Path, device: &Device, mode: Mode) -> anyhow::Result<Vec<u8>> {
                onnx_bytes(&checkpoint::load::<D>(ck, device)?, mode)
            }
            meta.model.validate().with_context(|| format!("checkpoint {}", ck.display()))?;
            let bytes = crate::for_rank!(meta.model.dims, load_encode(ck, device, mode.unwrap_or(Mode::Accurate)))
                .with_context(|| format!("cannot export {} to ONNX", ck.display()))?;
            crate::fsio::write_atomic(out, &bytes)
        }
    }
}

/// The ONNX file of a loaded model, its configuration and data settings in the metadata (the
/// input must be normalised as `unetpp.data` says).
pub fn onnx_bytes<const D: usize>(
    (model, meta): &(crate::model::UNetPP<D>, Meta),
    mode: Mode,
) -> anyhow::Result<Vec<u8>> {
    let metadata = [
        ("unetpp.mode", mode.to_string()),
        ("unetpp.model", serde_json::to_string(&meta.model)?),
        ("unetpp.data", serde_json::to_string(&meta.data)?),
    ];
    onnx::encode(model, mode, &metadata)
}
