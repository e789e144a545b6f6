//! `PPOConfig` of TRL 0.11 (same names and defaults), validated into a plan before any
//! work, and TRL's `RunningMoments` for score scaling.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// TRL 0.11's `PPOConfig` (fields and defaults), plus the settings of the `rlhf ppo` loop.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PpoConfig {
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Samples per `step()`.
    pub batch_size: usize,
    /// Samples per optimisation minibatch (and per forward chunk).
    pub mini_batch_size: usize,
    /// Minibatches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Optimisation epochs over each batch.
    pub ppo_epochs: usize,
    /// Discount.
    pub gamma: f64,
    /// GAE λ.
    pub lam: f64,
    /// Policy ratio clip.
    pub cliprange: f64,
    /// Value clip around the old values.
    pub cliprange_value: f64,
    /// Value-loss weight.
    pub vf_coef: f64,
    /// Adaptive KL coefficient (Ziegler et al. 2019) instead of a fixed one.
    pub adap_kl_ctrl: bool,
    /// Initial KL coefficient.
    pub init_kl_coef: f64,
    /// `kl`, `abs`, `mse` or `full`.
    pub kl_penalty: String,
    /// Target KL of the adaptive controller.
    pub target: f64,
    /// Horizon of the adaptive controller.
    pub horizon: f64,
    /// Whiten rewards before GAE.
    pub whiten_rewards: bool,
    /// Divide scores by their running std.
    pub use_score_scaling: bool,
    /// Also subtract the running mean (with `use_score_scaling`).
    pub use_score_norm: bool,
    /// Clip scores to `±score_clip`.
    pub score_clip: Option<f64>,
    /// Stop the epoch loop when `policykl > 1.5 * target_kl`.
    pub early_stopping: bool,
    /// Target of early stopping.
    pub target_kl: f64,
    /// Skip (zero) a minibatch whose mean ratio exceeds this.
    pub ratio_threshold: f64,
    /// Gradient clipping (none by default).
    pub max_grad_norm: Option<f64>,
    /// Total samples; PPO steps = `ceil(steps / batch_size)`.
    pub steps: u64,
    /// Seed.
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1.41e-5,
            batch_size: 128,
            mini_batch_size: 128,
            gradient_accumulation_steps: 1,
            ppo_epochs: 4,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            adap_kl_ctrl: true,
            init_kl_coef: 0.2,
            kl_penalty: "kl".into(),
            target: 6.0,
            horizon: 10000.0,
            whiten_rewards: false,
            use_score_scaling: false,
            use_score_norm: false,
            score_clip: None,
            early_stopping: false,
            target_kl: 1.0,
            ratio_threshold: 10.0,
            max_grad_norm: None,
            steps: 20000,
            seed: 0,
        }
    }
}

impl PpoConfig {
    /// Samples per optimizer step (`mini_batch_size * gradient_accumulation_steps`).
    pub fn backward_batch_size(&self) -> usize {
        self.mini_batch_size.saturating_mul(self.gradient_accumulation_steps)
    }

    /// PPO steps of a run (`ceil(steps / batch_size)`, TRL's `total_ppo_epochs`).
    pub fn total_ppo_steps(&self) -> u64 {
        self.steps.div_ceil(self.batch_size.max(1) as u64)
    }

