//! Masked statistics (`trl.core.masked_mean`, `masked_var`, `masked_whiten`).
//!
//! All reductions are token-level: a sum over every unmasked element of the whole tensor
//! divided by the mask's sum, not a mean of per-sequence means.

use candle_core::{DType, Tensor};

use super::{PpoError, Result};

/// Masked mean, `sum(values * mask) / sum(mask)`, over all elements (`axis = None`) or along
/// one axis. Matches `trl.core.masked_mean`; like it, an all-zero mask gives NaN (0/0).
///
/// # Shapes
/// `values`: any; `mask`: broadcastable to `values` (usually the same, `(B, T)`) →
/// `()` for `axis = None`, else `values` without `axis`.
pub fn masked_mean(values: &Tensor, mask: &Tensor, axis: Option<usize>) -> Result<Tensor> {
    let mask = mask.to_dtype(values.dtype())?;
    let weighted = values.broadcast_mul(&mask)?;
    let mean = match axis {
        None => weighted.sum_all()?.div(&mask.sum_all()?)?,
        Some(axis) => weighted.sum(axis)?.broadcast_div(&mask.sum(axis)?)?,
    };
    Ok(mean)
}

/// Masked variance over all elements, `masked_mean((values - masked_mean(values))^2)`,
/// multiplied by the Bessel correction `n / (n - 1)` with `n = sum(mask)` when `unbiased`.
/// Matches `trl.core.masked_var` (whose default is `unbiased=True`).
///
/// # Errors
/// [`PpoError::MaskTooSmall`] when `n == 0`, or `n <= 1` with `unbiased` (TRL raises on the
/// first and returns NaN on the second).
///
/// # Shapes
/// `values`, `mask`: the same shape, usually `(B, T)` → `()`.
pub fn masked_var(values: &Tensor, mask: &Tensor, unbiased: bool) -> Result<Tensor> {
    let n = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    let needed = if unbiased { 2 } else { 1 };
    if n.is_nan() || n < needed as f64 {
        return Err(PpoError::MaskTooSmall { sum: n, needed });
    }
    let mean = masked_mean(values, mask, None)?;
    let centered = values.broadcast_sub(&mean)?;
    let variance = masked_mean(&centered.sqr()?, mask, None)?;
    if unbiased {
        Ok(variance.affine(n / (n - 1.0), 0.0)?)
    } else {
        Ok(variance)
    }
}

/// Whitens `values` over the unmasked elements: `(values - mean) * rsqrt(var + 1e-8)` with
/// the masked mean and the unbiased masked variance; when `!shift_mean` the mean is added
/// back (only the scale changes). Matches `trl.core.masked_whiten`. Masked-out positions are
/// transformed too (TRL does not zero them).
///
/// # Errors
/// [`PpoError::MaskTooSmall`] when the mask sums to less than 2.
///
/// # Shapes
/// `values`, `mask`: `(B, T)` → `(B, T)`.
pub fn masked_whiten(values: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let mean = masked_mean(values, mask, None)?;
    let var = masked_var(values, mask, true)?;
    let inv_std = (var + 1e-8)?.sqrt()?.recip()?;
    let whitened = values.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;
    if shift_mean {
        Ok(whitened)
    } else {
        Ok(whitened.broadcast_add(&mean)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn masked_mean_ignores_masked_out_values() {
        let v = t2(&[&[1.0, 2.0, 100.0], &[3.0, -50.0, 6.0]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 1.0]]);
        assert!((scalar(&masked_mean(&v, &m, None).unwrap()) - 3.0).abs() < 1e-6);
        let rows = masked_mean(&v, &m, Some(1)).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(rows, vec![1.5, 4.5]);
    }

    #[test]
    fn masked_var_applies_bessel_correction_when_unbiased() {
        // Unmasked 1, 2, 3, 6: mean 3, squared deviations 4+1+0+9 = 14.
        let v = t2(&[&[1.0, 2.0, 100.0], &[3.0, -50.0, 6.0]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 1.0]]);
        let biased = scalar(&masked_var(&v, &m, false).unwrap());
        let unbiased = scalar(&masked_var(&v, &m, true).unwrap());
        assert!((biased - 14.0 / 4.0).abs() < 1e-6);
        assert!((unbiased - 14.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn masked_var_rejects_masks_too_small_for_the_correction() {
        let v = t2(&[&[1.0, 2.0]]);
        let one = t2(&[&[0.0, 1.0]]);
        let zero = t2(&[&[0.0, 0.0]]);
        assert!(matches!(
            masked_var(&v, &one, true),
            Err(PpoError::MaskTooSmall { needed: 2, .. })
        ));
        assert!(masked_var(&v, &one, false).is_ok());
        assert!(matches!(
            masked_var(&v, &zero, false),
            Err(PpoError::MaskTooSmall { needed: 1, .. })
        ));
    }

    #[test]
    fn masked_whiten_gives_zero_mean_and_unit_unbiased_variance() {
        let v = t2(&[&[1.0, 2.0, 100.0], &[3.0, -50.0, 6.0]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 1.0]]);
        let w = masked_whiten(&v, &m, true).unwrap();
        assert!(scalar(&masked_mean(&w, &m, None).unwrap()).abs() < 1e-6);
        assert!((scalar(&masked_var(&w, &m, true).unwrap()) - 1.0).abs() < 1e-5);
        // Masked-out positions are shifted and scaled too: (100 - 3) / sqrt(14/3).
        let got = w.to_vec2::<f32>().unwrap()[0][2];
        assert!((got - 97.0 / (14.0f32 / 3.0).sqrt()).abs() < 1e-4);
    }

    #[test]
    fn masked_whiten_without_shift_keeps_the_mean() {
        let v = t2(&[&[1.0, 2.0, 100.0], &[3.0, -50.0, 6.0]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 1.0]]);
        let w = masked_whiten(&v, &m, false).unwrap();
        assert!((scalar(&masked_mean(&w, &m, None).unwrap()) - 3.0).abs() < 1e-5);
        assert!((scalar(&masked_var(&w, &m, true).unwrap()) - 1.0).abs() < 1e-5);
    }
}
