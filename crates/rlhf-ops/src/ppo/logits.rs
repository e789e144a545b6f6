//! Log-probabilities and entropy from logits (`trl.core.logprobs_from_logits`,
//! `entropy_from_logits`).
//!
//! These are the composed, differentiable references: only candle ops with a backward pass
//! (`exp`, `sum_keepdim`, `log`, `gather`, broadcasting arithmetic), with the row maximum
//! detached because it only shifts the exponent. A fused kernel must match them.

use candle_core::{Tensor, D};

use super::{PpoError, Result};

/// `log(sum(exp(x)))` over the last dimension as `m + log(sum(exp(x - m)))`, `m` the detached
/// row maximum, so the gradient is `softmax(x)`.
///
/// # Shapes
/// `x`: `(.., V)` → `(.., 1)`.
fn logsumexp_keepdim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    Ok((sum.log()? + max)?)
}

/// Log-softmax over the last dimension, `x - logsumexp(x)` (`F.log_softmax(logits, -1)`,
/// what TRL's `logprobs_from_logits(.., gather=False)` returns). Differentiable.
///
/// # Shapes
/// `logits`: `(.., V)` → `(.., V)`.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.broadcast_sub(&logsumexp_keepdim(logits)?)?)
}

/// Log-probability of each label, `log_softmax(logits)[b, t, labels[b, t]]`, computed as
/// `logits[b, t, y] - logsumexp(logits[b, t])` so the `(B, T, V)` log-softmax is never
/// materialised. Matches `trl.core.logprobs_from_logits(logits, labels)` (gather=True).
/// Differentiable with respect to `logits` (gradient `onehot(y) - softmax`).
///
/// # Shapes
/// `logits`: `(B, T, V)` float; `labels`: `(B, T)` `u32` (or `u8`/`i64`) → `(B, T)`.
pub fn logprobs_from_logits(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, _v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(PpoError::Shape {
            function: "logprobs_from_logits",
            msg: format!(
                "`labels` has shape {:?}, expected (B, T) = ({b}, {t}) to match `logits` {:?}",
                labels.dims(),
                logits.dims()
            ),
        });
    }
    let index = labels.unsqueeze(D::Minus1)?.contiguous()?;
    let logits = logits.contiguous()?;
    let picked = logits.gather(&index, D::Minus1)?;
    Ok((picked - logsumexp_keepdim(&logits)?)?.squeeze(D::Minus1)?)
}

/// Entropy of the softmax distribution at every position,
/// `logsumexp(logits) - sum(softmax(logits) * logits)` (`trl.core.entropy_from_logits`),
/// evaluated on `logits - max` (the same value, better conditioned). Differentiable.
///
/// # Shapes
/// `logits`: `(B, T, V)` (any `(.., V)`) → `(B, T)` (`(..)`).
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let probs = exp.broadcast_div(&sum)?;
    let mean_logit = (probs * &shifted)?.sum_keepdim(D::Minus1)?;
    Ok((sum.log()? - mean_logit)?.squeeze(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::RngStream;
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64) -> Vec<f64> {
        let mut rng = RngStream::new(seed);
        let n = shape.iter().product();
        (0..n).map(|_| 4.0 * rng.uniform_f64() - 2.0).collect()
    }

    #[test]
    fn logprobs_of_uniform_logits_are_minus_log_v() {
        let logits = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[0u32, 1, 3], [2, 2, 0]], &Device::Cpu).unwrap();
        let lp = logprobs_from_logits(&logits, &labels).unwrap();
        for row in lp.to_vec2::<f32>().unwrap() {
            for x in row {
                assert!((x + 4f32.ln()).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn logprobs_match_log_softmax_gathered_and_survive_huge_logits() {
        let logits = Tensor::new(&[[[1000.0f32, 0.0, -1000.0], [1.0, 2.0, 3.0]]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        let lp = logprobs_from_logits(&logits, &labels)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let full = log_softmax(&logits).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(lp[0][0], -1000.0);
        assert_eq!(lp[0][0], full[0][0][1]);
        let expected = 3.0 - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((lp[0][1] - expected).abs() < 1e-6);
        assert!((full[0][1][2] - expected).abs() < 1e-6);
    }

    #[test]
    fn logprobs_reject_labels_of_the_wrong_shape() {
        let logits = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::zeros((3, 2), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            logprobs_from_logits(&logits, &labels),
            Err(PpoError::Shape { .. })
        ));
    }

    #[test]
    fn entropy_is_log_v_for_uniform_and_zero_for_peaked_logits() {
        let logits = Tensor::new(&[[[0.0f32; 5], [0.0, 0.0, 200.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let h = entropy_from_logits(&logits).unwrap().to_vec2::<f32>().unwrap();
        assert!((h[0][0] - 5f32.ln()).abs() < 1e-6);
        assert!(h[0][1].abs() < 1e-6);
    }

    /// Autograd in f32 (the training dtype) against central differences of the same
    /// function in f64.
    #[test]
    fn logprobs_from_logits_gradient_matches_finite_differences() {
        let shape = [2usize, 3, 5];
        let dev = Device::Cpu;
        let x64 = random(&shape, 7);
        let w64 = random(&shape[..2], 8);
        let labels = Tensor::new(&[[0u32, 4, 2], [3, 3, 1]], &dev).unwrap();
        let w = Tensor::from_vec(w64.clone(), (2, 3), &dev).unwrap();
        // f(x) = sum(w * logprobs_from_logits(x, labels)).
        let f = |x: &[f64]| -> f64 {
            let x = Tensor::from_vec(x.to_vec(), (2, 3, 5), &dev).unwrap();
            let lp = logprobs_from_logits(&x, &labels).unwrap();
            (lp * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let x32 = Var::from_tensor(
            &Tensor::from_vec(x64.clone(), (2, 3, 5), &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let lp = logprobs_from_logits(x32.as_tensor(), &labels).unwrap();
        let loss = (lp * w.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x32.as_tensor()).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        let eps = 1e-6;
        for i in 0..x64.len() {
            let (mut plus, mut minus) = (x64.clone(), x64.clone());
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (f(&plus) - f(&minus)) / (2.0 * eps);
            assert!(
                (g[i] as f64 - fd).abs() < 1e-5,
                "element {i}: autograd {} vs fd {fd}",
                g[i]
            );
        }
    }
}
