//! Optimizers and schedules: Adam / AdamW as `torch.optim` computes them, one fused pass
//! over each parameter buffer; the linear warm-up schedule of transformers; global-norm
//! gradient clipping; gradient accumulation across micro-batches.

use std::collections::BTreeMap;

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;
use rlhf_ops::simd::{adamw_f32, add_in_place_f32, scale_in_place_f32, sum_squares_f64, AdamStep};
use rlhf_ops::sink::SinkEntry;

use crate::error::{Result, TrainError};

/// Hyper-parameters of Adam / AdamW (`torch.optim.AdamW` defaults, HF `TrainingArguments`
/// names).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    /// β₁ (`adam_beta1`).
    pub beta1: f64,
    /// β₂ (`adam_beta2`).
    pub beta2: f64,
    /// ε (`adam_epsilon`).
    pub eps: f64,
    /// Decoupled weight decay (AdamW; 0 = Adam).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Whether transformers' `Trainer` applies weight decay to a parameter: not to biases and
/// not to layer norms (`get_decay_parameter_names`).
pub fn decays(name: &str) -> bool {
    !(name.ends_with("bias") || name.split('.').any(|s| s.starts_with("ln_") || s.contains("norm")))
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// The moments in host memory (parameters on the CPU; empty otherwise).
    m: Vec<f32>,
    v: Vec<f32>,
    /// The moments as f32 tensors on the parameter's device (parameters off the CPU).
    on_device: Option<(Tensor, Tensor)>,
}

impl Slot {
    /// Moments as zero tensors on the parameter's device when `on_device` (falling back to
    /// host vectors if that allocation fails), else as host vectors.
    fn new(name: String, var: Var, on_device: bool) -> Self {
        let n = var.elem_count();
        let dev = on_device
            .then(|| Tensor::zeros(n, DType::F32, var.device()).ok())
            .flatten()
            .map(|z| (z.clone(), z));
        let host = if dev.is_some() { 0 } else { n };
        Slot {
            decay: decays(&name),
            name,
            var,
            m: vec![0.0; host],
            v: vec![0.0; host],
            on_device: dev,
        }
    }
}

