//! Heads on the final hidden state: TRL's value head and transformers' score head.
//! (The LM head is the tied token embedding, [`crate::Gpt2::lm_logits`].)

use candle_core::{DType, Device, Tensor, D};
use rlhf_ops::rng::RngStream;
use rlhf_peft::Param;

use crate::error::{ModelError, Result};
use crate::gpt2::Fwd;

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
        let v = rlhf_peft::proj::matmul_2d(&x, &w.t()?)?.broadcast_add(&b)?;
        Ok(v.squeeze(D::Minus1)?)
    }
}

/// The score head of `GPT2ForSequenceClassification`: `Linear(H, num_labels, bias=False)`
/// read at the last real token of each row.
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

    /// Scores read at the last position whose attention mask is 1 — never by comparing ids
    /// with the pad id, since GPT-2 pads with EOS. Left and right padding give the same
    /// scores. A row with no real token is an error.
    ///
    /// # Shapes
    /// `hidden`: `(B, T, H)`, `mask`: `(B, T)` → `(B, num_labels)`, f32.
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor, grad: bool) -> Result<Tensor> {
        self.forward_with(hidden, mask, grad, true)
    }

    /// [`ScoreHead::forward`] with adapters on or off: with `adapters` false a head trained
    /// as a LoRA `modules_to_save` module reads its kept original (PEFT's
    /// `disable_adapter()` on `ModulesToSaveWrapper`).
    ///
    /// # Shapes
    /// `hidden`: `(B, T, H)`, `mask`: `(B, T)` → `(B, num_labels)`, f32.
    pub fn forward_with(&self, hidden: &Tensor, mask: &Tensor, grad: bool, adapters: bool) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let idx = last_real_index(mask)?;
        let flat: Vec<u32> = idx.iter().enumerate().map(|(row, &i)| (row * t + i) as u32).collect();
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
        Ok(pooled.to_dtype(dt)?.matmul(&w.t()?)?)
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

/// Index of the last position with mask 1 in every row.
///
/// # Shapes
/// `mask`: `(B, T)` → `B` indices.
pub fn last_real_index(mask: &Tensor) -> Result<Vec<usize>> {
    let rows: Vec<Vec<u32>> = mask.to_dtype(DType::U32)?.to_vec2()?;
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            row.iter().rposition(|&m| m != 0).ok_or_else(|| {
                ModelError::Input(format!("row {r} of the batch has no real token (attention mask all 0)"))
            })
        })
        .collect()
}
