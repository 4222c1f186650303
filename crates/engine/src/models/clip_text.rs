//! OpenCLIP text tower, `layer="penultimate"` (`cond_stage_model.model.`): token + positional
//! embedding, all blocks but the last under a causal mask, then `ln_final`.

use super::layers::{layer_norm, ClipBlock};
use crate::compute::Backend;
use crate::config::ClipTextConfig;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    token_embedding: Embedding,
    positional_embedding: Tensor,
    blocks: Vec<ClipBlock>,
    ln_final: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextEncoder {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let token_embedding = candle_nn::embedding(cfg.vocab_size, cfg.width, vb.pp("token_embedding"))?;
        let positional_embedding = vb.get((cfg.context_length, cfg.width), "positional_embedding")?;
        let blocks = (0..cfg.layers_used())
            .map(|i| {
                ClipBlock::new(cfg.width, cfg.heads, cfg.mlp_ratio, vb.pp(format!("transformer.resblocks.{i}")), backend)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding,
            positional_embedding,
            blocks,
            ln_final: layer_norm(cfg.width, 1e-5, vb.pp("ln_final"))?,
            cfg: cfg.clone(),
        })
    }

    /// Keys of a real checkpoint under this prefix that inference never reads.
    pub fn unused_keys(cfg: &ClipTextConfig, embed_dim: usize) -> Vec<(String, Vec<usize>)> {
        let mut keys = ClipBlock::keys(
            &format!("transformer.resblocks.{}", cfg.layers - 1),
            cfg.width,
            cfg.mlp_ratio,
        );
        keys.push(("text_projection".into(), vec![cfg.width, embed_dim]));
        keys.push(("logit_scale".into(), vec![]));
        keys
    }

    fn causal_mask(&self, len: usize, dev: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (len, len), dev)
    }

    /// Runs the encoder on `ids` `(n, 77)`, returning every intermediate block output when
    /// `debug` is set (the fixtures' `text.debug.*`). Output `(n, 77, width)`.
    pub fn forward_with_debug(&self, ids: &Tensor, debug: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let len = ids.dim(1)?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.positional_embedding.narrow(0, 0, len)?)?;
        let mask = self.causal_mask(len, ids.device())?.to_dtype(xs.dtype())?;
        let mut trace = Vec::new();
        if debug {
            trace.push(xs.clone());
        }
        for block in &self.blocks {
            xs = block.forward(&xs, Some(&mask))?;
            if debug {
                trace.push(xs.clone());
            }
        }
        Ok((self.ln_final.forward(&xs)?, trace))
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_debug(ids, false)?.0)
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }
}
