//! NaN-aware statistics over host values, as TRL computes them on rewards and per-row
//! metrics (`torch.nanmean`, `trl.trainer.utils.nanstd` / `nanmin` / `nanmax`,
//! `torch.isclose(x, 0)`). A NaN is a missing value (a reward function returned `None`).

/// Mean of the non-NaN values; NaN when there are none (`torch.nanmean`).
pub fn nanmean(x: &[f64]) -> f64 {
    let (sum, n) = x
        .iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// Unbiased (Bessel, `n - 1`) standard deviation of the non-NaN values; NaN when fewer
/// than two remain. Matches `trl.trainer.utils.nanstd`.
pub fn nanstd(x: &[f64]) -> f64 {
    let mean = nanmean(x);
    let (ss, n) = x
        .iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + (v - mean).powi(2), n + 1));
    if n < 2 {
        f64::NAN
    } else {
        (ss / (n - 1) as f64).sqrt()
    }
}

/// Smallest non-NaN value; NaN when all are NaN (`trl.trainer.utils.nanmin`).
pub fn nanmin(x: &[f64]) -> f64 {
    x.iter()
        .filter(|v| !v.is_nan())
        .copied()
        .reduce(f64::min)
        .unwrap_or(f64::NAN)
}

/// Largest non-NaN value; NaN when all are NaN (`trl.trainer.utils.nanmax`).
pub fn nanmax(x: &[f64]) -> f64 {
    x.iter()
        .filter(|v| !v.is_nan())
        .copied()
        .reduce(f64::max)
        .unwrap_or(f64::NAN)
}

/// Sum of the non-NaN values; NaN when all are NaN. `torch.nansum` gives 0 for the
/// all-NaN case; TRL then marks such rows NaN by hand, which this folds in.
pub fn nansum_or_nan(x: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = x
        .into_iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum
    }
}

/// `torch.isclose(x, 0)` with its default tolerances (`|x| <= 1e-8`); false for NaN.
pub fn is_close_to_zero(x: f64) -> bool {
    x.abs() <= 1e-8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_statistics_skip_missing_values() {
        let x = [1.0, f64::NAN, 3.0, 5.0];
        assert_eq!(nanmean(&x), 3.0);
        assert_eq!(nanstd(&x), 2.0); // deviations -2, 0, 2 → 8 / 2
        assert_eq!(nanmin(&x), 1.0);
        assert_eq!(nanmax(&x), 5.0);
        assert_eq!(nansum_or_nan(x), 9.0);
    }

    #[test]
    fn nan_statistics_of_too_few_values_are_nan() {
        assert!(nanmean(&[f64::NAN]).is_nan());
        assert!(nanstd(&[2.0, f64::NAN]).is_nan());
        assert!(nanmin(&[]).is_nan());
        assert!(nanmax(&[f64::NAN]).is_nan());
        assert!(nansum_or_nan([f64::NAN, f64::NAN]).is_nan());
        assert!(!is_close_to_zero(f64::NAN));
        assert!(is_close_to_zero(1e-9));
    }
}
