//! The pairwise reward-model loss (`RewardTrainer.compute_loss`, TRL 0.11 and head alike):
//! Bradley–Terry preference likelihood (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).

use candle_core::Tensor;

use super::{same_dims, Result};

/// Numerically stable, differentiable `log(sigmoid(x))` (`F.logsigmoid`), as
/// `min(x, 0) - log(1 + exp(-|x|))` with `min(x, 0) = (x - |x|) / 2`. Finite for every
/// finite `x`; the gradient is `sigmoid(-x)`. Without `log1p` the result's absolute error
/// is below 6e-8 (in f32) when `exp(-|x|)` is tiny.
///
/// # Shapes
/// `x`: any → the same.
pub fn logsigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let min_x_0 = (x - &abs)?.affine(0.5, 0.0)?;
    let softplus_neg_abs = (abs.neg()?.exp()? + 1.0)?.log()?;
    Ok((min_x_0 - softplus_neg_abs)?)
}

/// Bradley–Terry loss of a reward model on preference pairs, as `RewardTrainer.compute_loss`:
/// `mean(-logsigmoid(r_chosen - r_rejected - margin))`, plus
/// `center_rewards_coefficient * mean((r_chosen + r_rejected)^2)` when the coefficient is set
/// (Eisenstein et al. 2023, the auxiliary loss that keeps rewards centred on 0).
/// Differentiable with respect to both rewards. At `r_chosen == r_rejected` it is `ln 2`.
///
/// # Errors
/// [`super::PpoError::Shape`] when the reward (or margin) vectors differ in shape.
///
/// # Shapes
/// `r_chosen`, `r_rejected`, `margin`: `(B)` → `()`.
pub fn bradley_terry_loss(
    r_chosen: &Tensor,
    r_rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<Tensor> {
    same_dims("bradley_terry_loss", ("r_chosen", r_chosen), ("r_rejected", r_rejected))?;
    let mut diff = (r_chosen - r_rejected)?;
    if let Some(margin) = margin {
        same_dims("bradley_terry_loss", ("r_chosen", r_chosen), ("margin", margin))?;
        diff = (diff - margin)?;
    }
    let mut loss = logsigmoid(&diff)?.mean_all()?.neg()?;
    if let Some(coef) = center_rewards_coefficient {
        let centre = (r_chosen + r_rejected)?.sqr()?.mean_all()?;
        loss = (loss + centre.affine(coef, 0.0)?)?;
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::RngStream;
    use candle_core::{DType, Device, Var};

    fn v1(x: &[f32]) -> Tensor {
        Tensor::new(x, &Device::Cpu).unwrap()
    }

    #[test]
    fn bradley_terry_at_equal_rewards_is_ln_2() {
        let r = v1(&[0.3, -1.0, 2.0]);
        let loss = bradley_terry_loss(&r, &r, None, None).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - 2f32.ln()).abs() < 1e-7);
    }

    #[test]
    fn logsigmoid_is_finite_and_accurate_at_large_magnitudes() {
        let x = v1(&[-1000.0, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0]);
        let got = logsigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in [-1000.0f64, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0].iter().zip(got) {
            let want = -(1.0 + (-x).exp()).ln(); // f64 reference, exact enough here
            let want = if *x < -700.0 { *x } else { want };
            assert!(y.is_finite(), "logsigmoid({x}) = {y}");
            assert!((y as f64 - want).abs() < 1e-6, "logsigmoid({x}) = {y}, want {want}");
        }
    }

    #[test]
    fn margin_and_centring_terms_add_as_documented() {
        let rc = v1(&[1.0, 0.5]);
        let rr = v1(&[0.0, 1.5]);
        let margin = v1(&[0.5, -1.0]);
        let loss = bradley_terry_loss(&rc, &rr, Some(&margin), Some(0.01)).unwrap();
        // diffs: 1 - 0 - 0.5 = 0.5 and 0.5 - 1.5 + 1 = 0; sums: 1 and 2.
        let nll = |d: f64| (1.0 + (-d).exp()).ln();
        let want = (nll(0.5) + nll(0.0)) / 2.0 + 0.01 * (1.0 + 4.0) / 2.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn bradley_terry_loss_gradient_matches_finite_differences() {
        let n = 5;
        let mut rng = RngStream::new(11);
        // Include large gaps, where a naive log(sigmoid(x)) would lose its gradient.
        let mut rc: Vec<f64> = (0..n).map(|_| 4.0 * rng.uniform_f64() - 2.0).collect();
        let rr: Vec<f64> = (0..n).map(|_| 4.0 * rng.uniform_f64() - 2.0).collect();
        rc[0] = 40.0;
        rc[1] = -40.0;
        let margin = Tensor::new(&[0.1f64, 0.0, -0.2, 0.3, 0.0], &Device::Cpu).unwrap();
        let f = |rc: &[f64], rr: &[f64]| -> f64 {
            let (c, r) = (Tensor::new(rc, &Device::Cpu).unwrap(), Tensor::new(rr, &Device::Cpu));
            bradley_terry_loss(&c, &r.unwrap(), Some(&margin), Some(0.05))
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let to32 = |x: &[f64]| Tensor::new(x, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let (vc, vr) = (
            Var::from_tensor(&to32(&rc)).unwrap(),
            Var::from_tensor(&to32(&rr)).unwrap(),
        );
        let m32 = margin.to_dtype(DType::F32).unwrap();
        let loss = bradley_terry_loss(vc.as_tensor(), vr.as_tensor(), Some(&m32), Some(0.05));
        let grads = loss.unwrap().backward().unwrap();
        let g = |v: &Var| grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let (gc, gr) = (g(&vc), g(&vr));
        let eps = 1e-6;
        for i in 0..n {
            let (mut p, mut m) = (rc.clone(), rc.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (f(&p, &rr) - f(&m, &rr)) / (2.0 * eps);
            assert!((gc[i] as f64 - fd).abs() < 1e-5, "chosen[{i}]: {} vs {fd}", gc[i]);
            let (mut p, mut m) = (rr.clone(), rr.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (f(&rc, &p) - f(&rc, &m)) / (2.0 * eps);
            assert!((gr[i] as f64 - fd).abs() < 1e-5, "rejected[{i}]: {} vs {fd}", gr[i]);
        }
    }
}