/// Adam with decoupled weight decay (Loshchilov & Hutter 2019), exactly torch's update:
/// `p -= lr·wd·p; m = β₁m + (1-β₁)g; v = β₂v + (1-β₂)g²;
/// p -= lr/(1-β₁ᵗ) · m / (sqrt(v)/sqrt(1-β₂ᵗ) + ε)`. With `weight_decay = 0` this is Adam
/// (TRL's PPO default).
pub struct AdamW {
    cfg: AdamConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// An optimizer over named variables; weight decay follows [`decays`]. The moments of
    /// a parameter live on its device: host vectors for the CPU, f32 tensors elsewhere.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamConfig) -> Self {
        Self::with_state_placement(params, cfg, |var| !var.device().is_cpu())
    }

    /// [`AdamW::new`] with the moments of every parameter kept as device tensors and updated
    /// with tensor ops (the path of parameters off the CPU), wherever the parameters are;
    /// the test oracle of that path on the CPU.
    pub fn with_device_state(params: Vec<(String, Var)>, cfg: AdamConfig) -> Self {
        Self::with_state_placement(params, cfg, |_| true)
    }

    fn with_state_placement(params: Vec<(String, Var)>, cfg: AdamConfig, on_device: impl Fn(&Var) -> bool) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let dev = on_device(&var);
                Slot::new(name, var, dev)
            })
            .collect();
        Self { cfg, slots, step: 0 }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Names of the optimised parameters, in order.
    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// The variables, in order.
    pub fn vars(&self) -> Vec<&Var> {
        self.slots.iter().map(|s| &s.var).collect()
    }

    /// Number of optimised scalars.
    pub fn num_params(&self) -> usize {
        self.slots.iter().map(|s| s.var.elem_count()).sum()
    }

    /// One update with learning rate `lr` from accumulated gradients (aligned with the
    /// parameters; `None` = no gradient, the parameter is left alone as torch does).
    /// f32 parameters on the CPU are updated in place in one pass over `p, g, m, v`; others
    /// go through [`AdamW::step_copying`]'s copy in and out.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let k = self.coefficients(lr);
        for (slot, g) in self.slots.iter_mut().zip(&grads.sums) {
            let Some(g) = g else { continue };
            let decay = k.decay(slot.decay);
            let t = slot.var.as_tensor();
            if let Some((m, v)) = &mut slot.on_device {
                adam_update_tensors(&slot.var, m, v, g, &k, decay)?;
            } else if rlhf_ops::kernels::applies(&[t]) && t.is_contiguous() {
                let op = InPlaceAdam {
                    k: &k,
                    decay,
                    g,
                    mv: Mutex::new((&mut slot.m, &mut slot.v)),
                };
                t.inplace_op1(&op)?;
            } else {
                adam_update_copying(&slot.var, &mut slot.m, &mut slot.v, g, &k, decay)?;
            }
        }
        Ok(())
    }

    /// The same update as [`AdamW::step`], copying each parameter out to a `Vec` and back
    /// (any dtype); the test oracle of the in-place path.
    pub fn step_copying(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let k = self.coefficients(lr);
        for (slot, g) in self.slots.iter_mut().zip(&grads.sums) {
            let Some(g) = g else { continue };
            let decay = k.decay(slot.decay);
            match &mut slot.on_device {
                Some((m, v)) => adam_update_tensors(&slot.var, m, v, g, &k, decay)?,
                None => adam_update_copying(&slot.var, &mut slot.m, &mut slot.v, g, &k, decay)?,
            }
        }
        Ok(())
    }

    fn coefficients(&self, lr: f64) -> AdamCoefficients {
        let t = self.step as i32;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        AdamCoefficients {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            eps: c.eps as f32,
            step_size: (lr / bc1) as f32,
            inv_bc2: (1.0 / bc2_sqrt) as f32,
            weight_decay: (1.0 - lr * c.weight_decay) as f32,
        }
    }

    /// The moment buffers and step count, for a checkpoint.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            let (m, v) = match &s.on_device {
                Some((m, v)) => (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?),
                None => (
                    Tensor::new(s.m.as_slice(), &Device::Cpu)?,
                    Tensor::new(s.v.as_slice(), &Device::Cpu)?,
                ),
            };
            out.insert(format!("{}.exp_avg", s.name), m);
            out.insert(format!("{}.exp_avg_sq", s.name), v);
        }
        out.insert("step".into(), Tensor::new(&[self.step as f32], &Device::Cpu)?);
        Ok(out)
    }

    /// Restores what [`AdamW::state`] saved; every buffer must be present with its size.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |k: &str, n: usize| -> Result<Vec<f32>> {
            let t = state
                .get(k)
                .ok_or_else(|| TrainError::Checkpoint(format!("optimizer state has no `{k}`")))?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != n {
                return Err(TrainError::Checkpoint(format!(
                    "optimizer state `{k}` has {} values, expected {n}",
                    v.len()
                )));
            }
            Ok(v)
        };
        for s in &mut self.slots {
            let n = s.var.elem_count();
            let (m, v) = (
                get(&format!("{}.exp_avg", s.name), n)?,
                get(&format!("{}.exp_avg_sq", s.name), n)?,
            );
            match &mut s.on_device {
                Some(dev) => {
                    let d = s.var.device();
                    *dev = (Tensor::from_vec(m, n, d)?, Tensor::from_vec(v, n, d)?);
                }
                None => (s.m, s.v) = (m, v),
            }
        }
        self.step = get("step", 1)?[0] as u64;
        Ok(())
    }
}

