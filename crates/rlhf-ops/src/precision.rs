//! The precision of f32 matrix products: full f32 (the default), or bf16 inputs with f32
//! accumulation — the CPU counterpart of `torch.set_float32_matmul_precision("medium")` /
//! bf16 autocast, run by [`crate::bf16`]'s kernel (AVX512-BF16 dot products where the CPU
//! has them). Parameters, activations, gradients and optimizer state stay f32; only the
//! operands of the products are rounded to bf16 (8 bits of mantissa), each product is
//! exact, and the sums are f32.
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

/// Runs `f` with this thread's precision set to `p`, restoring the previous one after.
pub fn with_matmul_precision<R>(p: MatmulPrecision, f: impl FnOnce() -> R) -> R {
    struct Restore(MatmulPrecision);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_matmul_precision(self.0);
        }
    }
    let _restore = Restore(matmul_precision());
    set_matmul_precision(p);
    f()
}

/// Whether a product of these operands runs in bf16: the thread asks for it and both are
/// f32 matrices on the CPU.
pub fn uses_bf16(a: &Tensor, b: &Tensor) -> bool {
    matmul_precision() == MatmulPrecision::Bf16
        && [a, b]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && t.rank() == 2)
}

/// `a · b` for matrices `a: (m, k)`, `b: (k, n)` at this thread's precision (any other
/// ranks or dtypes: candle's `matmul`).
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if uses_bf16(a, b) {
        crate::bf16::matmul(a, b)
    } else {
        a.matmul(b)
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
