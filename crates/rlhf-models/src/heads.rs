//! Heads on the final hidden state: TRL's value head and transformers' score head.
//! (The LM head is [`crate::Transformer::lm_logits`].)

use candle_core::{DType, Device, Tensor, D};
use rlhf_ops::rng::RngStream;
use rlhf_peft::Param;

use crate::error::{ModelError, Result};
use crate::transformer::Fwd;

/// TRL's `ValueHead`: `Linear(H, 1)` on the dropped-out last hidden state
/// (`v_head.summary.weight` `(1, H)`, `v_head.summary.bias` `(1)`).
#[derive(Clone, Debug)]
pub struct ValueHead {
    /// `(1, H)`.
    pub weight: Param,
    /// `(1)`.
    pub bias: Param,
    /// `summary_dropout_prob` (TRL's default 0.1).
    pub dropout: f64,
}

impl ValueHead {
    /// A fresh head with PyTorch's `nn.Linear` init: weight and bias uniform in
    /// `±1/sqrt(H)` (what TRL gets with its default init strategy).
    pub fn random(hidden: usize, dropout: f64, rng: &mut RngStream, device: &Device) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut u = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| ((rng.uniform_f64() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        let weight = Tensor::from_vec(u(hidden), (1, hidden), device)?;
        let bias = Tensor::from_vec(u(1), 1, device)?;
        Ok(Self {
            weight: Param::frozen(weight),
            bias: Param::frozen(bias),
            dropout,
        })
    }

    /// Values per position, in f32.
    ///
    /// # Shapes
    /// `hidden`: `(B, T, H)` → `(B, T)`.
    pub fn forward(&self, hidden: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let dt = head_dtype(hidden);
        let x = fwd.dropout(&hidden.to_dtype(dt)?, self.dropout)?;
        let w = self.weight.get_in(fwd.grad, fwd.adapters).to_dtype(dt)?;
        let b = self.bias.get_in(fwd.grad, fwd.adapters).to_dtype(dt)?;
        let v = rlhf_peft::proj::linear_2d(&x, &w)?.broadcast_add(&b)?;
        Ok(v.squeeze(D::Minus1)?)
    }
}

/// The score head of `GPT2ForSequenceClassification`: `Linear(H, num_labels, bias=False)`
/// read at the rightmost token of each row that is not padding ([`pooled_index`]).
#[derive(Clone, Debug)]
pub struct ScoreHead {
    /// `(num_labels, H)`.
    pub weight: Param,
}

impl ScoreHead {
    /// A fresh head, normal(0, 0.02) as transformers initialises it.
    pub fn random(hidden: usize, num_labels: usize, rng: &mut RngStream, device: &Device) -> Result<Self> {
        let w: Vec<f32> = (0..hidden * num_labels).map(|_| (rng.normal() * 0.02) as f32).collect();
        Ok(Self {
            weight: Param::frozen(Tensor::from_vec(w, (num_labels, hidden), device)?),
        })
    }

    /// Scores read where transformers 5.x reads them: at the rightmost token of each row
    /// whose id is not `pad_token_id` (ids, not the attention mask), see [`pooled_index`].
    /// With pad = EOS a trailing EOS is therefore not the scored token. Left and right
    /// padding give the same scores (positions come from the attention mask).
    ///
    /// # Shapes
    /// `hidden`: `(B, T, H)`, `ids`: `(B, T)` → `(B, num_labels)`, f32.
    pub fn forward(&self, hidden: &Tensor, ids: &Tensor, pad_token_id: Option<u32>, grad: bool) -> Result<Tensor> {
        self.forward_with(hidden, ids, pad_token_id, grad, true)
    }

    /// [`ScoreHead::forward`] with adapters on or off: with `adapters` false a head trained
    /// as a LoRA `modules_to_save` module reads its kept original (PEFT's
    /// `disable_adapter()` on `ModulesToSaveWrapper`).
    ///
    /// # Shapes
    /// `hidden`: `(B, T, H)`, `ids`: `(B, T)` → `(B, num_labels)`, f32.
    pub fn forward_with(
        &self,
        hidden: &Tensor,
        ids: &Tensor,
        pad_token_id: Option<u32>,
        grad: bool,
        adapters: bool,
    ) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        if rows.len() != b || rows.first().map_or(0, Vec::len) != t {
            return Err(ModelError::Input(format!(
                "ids have shape ({}, {}) but the hidden states are ({b}, {t}, {h})",
                rows.len(),
                rows.first().map_or(0, Vec::len)
            )));
        }
        if pad_token_id.is_none() && b > 1 {
            return Err(ModelError::Input(
                "cannot score a padded batch of several rows without a pad token id: the scored token is the \
                 rightmost one that is not padding\nhint: set pad_token_id in config.json (TRL uses the EOS id)"
                    .into(),
            ));
        }
        let flat: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(row, ids)| (row * t + pooled_index(ids, pad_token_id)) as u32)
            .collect();
        let flat = Tensor::from_vec(flat, b, hidden.device())?;
        let pooled = hidden.reshape((b * t, h))?.index_select(&flat, 0)?;
        self.forward_rows(&pooled, grad, adapters)
    }

    /// Scores of hidden states already pooled to one row per sequence.
    ///
    /// # Shapes
    /// `pooled`: `(B, H)` → `(B, num_labels)`, f32.
    pub fn forward_rows(&self, pooled: &Tensor, grad: bool, adapters: bool) -> Result<Tensor> {
        let dt = head_dtype(pooled);
        let w = self.weight.get_in(grad, adapters).to_dtype(dt)?;
        Ok(rlhf_peft::proj::linear_2d(&pooled.to_dtype(dt)?, &w)?)
    }
}

/// Heads compute in f32 (TRL upcasts the value head's input), or f64 for f64 models.
fn head_dtype(hidden: &Tensor) -> DType {
    if hidden.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The position a sequence-classification head reads in one row of ids, as transformers
/// 5.x (and every `*ForSequenceClassification` since 4.46) pools: the rightmost token whose
/// id is not `pad_token_id`; 0 when every token is padding (their `argmax` over a zero
/// vector); the last token when there is no pad id.
pub fn pooled_index(ids: &[u32], pad_token_id: Option<u32>) -> usize {
    match pad_token_id {
        Some(pad) => ids.iter().rposition(|&id| id != pad).unwrap_or(0),
        None => ids.len().saturating_sub(1),
    }
}
