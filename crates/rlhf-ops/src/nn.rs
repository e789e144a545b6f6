//! Differentiable building blocks for transformer layers.
//!
//! Every function here is composed from candle operations that have a backward pass, or
//! dispatches to a fused kernel of [`crate::kernels`] that has one (f32 on the CPU).
//! (Several fused candle-nn ops — `ops::layer_norm`, `softmax_last_dim`, `rms_norm` — cut
//! the autograd graph silently; these are the versions training may use.)

use candle_core::{DType, Device, Result, Tensor, D};

/// Layer normalisation over the last dimension (Ba et al. 2016; `torch.nn.LayerNorm`):
/// `y = (x - mean) / sqrt(var + eps) * w + b`, biased variance, computed in at least f32
/// precision (half-precision inputs are upcast).
///
/// # Shapes
/// `x`: `(.., H)`, `w`, `b`: `(H)` → `(.., H)` in the dtype of `x`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::applies(&[x, w, b]) {
        return crate::kernels::layer_norm(x, w, b, eps);
    }
    layer_norm_composed(x, w, b, eps)
}

/// [`layer_norm`] from candle ops (every dtype; the fused kernel's test oracle).
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?
        .broadcast_mul(&w.to_dtype(dtype)?)?
        .broadcast_add(&b.to_dtype(dtype)?)
}

/// RMSNorm over the last dimension in transformers' exact order (`LlamaRMSNorm`, also
/// Mistral's, Qwen2's and Qwen3's, whose `q_norm`/`k_norm` apply it per head):
/// `y = w · (x_f32 · rsqrt(mean(x_f32²) + eps)).to(dtype(x))` — the normalisation in f32 for
/// half-precision inputs, cast back to the input dtype *before* the weight multiplies it.
/// The output has the dtype of `x` (transformers' `weight * x` promotes to the weight's
/// dtype when it is wider; models here keep one dtype). f64 inputs stay f64 (transformers
/// would compute in f32), which is what the finite-difference tests need.
///
/// f32 on the CPU runs [`crate::kernels::rms_norm`]; every other case
/// [`rms_norm_composed`].
///
/// Qwen3's per-head norms: reshape `(N, heads·hd)` to `(N, heads, hd)` (free for the
/// contiguous output of a projection), normalise with a weight of `hd`, reshape back.
///
/// # Shapes
/// `x`: `(.., H)`, `w`: `(H)` → `(.., H)` in the dtype of `x`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::applies(&[x, w]) {
        return crate::kernels::rms_norm(x, w, eps);
    }
    rms_norm_composed(x, w, eps)
}

/// [`rms_norm`] from candle ops (every dtype; the fused kernel's test oracle).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(compute_dtype(dtype))?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xf.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?;
    xn.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
}

/// The gated activation of the SwiGLU MLP: `silu(gate) · up`, `silu(g) = g σ(g)`
/// (Shazeer 2020; transformers' `LlamaMLP`: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`,
/// `hidden_act = "silu"` in every Llama-family config).
///
/// f32 on the CPU runs [`crate::kernels::silu_mul`]; every other case
/// [`silu_mul_composed`] (candle's `silu` has a backward).
///
/// # Shapes
/// `gate`, `up`: the same shape, e.g. `(N, I)` → that shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(&[gate, up]) {
        return crate::kernels::silu_mul(gate, up);
    }
    silu_mul_composed(gate, up)
}

/// [`silu_mul`] from candle ops (every dtype; the fused kernel's test oracle).
pub fn silu_mul_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()?.mul(up)
}

/// Grouped-query attention's key/value expansion (transformers' `repeat_kv`): `(B, n_kv, T,
/// d)` → `(B, n_kv·n_rep, T, d)` where query head `h` gets kv head `h / n_rep`
/// (`repeat_interleave` order). Its backward sums the gradient of the `n_rep` copies.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, t, d) = x.dims4()?;
    // Copies side by side along time, then split back into heads: kv head g's copies become
    // heads g·n_rep .. (g+1)·n_rep.
    Tensor::cat(&vec![x; n_rep], 2)?.reshape((b, n_kv * n_rep, t, d))
}

/// The dtype reductions run in: f32 for half-precision inputs, else the input's own.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Softmax over the last dimension, `exp(x - max) / sum(exp(x - max))`. The max is
/// detached: it only shifts the exponent for stability and has no gradient.
///
/// # Shapes
/// `x`: `(.., N)` → `(.., N)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(&[x]) {
        return crate::kernels::softmax_last_dim(x);
    }
    softmax_last_dim_composed(x)
}