/// The per-step constants of the Adam update.
struct AdamCoefficients {
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    inv_bc2: f32,
    /// `1 - lr·wd`, the decoupled decay factor of decaying parameters.
    weight_decay: f32,
}

impl AdamCoefficients {
    fn decay(&self, decays: bool) -> f32 {
        if decays {
            self.weight_decay
        } else {
            1.0
        }
    }
}

/// Elements per parallel task of the element-wise optimizer loops.
const CHUNK: usize = 1 << 14;

fn adam_par(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamCoefficients, decay: f32) {
    let k = AdamStep {
        b1: k.b1,
        b2: k.b2,
        eps: k.eps,
        step_size: k.step_size,
        inv_bc2: k.inv_bc2,
        decay,
    };
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| adamw_f32(p, m, v, g, &k));
}

fn adam_update_copying(
    var: &Var,
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    k: &AdamCoefficients,
    decay: f32,
) -> Result<()> {
    let t = var.as_tensor();
    let mut p = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    adam_par(&mut p, m, v, g, k, decay);
    let new = Tensor::from_vec(p, t.shape(), t.device())?.to_dtype(t.dtype())?;
    var.set(&new)?;
    Ok(())
}

/// The Adam update in tensor ops on the parameter's device (the moments stay there; the
/// accumulated gradient is copied over once): the path of parameters off the CPU. The
/// same formula as `adamw_f32`: `m = β₁m + (1-β₁)g`, `v = β₂v + (1-β₂)g²`,
/// `p = p·decay − step_size·m / (sqrt(v)·inv_bc2 + ε)`.
fn adam_update_tensors(
    var: &Var,
    m: &mut Tensor,
    v: &mut Tensor,
    g: &[f32],
    k: &AdamCoefficients,
    decay: f32,
) -> Result<()> {
    let t = var.as_tensor();
    let g = Tensor::from_slice(g, g.len(), t.device())?;
    let (b1, b2) = (k.b1 as f64, k.b2 as f64);
    *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let denom = ((v.sqrt()? * k.inv_bc2 as f64)? + k.eps as f64)?;
    let p = t.flatten_all()?.to_dtype(DType::F32)?;
    let p = ((p * decay as f64)? - ((&*m / denom)? * k.step_size as f64)?)?;
    var.set(&p.reshape(t.shape())?.to_dtype(t.dtype())?)?;
    Ok(())
}

/// The Adam update applied to a parameter's own storage.
struct InPlaceAdam<'a> {
    k: &'a AdamCoefficients,
    decay: f32,
    g: &'a [f32],
    mv: Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

impl InplaceOp1 for InPlaceAdam<'_> {
    fn name(&self) -> &'static str {
        "adam-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adam-in-place: expected a contiguous f32 parameter")
        };
        let mut guard = self.mv.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *guard;
        let p = &mut p[a..b];
        if p.len() != m.len() || p.len() != self.g.len() {
            candle_core::bail!(
                "adam-in-place: parameter has {} values, moments {}, gradient {}",
                p.len(),
                m.len(),
                self.g.len()
            )
        }
        adam_par(p, m, v, self.g, self.k, self.decay);
        Ok(())
    }
}

/// Runs `f` on the f32 values of `t` in row-major order, without a copy for a contiguous
/// f32 CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.is_contiguous() {
        let (st, l) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*st, l.contiguous_offsets()) {
            return Ok(f(&v[a..b]));
        }
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// `acc += x`, in parallel chunks.
fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, x)| add_in_place_f32(a, x));
}

/// Gradients summed over micro-batches, aligned with an optimizer's parameters.
pub struct Grads {
    /// One buffer per parameter (`None` until a gradient arrives).
    pub sums: Vec<Option<Vec<f32>>>,
}

impl Grads {
    /// Empty sums for `n` parameters.
    pub fn new(n: usize) -> Self {
        Self { sums: vec![None; n] }
    }

