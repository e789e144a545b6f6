//! How a forward pass runs: [`Fwd`].

use candle_core::Tensor;
use rlhf_ops::dropout::DropoutKeys;
use rlhf_ops::sink::GradSink;
use rlhf_peft::ProjCtx;

use crate::error::Result;

/// How a forward pass runs: with or without an autograd graph, with or without dropout,
/// with or without LoRA adapters.
pub struct Fwd<'a> {
    /// Record the graph for a backward pass.
    pub grad: bool,
    /// Train mode: dropout draws its masks from these per-example streams. `None` is eval
    /// mode.
    pub dropout: Option<&'a mut DropoutKeys>,
    /// Apply LoRA adapters. `false` is PEFT's `disable_adapter()`: the reference model of
    /// PPO without a second copy (trained biases and saved modules then read their kept
    /// originals; see `rlhf_models::lora`). Models without adapters ignore it.
    pub adapters: bool,
    /// Where the embedding lookups put their tables' gradients (touched rows only) instead
    /// of the graph; see [`rlhf_ops::sink`]. `None`: dense gradients through the graph.
    pub sink: Option<&'a GradSink>,
}

impl<'a> Fwd<'a> {
    /// Eval mode without gradients (generation, scoring, reference log-probs).
    pub fn eval() -> Fwd<'static> {
        Fwd {
            grad: false,
            dropout: None,
            adapters: true,
            sink: None,
        }
    }

    /// Eval mode (no dropout) that records gradients.
    pub fn eval_grad() -> Fwd<'static> {
        Fwd {
            grad: true,
            dropout: None,
            adapters: true,
            sink: None,
        }
    }

    /// Train mode: gradients and dropout keyed by example ([`DropoutKeys`]).
    pub fn train(keys: &mut DropoutKeys) -> Fwd<'_> {
        Fwd {
            grad: true,
            dropout: Some(keys),
            adapters: true,
            sink: None,
        }
    }

    /// The same pass with adapters disabled: `Fwd::eval().without_adapters()` is the
    /// reference model of a LoRA policy.
    pub fn without_adapters(self) -> Self {
        Fwd {
            adapters: false,
            ..self
        }
    }

    /// The same pass with embedding gradients delivered to `sink`.
    pub fn with_sink<'b>(self, sink: &'b GradSink) -> Fwd<'b>
    where
        'a: 'b,
    {
        Fwd {
            sink: Some(sink),
            ..self
        }
    }

    /// Applies dropout with probability `p` to per-token activations in train mode;
    /// identity in eval mode.
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self.dropout.as_deref_mut() {
            Some(keys) => Ok(keys.tokens(x, p)?),
            None => Ok(x.clone()),
        }
    }

    /// Applies dropout with probability `p` to padded attention probabilities `(B, nh, T, T)`
    /// in train mode; identity in eval mode.
    pub fn dropout_attention(&mut self, probs: &Tensor, p: f64) -> Result<Tensor> {
        match self.dropout.as_deref_mut() {
            Some(keys) => Ok(keys.attention(probs, p)?),
            None => Ok(probs.clone()),
        }
    }

    /// The settings a projection needs ([`ProjCtx`]), borrowing the dropout stream.
    pub fn proj(&mut self) -> ProjCtx<'_> {
        ProjCtx {
            grad: self.grad,
            adapters: self.adapters,
            dropout: self.dropout.as_deref_mut(),
        }
    }
}
