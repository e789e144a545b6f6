//! The precision of f32 matrix products: full f32 (the default), or bf16 inputs with f32
//! accumulation — the CPU counterpart of `torch.set_float32_matmul_precision("medium")` /
//! bf16 autocast, run by [`crate::bf16`]'s kernel (AVX512-BF16 dot products where the CPU
//! has them). Parameters, activations, gradients and optimizer state stay f32; only the
//! operands of the products are rounded to bf16 (8 bits of mantissa), each product is
//! exact, and the sums are f32.
//!
//! Decoding products (a few rows, no gradients) stay f32 in either mode: see [`matmul`].
//!
//! The setting belongs to the calling thread (a training loop's thread), so that programs
//! and tests running several models at once do not change each other's numerics. It is read
//! when a product is built in the forward pass; that product's backward products use the
//! same precision.

use std::cell::Cell;

use candle_core::{DType, Tensor};

/// How f32 matrix products are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 operands and sums (`torch`'s `"highest"`).
    #[default]
    Highest,
    /// bf16 operands, f32 sums (`"medium"`).
    Bf16,
}

thread_local! {
    static PRECISION: Cell<MatmulPrecision> = const { Cell::new(MatmulPrecision::Highest) };
}

/// Sets this thread's matrix-product precision.
pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.with(|c| c.set(p));
}

/// This thread's matrix-product precision.
pub fn matmul_precision() -> MatmulPrecision {
    PRECISION.with(Cell::get)
}

/// Sets this thread's precision until dropped, then restores the one before.
#[must_use = "the previous precision is restored when the guard drops"]
pub struct PrecisionGuard(MatmulPrecision);

impl PrecisionGuard {
    /// Sets `p` for this thread.
    pub fn set(p: MatmulPrecision) -> Self {
        let old = matmul_precision();
        set_matmul_precision(p);
        Self(old)
    }

    /// A run's `bf16` setting: bf16 when asked, else the thread's precision as it is.
    pub fn for_run(bf16: bool) -> Self {
        Self::set(if bf16 {
            MatmulPrecision::Bf16
        } else {
            matmul_precision()
        })
    }
}

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        set_matmul_precision(self.0);
    }
}

/// Runs `f` with this thread's precision set to `p`, restoring the previous one after.
pub fn with_matmul_precision<R>(p: MatmulPrecision, f: impl FnOnce() -> R) -> R {
    let _guard = PrecisionGuard::set(p);
    f()
}

/// An f32 matrix on the CPU.
fn f32_cpu_matrix(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && t.rank() == 2
}

/// Whether a product of these operands runs in bf16: the thread asks for it and both are
/// f32 matrices on the CPU.
pub fn uses_bf16(a: &Tensor, b: &Tensor) -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && f32_cpu_matrix(a) && f32_cpu_matrix(b)
}

/// `a · b` for matrices `a: (m, k)`, `b: (k, n)` at this thread's precision (any other
/// ranks or dtypes: candle's `matmul`).
///
/// A product of a few rows without gradients (a decoding step: one row per sequence) runs in
/// f32 as `(bᵀ · aᵀ)ᵀ`: the GEMM then walks the weight as its wide operand in place instead
/// of packing it for so few rows (1.1–1.6× on GPT-2-small's decoding products here).
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if few_rows_inference(a, b) {
        b.t()?.matmul(&a.t()?)?.t()?.contiguous()
    } else if uses_bf16(a, b) {
        crate::bf16::matmul(a, b)
    } else {
        a.matmul(b)
    }
}

/// Rows of `a` up to which [`matmul`] takes the transposed form.
const FEW_ROWS: usize = 32;

/// Untracked f32 CPU matrices, `a` with at most [`FEW_ROWS`] rows, a weight at least four
/// times wider and a contraction of at least 256 (below it the direct form is as fast).
fn few_rows_inference(a: &Tensor, b: &Tensor) -> bool {
    let ok = |t: &Tensor| f32_cpu_matrix(t) && !t.track_op();
    match (a.dims(), b.dims()) {
        (&[m, k], &[_, n]) => ok(a) && ok(b) && m > 0 && m <= FEW_ROWS && n >= 4 * m && k >= 256,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn precision_is_per_thread_and_restored() {
        assert_eq!(matmul_precision(), MatmulPrecision::Highest);
        with_matmul_precision(MatmulPrecision::Bf16, || {
            assert_eq!(matmul_precision(), MatmulPrecision::Bf16);
            let other = std::thread::spawn(matmul_precision).join().unwrap();
            assert_eq!(other, MatmulPrecision::Highest);
        });
        assert_eq!(matmul_precision(), MatmulPrecision::Highest);
    }

    #[test]
    fn the_few_rows_form_equals_the_direct_product() {
        let mut rng = crate::rng::RngStream::new(3);
        let mut rand = |r: usize, c: usize| {
            let v: Vec<f32> = (0..r * c).map(|_| (2.0 * rng.uniform_f64() - 1.0) as f32).collect();
            Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
        };
        let (a, b, wt) = (rand(5, 300), rand(300, 70), rand(70, 300));
        for b in [b, wt.t().unwrap()] {
            assert!(few_rows_inference(&a, &b));
            let want = a.matmul(&b).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = matmul(&a, &b).unwrap();
            assert_eq!(got.dims(), &[5, 70]);
            assert!(got.is_contiguous());
            for (x, y) in got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(&want) {
                // f32 sums of 300 products of magnitude ≤ 1.
                assert!((x - y).abs() <= 1e-4, "{x} vs {y}");
            }
        }
        let v = candle_core::Var::from_tensor(&rand(300, 70)).unwrap();
        assert!(
            !few_rows_inference(&a, v.as_tensor()),
            "tracked operands keep the graph's product"
        );
    }

    #[test]
    fn bf16_products_round_their_operands() {
        // 1 + 2⁻¹⁰ is not a bf16 value (8 mantissa bits): rounded to 1 in bf16.
        let a = Tensor::new(&[[1.0f32 + 1.0 / 1024.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap();
        let full = matmul(&a, &b).unwrap().to_vec2::<f32>().unwrap()[0][0];
        let half = with_matmul_precision(MatmulPrecision::Bf16, || matmul(&a, &b))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()[0][0];
        assert_eq!(full, 1.0 + 1.0 / 1024.0);
        assert_eq!(half, 1.0);
    }
}