    /// Adds the gradients of `vars` from one backward pass.
    pub fn add(&mut self, vars: &[&Var], store: &GradStore) -> Result<()> {
        for (sum, var) in self.sums.iter_mut().zip(vars) {
            let Some(g) = store.get(var.as_tensor()) else { continue };
            match sum {
                Some(s) => with_f32(g, |g| add_into(s, g))?,
                None => *sum = Some(with_f32(g, <[f32]>::to_vec)?),
            }
        }
        Ok(())
    }

    /// Adds gradients that ops delivered to a [`rlhf_ops::sink::GradSink`] (dense ones and
    /// embedding rows), matched to `vars` by tensor id. Entries of other tensors are
    /// ignored (frozen weights).
    pub fn add_sink(&mut self, vars: &[&Var], entries: Vec<SinkEntry>) -> Result<()> {
        for entry in entries {
            let id = match &entry {
                SinkEntry::Dense { id, .. } | SinkEntry::Rows { id, .. } => *id,
            };
            let Some(i) = vars.iter().position(|v| v.as_tensor().id() == id) else {
                continue;
            };
            let n = vars[i].elem_count();
            if let SinkEntry::Dense { grad, .. } = &entry {
                if grad.elem_count() != n {
                    return Err(TrainError::Config(format!(
                        "gradient of {n} values expected, the sink holds {}",
                        grad.elem_count()
                    )));
                }
                if self.sums[i].is_none() {
                    self.sums[i] = Some(with_f32(grad, <[f32]>::to_vec)?);
                    continue;
                }
            }
            let sum = self.sums[i].get_or_insert_with(|| vec![0.0; n]);
            match entry {
                SinkEntry::Dense { grad, .. } => with_f32(&grad, |g| add_into(sum, g))?,
                SinkEntry::Rows { rows, grad, .. } => {
                    let h = grad.dims().last().copied().unwrap_or(1);
                    with_f32(&grad, |g| -> Result<()> {
                        for (r, row) in rows.iter().zip(g.chunks_exact(h)) {
                            let start = *r as usize * h;
                            let dst = sum.get_mut(start..start + h).ok_or_else(|| {
                                TrainError::Config(format!("embedding row {r} is outside a table of {n} values"))
                            })?;
                            dst.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                        }
                        Ok(())
                    })??
                }
            }
        }
        Ok(())
    }

    /// The global L2 norm of all gradients.
    pub fn norm(&self) -> f64 {
        let sq: f64 = self
            .sums
            .iter()
            .flatten()
            .map(|g| {
                g.par_chunks(CHUNK)
                    .map(sum_squares_f64)
                    .collect::<Vec<f64>>()
                    .iter()
                    .sum::<f64>()
            })
            .sum();
        sq.sqrt()
    }

    /// Scales gradients so their global norm is at most `max_norm` (torch's
    /// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`, capped at 1). Returns the
    /// norm before clipping, which is what transformers logs as `grad_norm`.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norm = self.norm();
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                let c = coef as f32;
                self.sums
                    .iter_mut()
                    .flatten()
                    .for_each(|g| g.par_chunks_mut(CHUNK).for_each(|g| scale_in_place_f32(g, c)));
            }
        }
        norm
    }

    /// Whether any gradient is NaN or infinite.
    pub fn non_finite(&self) -> bool {
        self.sums.iter().flatten().any(|g| g.iter().any(|x| !x.is_finite()))
    }
}

/// transformers' `get_linear_schedule_with_warmup`: the factor rises linearly from 0 to 1
/// over `warmup` steps, then falls linearly to 0 at `total`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearSchedule {
    /// Warm-up steps.
    pub warmup: u64,
    /// Total optimizer steps.
    pub total: u64,
}

impl LinearSchedule {
    /// The learning-rate factor at optimizer step `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let rest = self.total.saturating_sub(self.warmup).max(1) as f64;
        (self.total.saturating_sub(step) as f64 / rest).max(0.0)
    }
}

#[cfg(test)]
mod tests;