    /// Checks every field and combination, saying what is wrong and how to fix it.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, msg: String| Err(TrainError::setting(k, msg));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(
                "learning_rate",
                format!("must be a non-negative number, got {}", self.learning_rate),
            );
        }
        for (k, v) in [
            ("batch_size", self.batch_size),
            ("mini_batch_size", self.mini_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("ppo_epochs", self.ppo_epochs),
        ] {
            if v == 0 {
                return bad(k, "must be at least 1".into());
            }
        }
        if self.mini_batch_size > self.batch_size {
            return bad(
                "mini_batch_size",
                format!(
                    "({}) is larger than batch_size ({}); lower it or raise batch_size",
                    self.mini_batch_size, self.batch_size
                ),
            );
        }
        if self
            .mini_batch_size
            .checked_mul(self.gradient_accumulation_steps)
            .is_none()
        {
            return bad(
                "gradient_accumulation_steps",
                "mini_batch_size × gradient_accumulation_steps overflows; use realistic sizes".into(),
            );
        }
        if !self.batch_size.is_multiple_of(self.backward_batch_size()) {
            return bad(
                "batch_size",
                format!(
                    "({}) must be a multiple of mini_batch_size × gradient_accumulation_steps ({} × {} = {})",
                    self.batch_size,
                    self.mini_batch_size,
                    self.gradient_accumulation_steps,
                    self.backward_batch_size()
                ),
            );
        }
        if rlhf_ops::ppo::KlPenalty::from_trl_name(&self.kl_penalty).is_none() {
            return bad(
                "kl_penalty",
                format!("`{}`: expected kl, abs, mse or full", self.kl_penalty),
            );
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lam) {
            return bad(
                "gamma",
                format!("gamma ({}) and lam ({}) must be in [0, 1]", self.gamma, self.lam),
            );
        }
        for (k, v) in [
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("vf_coef", self.vf_coef),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(k, format!("must be >= 0, got {v}"));
            }
        }
        if self.init_kl_coef < 0.0 {
            return bad("init_kl_coef", format!("must be >= 0, got {}", self.init_kl_coef));
        }
        if self.adap_kl_ctrl && (self.target <= 0.0 || self.horizon <= 0.0) {
            return bad("target", "target and horizon must be > 0 with adap_kl_ctrl".into());
        }
        if self.early_stopping && self.target_kl <= 0.0 {
            return bad("target_kl", "must be > 0 with early_stopping".into());
        }
        if self.use_score_norm && !self.use_score_scaling {
            return bad(
                "use_score_norm",
                "only applies with use_score_scaling = true; set both".into(),
            );
        }
        if self.score_clip.is_some_and(|c| c <= 0.0) {
            return bad("score_clip", "must be > 0".into());
        }
        if self.ratio_threshold <= 0.0 {
            return bad("ratio_threshold", "must be > 0".into());
        }
        Ok(())
    }
}

/// TRL's `RunningMoments`: running mean and std of scores across steps (Welford / Chan
/// parallel update), used by `use_score_scaling`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunningMoments {
    /// Running mean.
    pub mean: f64,
    /// Running (unbiased) std.
    pub std: f64,
    /// Running (biased) variance.
    pub var: f64,
    /// Samples seen.
    pub count: f64,
}

impl Default for RunningMoments {
    fn default() -> Self {
        Self {
            mean: 0.0,
            std: 1.0,
            var: 1.0,
            count: 1e-24,
        }
    }
}

impl RunningMoments {
    /// Adds a batch; returns the batch's mean and unbiased std.
    pub fn update(&mut self, xs: &[f32]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let delta = mean - self.mean;
        let tot = self.count + n;
        let old_sum = self.var * self.count + delta * delta * self.count * n / tot;
        let tot_sum = old_sum + var * n;
        self.mean += delta * n / tot;
        let new_var = tot_sum / tot;
        self.std = (new_var * tot / (tot - 1.0)).sqrt();
        self.var = new_var;
        self.count = tot;
        (mean, (var * n / (n - 1.0)).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_trl_0_11() {
        let c = PpoConfig::default();
        assert_eq!(
            (c.learning_rate, c.batch_size, c.mini_batch_size, c.ppo_epochs),
            (1.41e-5, 128, 128, 4)
        );
        assert_eq!(
            (c.init_kl_coef, c.target, c.horizon, c.ratio_threshold),
            (0.2, 6.0, 10000.0, 10.0)
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_combinations_fail_with_the_fix() {
        let c = PpoConfig {
            batch_size: 8,
            mini_batch_size: 16,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("larger than batch_size"));
        let c = PpoConfig {
            batch_size: 10,
            mini_batch_size: 4,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of mini_batch_size"));
        let c = PpoConfig {
            learning_rate: -1.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("learning_rate"));
        let c = PpoConfig {
            kl_penalty: "kl2".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("kl, abs, mse or full"));
    }

    #[test]
    fn running_moments_match_the_pooled_statistics() {
        let mut m = RunningMoments::default();
        m.update(&[1.0, 2.0, 3.0]);
        m.update(&[4.0, 5.0]);
        assert!((m.mean - 3.0).abs() < 1e-9);
        assert!((m.std - 2.5f64.sqrt()).abs() < 1e-9);
    }
}
