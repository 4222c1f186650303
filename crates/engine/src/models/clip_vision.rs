//! OpenCLIP vision tower as DynamiCrafter's `FrozenOpenCLIPImageEmbedderV2` uses it
//! (`embedder.model.`): every token of the last block, without `ln_post`/`proj`.

use super::layers::{conv2d_no_bias, layer_norm, ClipBlock, Conv2d};
use crate::compute::Backend;
use crate::config::{ClipTextConfig, ClipVisionConfig};
use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

#[derive(Debug, Clone)]
pub struct ClipVisionEncoder {
    conv1: Conv2d,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ClipBlock>,
}

impl ClipVisionEncoder {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let v = vb.pp("visual");
        let blocks = (0..cfg.layers)
            .map(|i| ClipBlock::new(cfg.width, cfg.heads, cfg.mlp_ratio, v.pp(format!("transformer.resblocks.{i}")), backend))
            .collect::<Result<_>>()?;
        Ok(Self {
            conv1: conv2d_no_bias(3, cfg.width, cfg.patch_size, 0, cfg.patch_size, v.pp("conv1"))?,
            class_embedding: v.get(cfg.width, "class_embedding")?,
            positional_embedding: v.get((cfg.num_tokens(), cfg.width), "positional_embedding")?,
            ln_pre: layer_norm(cfg.width, 1e-5, v.pp("ln_pre"))?,
            blocks,
        })
    }

    /// Keys under this prefix that inference never reads: `ln_post`, `proj`, and the text-side
    /// leftovers of the CLIP object the reference keeps.
    pub fn unused_keys(cfg: &ClipVisionConfig, text: &ClipTextConfig, embed_dim: usize) -> Vec<(String, Vec<usize>)> {
        vec![
            ("visual.ln_post.weight".into(), vec![cfg.width]),
            ("visual.ln_post.bias".into(), vec![cfg.width]),
            ("visual.proj".into(), vec![cfg.width, embed_dim]),
            ("token_embedding.weight".into(), vec![text.vocab_size, text.width]),
            ("positional_embedding".into(), vec![text.context_length, text.width]),
            ("ln_final.weight".into(), vec![text.width]),
            ("ln_final.bias".into(), vec![text.width]),
            ("text_projection".into(), vec![text.width, embed_dim]),
            ("logit_scale".into(), vec![]),
        ]
    }

    /// `pixels`: normalised `(n, 3, 224, 224)`. Returns the tokens `(n, 257, width)` and, with
    /// `debug`, the `ln_pre` output followed by every block output.
    pub fn forward_with_debug(&self, pixels: &Tensor, debug: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let xs = self.conv1.forward(pixels)?; // (n, width, g, g)
        let (n, c, _, _) = xs.dims4()?;
        let xs = xs.flatten_from(2)?.transpose(1, 2)?; // (n, g·g, width), row-major patches
        let cls = self.class_embedding.reshape((1, 1, c))?.broadcast_as((n, 1, c))?.to_dtype(xs.dtype())?;
        let xs = Tensor::cat(&[&cls, &xs], 1)?.broadcast_add(&self.positional_embedding)?;
        let mut xs = self.ln_pre.forward(&xs)?;
        let mut trace = Vec::new();
        if debug {
            trace.push(xs.clone());
        }
        for block in &self.blocks {
            xs = block.forward(&xs, None)?;
            if debug {
                trace.push(xs.clone());
            }
        }
        Ok((xs, trace))
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_debug(pixels, false)?.0)
    }
}