/// [`softmax_last_dim`] from candle ops (every dtype; the fused kernel's test oracle).
pub fn softmax_last_dim_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Activation functions of Hugging Face configs (`activation_function`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`: the tanh approximation
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `gelu`: the exact `x Φ(x)` with the error function.
    GeluErf,
    /// `relu`.
    Relu,
    /// `silu` / `swish`: `x σ(x)`.
    Silu,
}

impl Activation {
    /// Parses a Hugging Face `activation_function` name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::GeluErf),
            "relu" => Some(Self::Relu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    /// The names [`Activation::from_hf_name`] accepts.
    pub const HF_NAMES: &'static [&'static str] = &[
        "gelu_new",
        "gelu_pytorch_tanh",
        "gelu_fast",
        "gelu",
        "relu",
        "silu",
        "swish",
    ];

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh if crate::kernels::applies(&[x]) => crate::kernels::gelu_tanh(x),
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// Inverted dropout with an explicit mask source: zeroes each element with probability `p`
/// and scales the rest by `1 / (1 - p)` (`torch.nn.Dropout` in train mode).
///
/// `uniform` draws `n` samples in `[0, 1)`; callers pass a seeded generator so that runs are
/// reproducible.
pub fn dropout(x: &Tensor, p: f64, uniform: &mut dyn FnMut(usize) -> Vec<f32>) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let p = p as f32;
    let mask: Vec<f32> = uniform(x.elem_count())
        .into_iter()
        .map(|u| if u < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// An additive attention bias `(B, 1, T, S)`: 0 where query `t` (absolute position
/// `S - T + t`) may attend to key `s` — causal and `mask[b][s] == 1` — and `-1e9` elsewhere.
/// A query with no visible key (a left-padding position) attends to itself only, so its
/// softmax is well defined (no NaN, no dependence on other tokens); its output is never
/// used by real tokens, which cannot see padding keys.
pub fn causal_padding_bias(mask: &[Vec<u32>], t: usize, device: &Device) -> Result<Tensor> {
    causal_window_padding_bias(mask, t, None, device)
}

/// [`causal_padding_bias`] with an optional sliding window of `W` keys, transformers' rule
/// (`masking_utils.sliding_window_overlay`: `kv_idx > q_idx - sliding_window`): query `q`
/// (absolute index `S - T + q`) sees key `k` iff `k ≤ q`, `k > q − W` — the `W` most recent
/// keys including its own — and `mask[b][k] == 1`. (candle's Mistral/Qwen2 masks allow
/// `W + 1` keys.) Indices count every column of the mask, padding included, as transformers'
/// cache positions do. Masked entries are `-1e9`, never `-inf`, so no row can produce NaN.
///
/// # Shapes
/// `mask`: `B` rows of `S` → `(B, 1, T, S)` f32.
pub fn causal_window_padding_bias(
    mask: &[Vec<u32>],
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = mask.len();
    let s = mask.first().map_or(0, Vec::len);
    if let Some(i) = mask.iter().position(|r| r.len() != s) {
        candle_core::bail!(
            "attention mask row {i} has {} columns, row 0 has {s} (hint: pad every row to one length)",
            mask[i].len()
        )
    }
    if window == Some(0) {
        candle_core::bail!("sliding window of 0 keys (hint: use None for no window)")
    }
    if b > 0 && t > s {
        candle_core::bail!("{t} queries but only {s} mask columns (hint: the mask covers past and new tokens)")
    }
    let past = s.saturating_sub(t);
    let mut bias = vec![0f32; b * t * s];
    for (bi, row) in mask.iter().enumerate() {
        for q in 0..t {
            let qa = past + q;
            let out = &mut bias[(bi * t + q) * s..(bi * t + q + 1) * s];
            let mut visible = false;
            for (k, o) in out.iter_mut().enumerate() {
                let outside = window.is_some_and(|w| k + w <= qa);
                if k > qa || outside || row[k] == 0 {
                    *o = -1e9;
                } else {
                    visible = true;
                }
            }
            if !visible {
                out[qa] = 0.0;
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, s), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_normalises_rows() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [2., 2., 2., 6.]], &Device::Cpu)?;
        let w = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let y = layer_norm(&x, &w, &b, 0.0)?;
        let mean = y.mean_keepdim(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        let var = y.sqr()?.mean_keepdim(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        for (m, v) in mean.iter().zip(&var) {
            assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-5, "mean {m} var {v}");
        }
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_and_survive_large_negatives() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2., -1e9], [-1e9, -1e9, -1e9]], &Device::Cpu)?;
        let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
        assert!((y[0][0] + y[0][1] - 1.0).abs() < 1e-6 && y[0][2] == 0.0);
        assert!(y[1].iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn causal_padding_bias_hides_future_and_padding() -> Result<()> {
        let mask = vec![vec![0u32, 1, 1]];
        let bias = causal_padding_bias(&mask, 3, &Device::Cpu)?;
        let v = bias.flatten_all()?.to_vec1::<f32>()?;
        let allowed: Vec<bool> = v.iter().map(|x| *x == 0.0).collect();
        #[rustfmt::skip]
        let want = [true,  false, false,
                    false, true, false,
                    false, true, true];
        assert_eq!(allowed, want);
        Ok(())
    }

    #[test]
    fn dropout_keeps_expectation() -> Result<()> {
        let x = Tensor::ones(10_000, DType::F32, &Device::Cpu)?;
        let mut state = 12345u64;
        let mut uniform = |n: usize| {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect()
        };
        let y = dropout(&x, 0.1, &mut uniform)?;
        let mean = y.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        Ok(())
    }
}
