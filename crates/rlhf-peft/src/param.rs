//! Model weights that may or may not be trained.

use candle_core::{Result, Tensor, Var};

/// One weight tensor of a model.
///
/// A trainable weight is a candle [`Var`]: the optimizer updates it in place, and every
/// forward pass that asks for gradients sees it as a graph leaf. A detached view shares the
/// same storage, so no-grad passes (generation, reference log-probs, evaluation) see the
/// updated values without recording an autograd graph.
#[derive(Clone, Debug)]
pub struct Param {
    var: Option<Var>,
    tracked: Tensor,
    detached: Tensor,
}

impl Param {
    /// A frozen weight: never receives a gradient.
    pub fn frozen(t: Tensor) -> Self {
        let t = t.detach();
        Self {
            var: None,
            tracked: t.clone(),
            detached: t,
        }
    }

    /// A trainable weight (copies `t` once into a new variable).
    pub fn trainable(t: &Tensor) -> Result<Self> {
        let var = Var::from_tensor(&t.detach())?;
        let tracked = var.as_tensor().clone();
        let detached = tracked.detach();
        Ok(Self {
            var: Some(var),
            tracked,
            detached,
        })
    }

    /// The tensor to use in a forward pass: tracked for autograd when `grad` is true and
    /// the weight is trainable, otherwise a detached view.
    pub fn get(&self, grad: bool) -> &Tensor {
        if grad {
            &self.tracked
        } else {
            &self.detached
        }
    }

    /// The current value, detached from any graph.
    pub fn value(&self) -> &Tensor {
        &self.detached
    }

    /// The variable behind a trainable weight.
    pub fn var(&self) -> Option<&Var> {
        self.var.as_ref()
    }

    /// Whether the optimizer may update this weight.
    pub fn is_trainable(&self) -> bool {
        self.var.is_some()
    }

    /// Makes the weight trainable (no-op when it already is).
    pub fn make_trainable(&mut self) -> Result<()> {
        if self.var.is_none() {
            *self = Self::trainable(&self.detached)?;
        }
        Ok(())
    }

    /// Freezes the weight, keeping its current value.
    pub fn freeze(&mut self) {
        if self.var.is_some() {
            *self = Self::frozen(self.detached.clone());
        }
    }
}
