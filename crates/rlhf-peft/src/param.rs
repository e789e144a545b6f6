//! Model weights that may or may not be trained.

use candle_core::{Result, Tensor, Var};

/// One weight tensor of a model.
///
/// A trainable weight is a candle [`Var`]: the optimizer updates it in place, and every
/// forward pass that asks for gradients sees it as a graph leaf. A detached view shares the
/// same storage, so no-grad passes (generation, reference log-probs, evaluation) see the
/// updated values without recording an autograd graph.
///
/// A weight may also keep a frozen copy of its *original* value (see
/// [`Param::keep_original`]): passes with adapters disabled read that copy, so a reference
/// model built by disabling LoRA is the base model even when biases or saved modules train
/// (PEFT's `modules_to_save` keeps its `original_module` the same way).
#[derive(Clone, Debug)]
pub struct Param {
    var: Option<Var>,
    tracked: Tensor,
    detached: Tensor,
    original: Option<Tensor>,
}

impl Param {
    /// A frozen weight: never receives a gradient.
    pub fn frozen(t: Tensor) -> Self {
        let t = t.detach();
        Self {
            var: None,
            tracked: t.clone(),
            detached: t,
            original: None,
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
            original: None,
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

    /// The tensor to use in a forward pass that may have adapters disabled: the kept
    /// original (see [`Param::keep_original`]) when `adapters` is false and there is one,
    /// otherwise [`Param::get`].
    pub fn get_in(&self, grad: bool, adapters: bool) -> &Tensor {
        match (&self.original, adapters) {
            (Some(o), false) => o,
            _ => self.get(grad),
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

    /// Makes the weight trainable (no-op when it already is). A kept original stays.
    pub fn make_trainable(&mut self) -> Result<()> {
        if self.var.is_none() {
            let original = self.original.take();
            *self = Self::trainable(&self.detached)?;
            self.original = original;
        }
        Ok(())
    }

    /// Freezes the weight, keeping its current value (and a kept original).
    pub fn freeze(&mut self) {
        if self.var.is_some() {
            let original = self.original.take();
            *self = Self::frozen(self.detached.clone());
            self.original = original;
        }
    }

    /// Replaces the current value with `t` (same shape; converted to this weight's dtype),
    /// keeping trainability and any kept original.
    pub fn assign(&mut self, t: &Tensor) -> Result<()> {
        if t.dims() != self.detached.dims() {
            candle_core::bail!(
                "cannot assign a tensor of shape {:?} to a weight of shape {:?}",
                t.dims(),
                self.detached.dims()
            )
        }
        let t = t.to_dtype(self.detached.dtype())?;
        match &self.var {
            Some(v) => v.set(&t),
            None => {
                let original = self.original.take();
                *self = Self::frozen(t);
                self.original = original;
                Ok(())
            }
        }
    }

    /// Keeps a frozen copy of the current value for passes with adapters disabled (a deep
    /// copy: the optimizer updates a variable's storage in place). No-op when one is kept.
    pub fn keep_original(&mut self) -> Result<()> {
        if self.original.is_none() {
            self.original = Some(self.detached.copy()?.detach());
        }
        Ok(())
    }

    /// Sets the kept original to `t` (e.g. the base checkpoint's value when an adapter file
    /// replaces this weight).
    pub fn set_original(&mut self, t: Tensor) {
        self.original = Some(t.detach());
    }

    /// The kept original, if any.
    pub fn original(&self) -> Option<&Tensor> {
        self.original.as_ref()
    }

    /// Forgets the kept original (after a merge, the current value is the model).
    pub fn drop_original(&mut self) {
        self.original = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_kept_original_survives_optimizer_updates_and_is_read_only_with_adapters_disabled() {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mut p = Param::frozen(t);
        p.make_trainable().unwrap();
        p.keep_original().unwrap();
        let new = Tensor::new(&[5f32, 6.0], &Device::Cpu).unwrap();
        p.var().unwrap().set(&new).unwrap();
        let read = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_eq!(read(p.get_in(false, true)), vec![5.0, 6.0]);
        assert_eq!(read(p.get_in(true, true)), vec![5.0, 6.0]);
        assert_eq!(read(p.get_in(false, false)), vec![1.0, 2.0]);
        p.freeze();
        assert_eq!(
            read(p.get_in(false, false)),
            vec![1.0, 2.0],
            "freeze keeps the original"
        );
        p.drop_original();
        assert_eq!(read(p.get_in(false, false)), vec![5.0, 6.0]);
    }
}
