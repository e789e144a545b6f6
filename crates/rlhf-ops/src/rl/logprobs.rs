//! Per-token log-probs and entropy at a sampling temperature, and masked sequence sums.
//!
//! GRPO and RLOO score the policy, the old policy **and the reference** on
//! `logits / temperature` (TRL 1.16 `_get_per_token_logps_and_entropies`, whose fused LM
//! head divides the logits before the log-softmax); the entropy is that distribution's.
//! DPO uses no temperature. `top_k` / `top_p` are generation-only: training log-probs
//! use the full softmax.
//!
//! On the CPU (f32/f64) these call the fused kernels of [`crate::ppo`]; elsewhere the
//! composed candle ops, which are also the kernels' oracle.

use candle_core::Tensor;

use super::{Result, RlError};
use crate::ppo;
use crate::sink::GradSink;

/// Fails unless `temperature` is finite and positive.
fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(RlError::Config {
            field: "temperature",
            msg: format!("{temperature} is not a positive finite number\nhint: TRL's default is 1.0"),
        })
    }
}

/// Whether the fused CPU kernels can take a tensor of this device and dtype.
fn fused_ok(t: &Tensor) -> bool {
    crate::kernels::applies_f32_f64(&[t])
}

/// `(log_softmax(logits / τ)[labels], entropy(softmax(logits / τ)))` per position,
/// differentiable in `logits` through both outputs.
///
/// # Errors
/// [`RlError::Config`] for a non-positive temperature; [`RlError::Shape`] when `labels`
/// is not `logits` without its last dimension.
///
/// # Shapes
/// `logits`: `(B, T, V)` (any `(.., V)`), `labels`: `(B, T)` integer → two `(B, T)`.
pub fn tempered_logprobs_and_entropy(logits: &Tensor, labels: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    check_temperature(temperature)?;
    let scaled = if temperature == 1.0 {
        logits.clone()
    } else {
        logits.affine(1.0 / temperature, 0.0)?
    };
    if fused_ok(&scaled) {
        Ok(ppo::logprobs_and_entropy(&scaled, labels)?)
    } else {
        let lp = ppo::logprobs_from_logits(&scaled, labels)?;
        Ok((lp, ppo::entropy_from_logits(&scaled)?))
    }
}

/// The same from the LM head's input: `logits = (hidden / τ) · wᵀ`, without building the
/// `(B, T, V)` logits on the CPU ([`ppo::lm_head_logprobs_and_entropy`], whose `sink`
/// takes `w`'s gradient when given). Differentiable in `hidden` and `w`.
///
/// # Errors
/// As [`tempered_logprobs_and_entropy`].
///
/// # Shapes
/// `hidden`: `(B, T, H)`, `w`: `(V, H)`, `labels`: `(B, T)` → two `(B, T)`.
pub fn tempered_lm_head_logprobs_and_entropy(
    hidden: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    temperature: f64,
    sink: Option<&GradSink>,
) -> Result<(Tensor, Tensor)> {
    check_temperature(temperature)?;
    let scaled = if temperature == 1.0 {
        hidden.clone()
    } else {
        hidden.affine(1.0 / temperature, 0.0)?
    };
    if fused_ok(&scaled) && fused_ok(w) {
        Ok(ppo::lm_head_logprobs_and_entropy(&scaled, w, labels, sink)?)
    } else {
        let logits = scaled.broadcast_matmul(&w.t()?)?;
        let lp = ppo::logprobs_from_logits(&logits, labels)?;
        Ok((lp, ppo::entropy_from_logits(&logits)?))
    }
}

/// `Σ_t mask · values` per row (TRL: `(per_token_logps * completion_mask).sum(1)`, the
/// summed completion log-prob of RLOO and DPO). Differentiable in `values`.
///
/// # Shapes
/// `values`, `mask`: `(B, T)` → `(B)`.
pub fn masked_sequence_sum(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    super::expect_dims("masked_sequence_sum", "mask", mask, values.dims())?;
    Ok(values.mul(&mask.to_dtype(values.dtype())?)?.sum(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn temperature_divides_the_logits_before_the_softmax() {
        let logits = Tensor::new(&[[[1.0f64, 2.0, 4.0], [0.5, -1.0, 3.0]]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[2u32, 0]], &Device::Cpu).unwrap();
        let (lp, h) = tempered_logprobs_and_entropy(&logits, &labels, 0.7).unwrap();
        let (lp2, h2) = tempered_logprobs_and_entropy(&(&logits / 0.7).unwrap(), &labels, 1.0).unwrap();
        let d = (lp - lp2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let e = (h - h2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12 && e < 1e-12);
    }

    #[test]
    fn lm_head_form_equals_logits_form() {
        let dev = &Device::Cpu;
        let hidden = Tensor::new(&[[[0.1f64, -0.4], [0.3, 0.2]]], dev).unwrap();
        let w = Tensor::new(&[[1.0f64, 0.5], [-0.2, 0.7], [0.9, -1.1]], dev).unwrap();
        let labels = Tensor::new(&[[1u32, 2]], dev).unwrap();
        let logits = hidden.broadcast_matmul(&w.t().unwrap()).unwrap();
        let (a, ha) = tempered_logprobs_and_entropy(&logits, &labels, 0.5).unwrap();
        let (b, hb) = tempered_lm_head_logprobs_and_entropy(&hidden, &w, &labels, 0.5, None).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let e = (ha - hb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12 && e < 1e-12);
    }

    #[test]
    fn a_zero_temperature_is_an_error() {
        let logits = Tensor::zeros((1, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::zeros((1, 1), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            tempered_logprobs_and_entropy(&logits, &labels, 0.0),
            Err(RlError::Config { .. })
        ));
    }
}
