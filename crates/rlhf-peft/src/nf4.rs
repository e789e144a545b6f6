//! NF4 4-bit block quantization (bitsandbytes `quantize_4bit` / `dequantize_4bit`, QLoRA).
//!
//! A frozen `nn.Linear` weight `W (out, in)` is flattened row-major and cut into blocks of
//! `blocksize` (64) weights; each block keeps its absmax and each weight a 4-bit index into the
//! 16 NF4 levels (Dettmers et al., arXiv 2305.14314). With double quantization
//! (`compress_statistics=True`, QLoRA's `bnb_4bit_use_double_quant`) the block absmaxes are
//! themselves stored in 8 bits with bnb's signed dynamic map, blocks of 256.
//!
//! [`Nf4Linear::forward`] is bnb's `MatMul4Bit` in f32 (`Linear4bit(compute_dtype=float32)`):
//! `y = x dequantize(W)^T + b`, through the same dequantize-per-panel custom op as
//! [`crate::int8::Int8Linear::forward`], with input gradient `dX = dY dequantize(W)`.
//!
//! Deliberate deviations from bitsandbytes: only NF4 (no FP4); only 2-D weights; bnb's eval
//! path on CPUs with AVX512-BF16 (a bf16 repacked kernel, machine-dependent) is not reproduced.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::int8::{check_bias, dequant_matmul, dims2, to_f32_vec, QuantError, QuantizedWeight, Result};

/// The 16 NF4 levels, bnb `get_4bit_type("nf4")` (normal quantiles scaled to [-1, 1]), with
/// the digits of bnb's source (each is an exact f32).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' default 4-bit block size (`Params4bit(blocksize=64)`).
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// Block size of the nested (double) quantization of the absmaxes (bnb hard-codes 256).
pub const NESTED_BLOCKSIZE: usize = 256;

/// bnb `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: the 256-entry
/// signed dynamic 8-bit map (Dettmers 2015, arXiv 1511.04561), rebuilt with torch's f32
/// arithmetic. For `i` in 0..7, `b = linspace(0.1, 1, 2^i + 1)` (f32),
/// `m = (b[:-1] + b[1:]) / 2`, entries `±10^(i-6) * m`; plus 0 and 1; sorted.
pub fn dynamic_map_signed() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut data: Vec<f32> = vec![0.0, 1.0];
        for i in 0..7i32 {
            let b = linspace_f32(0.1, 1.0, (1usize << i) + 1);
            // Python's `10 ** (i - 6)` is a double; torch multiplies in f32 with it cast to f32.
            let scale = 10f64.powi(i - 6) as f32;
            for w in b.windows(2) {
                let m = (w[0] + w[1]) / 2.0;
                data.push(scale * m);
                data.push(-scale * m);
            }
        }
        data.sort_by(f32::total_cmp);
        let mut map = [0f32; 256];
        map.copy_from_slice(&data);
        map
    })
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU (RangeFactoriesKernel.cpp):
/// `step = (end - start) / (steps - 1)`, then `start + step * i` for the first half and
/// `end - step * (steps - 1 - i)` for the second, each a fused multiply-add (the compiler
/// contracts them in torch's build; without the fusion 21 of the 256 map entries differ).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// torch's CPU f32 sum of a contiguous vector, single-threaded (SumKernel.cpp
/// `vectorized_inner_sum`): 8-lane vectors, 4 interleaved accumulators, a 4-level cascade,
/// then the scalar tail and the lanes. Reproduces `absmax.mean()` bit for bit on the fixture
/// (a plain or f64 sum is one ulp off there). Above 32,768 values torch splits the sum over
/// threads, which this does not model.
fn torch_sum_f32(a: &[f32]) -> f32 {
    const LANES: usize = 8;
    type V = [f32; LANES];
    let vec_at = |i: usize| -> V { std::array::from_fn(|l| a[i * LANES + l]) };
    let add = |x: &mut V, y: V| x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    let nvec = a.len() / LANES;
    let rows = nvec / 4;
    // multi_row_sum: row r holds vectors 4r..4r+4; acc[level][k].
    let power = 4.max(rows.next_power_of_two().trailing_zeros() as usize / 4);
    let (step, mask) = (1usize << power, (1usize << power) - 1);
    let mut acc = [[[0f32; LANES]; 4]; 4];
    let mut r = 0;
    while r + step <= rows {
        for _ in 0..step {
            (0..4).for_each(|k| add(&mut acc[0][k], vec_at(4 * r + k)));
            r += 1;
        }
        for j in 1..4 {
            let (lower, upper) = acc.split_at_mut(j);
            for (u, l) in upper[0].iter_mut().zip(&mut lower[j - 1]) {
                add(u, std::mem::take(l));
            }
            if r & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    for r in r..rows {
        (0..4).for_each(|k| add(&mut acc[0][k], vec_at(4 * r + k)));
    }
    let (first, upper) = acc.split_at_mut(1);
    for level in upper.iter() {
        for (a, u) in first[0].iter_mut().zip(level) {
            add(a, *u);
        }
    }
    let [mut sum, p1, p2, p3] = first[0];
    for i in rows * 4..nvec {
        add(&mut sum, vec_at(i));
    }
    for p in [p1, p2, p3] {
        add(&mut sum, p);
    }
    let tail: f32 = a[nvec * LANES..].iter().fold(0.0, |s, &x| s + x);
    sum.iter().fold(tail, |s, &x| s + x)
}

/// Number of `mids` (ascending) strictly below `s`: `torch.bucketize(s, mids)` (right=False).
/// A NaN `s` (an all-zero block, `0 * (1/0)`) counts every midpoint, as torch's lower bound does.
fn bucketize(s: f32, mids: &[f32]) -> usize {
    mids.iter().filter(|&&m| m < s || s.is_nan()).count()
}

/// Midpoints `(code[k] + code[k+1]) / 2` in f32.
fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// bnb's CPU 8-bit code lookup: a 65,536-bin table, `lut[i] = #midpoints < -1 + 2i/65535`
/// (f32), read at `u16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`. It equals the nearest
/// code except within ~1.5e-5 of a midpoint.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mids = midpoints(dynamic_map_signed());
        (0..65536u32)
            .map(|i| {
                let v = -1.0f32 + 2.0f32 * i as f32 / 65535.0f32;
                mids.partition_point(|&m| m < v) as u8
            })
            .collect()
    })
}

/// The index of `v` in the dynamic map by the CPU lookup-table rule (see [`dynamic_lut`]).
fn dynamic_index(v: f32) -> u8 {
    let v = if v.is_nan() { 0.0 } else { v.clamp(-1.0, 1.0) };
    // In [0.5, 65535.5]; `as` truncates like C's float-to-integer cast.
    let i = ((v + 1.0) * 0.5 * 65535.0 + 0.5) as usize;
    dynamic_lut()[i.min(65535)]
}

/// Block absmaxes stored 8-bit (bnb's nested `QuantState`, `compress_statistics=True`).
#[derive(Clone, Debug)]
pub struct NestedAbsmax {
    /// Index into [`dynamic_map_signed`] per 4-bit block (`absmax_quantized_uint8`).
    pub quantized: Vec<u8>,
    /// Scale per block of [`NESTED_BLOCKSIZE`] absmaxes (`state2.absmax`).
    pub absmax2: Vec<f32>,
    /// The mean of the f32 absmaxes, subtracted before quantizing (`offset`).
    pub offset: f32,
}

impl NestedAbsmax {
    /// bnb `quantize_blockwise(absmax - offset, blocksize=256)` on CPU:
    /// `offset = mean(absmax)`, `c = absmax - offset`, `absmax2 = max |c|` per block of 256,
    /// `q = lut_index(c * (1 / absmax2))`.
    fn quantize(absmax: &[f32]) -> Self {
        // torch.mean on CPU: the f32 sum divided by the count.
        let offset = torch_sum_f32(absmax) / absmax.len().max(1) as f32;
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let mut quantized = Vec::with_capacity(centered.len());
        let mut absmax2 = Vec::new();
        for block in centered.chunks(NESTED_BLOCKSIZE) {
            let m = block.iter().fold(0f32, |m, c| m.max(c.abs()));
            let r = 1.0 / m;
            quantized.extend(block.iter().map(|&c| dynamic_index(c * r)));
            absmax2.push(m);
        }
        Self {
            quantized,
            absmax2,
            offset,
        }
    }

    /// Absmax of 4-bit block `b`: `code[q[b]] * absmax2[b / 256] + offset` (bnb
    /// `dequantize_blockwise` + offset).
    fn get(&self, b: usize) -> f32 {
        let code = dynamic_map_signed();
        code[self.quantized[b] as usize] * self.absmax2[b / NESTED_BLOCKSIZE] + self.offset
    }
}

/// The per-block absmax of an NF4 weight: plain f32, or double-quantized.
#[derive(Clone, Debug)]
pub enum Nf4Absmax {
    /// One f32 per block (`compress_statistics=False`).
    Plain(Vec<f32>),
    /// 8-bit per block plus one f32 per 256 blocks (`compress_statistics=True`).
    Nested(NestedAbsmax),
}

/// An NF4 weight `(out, in)`: bnb's `Params4bit` with `quant_type="nf4"`.
#[derive(Clone, Debug)]
pub struct Nf4Weight {
    /// Two 4-bit indices per byte, row-major over the flattened weight, the first element
    /// in the high nibble; an odd count is padded with the index of 0.0.
    pub packed: Vec<u8>,
    /// Block absmaxes.
    pub absmax: Nf4Absmax,
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// Weights per block of the flattened weight.
    pub blocksize: usize,
}

impl Nf4Weight {
    /// Quantizes `w: (out, in)` as `bnb.functional.quantize_4bit(W, blocksize, quant_type="nf4",
    /// compress_statistics=double_quant)`:
    ///
    /// ```text
    /// absmax[b] = max |w| over block b                 (blocks of the row-major flattening)
    /// s         = clamp(w * (1 / absmax[b]), -1, 1)    (reciprocal, then multiply; f32)
    /// q         = #{k : (code[k] + code[k+1]) / 2 < s}  (torch.bucketize on the midpoints)
    /// byte j    = (q[2j] << 4) | q[2j+1]
    /// ```
    pub fn quantize(w: &Tensor, blocksize: usize, double_quant: bool) -> Result<Self> {
        if blocksize == 0 {
            return Err(QuantError::Blocksize(blocksize));
        }
        let shape = dims2(w, "nf4 weight")?;
        let data = to_f32_vec(w)?;
        let absmax: Vec<f32> = data
            .par_chunks(blocksize)
            .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())))
            .collect();
        let recip: Vec<f32> = absmax.iter().map(|&a| 1.0 / a).collect();
        let mids = midpoints(&NF4_CODE);
        let q = |e: usize| -> u8 {
            let s = match data.get(e) {
                Some(&x) => (x * recip[e / blocksize]).clamp(-1.0, 1.0),
                None => 0.0, // padding of an odd count, as bnb pads the scaled values with 0
            };
            bucketize(s, &mids) as u8
        };
        let mut packed = vec![0u8; data.len().div_ceil(2)];
        packed
            .par_iter_mut()
            .enumerate()
            .for_each(|(j, byte)| *byte = (q(2 * j) << 4) | q(2 * j + 1));
        let absmax = if double_quant {
            Nf4Absmax::Nested(NestedAbsmax::quantize(&absmax))
        } else {
            Nf4Absmax::Plain(absmax)
        };
        Ok(Self {
            packed,
            absmax,
            shape,
            blocksize,
        })
    }

    /// The absmax of every block, dequantized if nested (bnb's `absmax` after
    /// `dequantize_blockwise(...) + offset`).
    pub fn absmax_values(&self) -> Vec<f32> {
        match &self.absmax {
            Nf4Absmax::Plain(a) => a.clone(),
            Nf4Absmax::Nested(n) => (0..n.quantized.len()).map(|b| n.get(b)).collect(),
        }
    }

    /// The dequantized weight `(out, in)`, bnb `dequantize_4bit`: `code[q] * absmax[block]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let (out, k) = self.shape;
        let mut w = vec![0f32; out * k];
        self.dequantize_rows(0..out, &mut w);
        Ok(Tensor::from_vec(w, (out, k), &Device::Cpu)?)
    }

    /// Writes rows `rows` of the dequantized weight into `out` (`rows.len() * in` values).
    pub(crate) fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let k = self.shape.1;
        if k == 0 {
            return;
        }
        let bs = self.blocksize;
        out.par_chunks_mut(k).zip(rows).for_each(|(row, o)| {
            let start = o * k;
            let mut block = usize::MAX;
            let mut scale = 0f32;
            for (j, x) in row.iter_mut().enumerate() {
                let e = start + j;
                if e / bs != block {
                    block = e / bs;
                    scale = match &self.absmax {
                        Nf4Absmax::Plain(a) => a[block],
                        Nf4Absmax::Nested(n) => n.get(block),
                    };
                }
                let byte = self.packed[e / 2];
                let q = if e & 1 == 0 { byte >> 4 } else { byte & 0x0f };
                *x = NF4_CODE[q as usize] * scale;
            }
        });
    }
}

/// A frozen linear layer on an NF4 weight: bnb's `Linear4bit(quant_type="nf4",
/// compute_dtype=float32)`.
#[derive(Clone, Debug)]
pub struct Nf4Linear {
    /// The quantized weight `(out, in)` (shared with the custom op, hence the `Arc`).
    pub weight: Arc<Nf4Weight>,
    /// Bias `(out)`; a [`candle_core::Var`] here receives its gradient through [`Self::forward`].
    pub bias: Option<Tensor>,
}

impl Nf4Linear {
    /// A layer from a quantized weight; checks the bias shape.
    pub fn new(weight: Nf4Weight, bias: Option<Tensor>) -> Result<Self> {
        check_bias(bias.as_ref(), weight.shape.0)?;
        Ok(Self {
            weight: Arc::new(weight),
            bias,
        })
    }

    /// Quantizes a dense `nn.Linear` weight `(out, in)` ([`Nf4Weight::quantize`]).
    pub fn from_dense(weight: &Tensor, bias: Option<Tensor>, blocksize: usize, double_quant: bool) -> Result<Self> {
        Self::new(Nf4Weight::quantize(weight, blocksize, double_quant)?, bias)
    }

    /// `y = x dequantize(W)^T + b` (bnb `MatMul4Bit` in f32), differentiable in `x`
    /// (backward `dX = dY dequantize(W)`) and in `b` when it is a variable.
    ///
    /// # Shapes
    /// `x`: `(.., in)` f32 → `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = dequant_matmul(x, &QuantizedWeight::Nf4(self.weight.clone()))?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn cpu(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    #[test]
    fn the_code_levels_times_a_block_absmax_round_trip_exactly() {
        let w: Vec<f32> = (0..64).map(|i| NF4_CODE[i % 16] * 0.37).collect();
        let q = Nf4Weight::quantize(&cpu(w.clone(), &[2, 32]), 64, false).unwrap();
        assert_eq!(vals(&q.dequantize().unwrap()), w);
    }

    #[test]
    fn the_first_element_goes_in_the_high_nibble_and_odd_counts_pad_with_zero_level() {
        let q = Nf4Weight::quantize(&cpu(vec![-1.0, 1.0, 0.0], &[1, 3]), 64, false).unwrap();
        assert_eq!(q.packed, vec![0x0f, 0x77]);
    }

    #[test]
    fn a_zero_block_dequantizes_to_zero_and_a_partial_last_block_has_its_own_absmax() {
        let mut w = vec![0f32; 70];
        w[66] = -0.25;
        let q = Nf4Weight::quantize(&cpu(w.clone(), &[7, 10]), 64, false).unwrap();
        assert_eq!(q.absmax_values(), vec![0.0, 0.25]);
        assert_eq!(vals(&q.dequantize().unwrap()), w);
    }

    #[test]
    fn a_zero_blocksize_is_an_error() {
        let w = cpu(vec![1.0; 4], &[2, 2]);
        assert!(matches!(
            Nf4Weight::quantize(&w, 0, false),
            Err(QuantError::Blocksize(0))
        ));
    }

    #[test]
    fn lut_index_is_the_nearest_dynamic_code_away_from_midpoints() {
        let code = dynamic_map_signed();
        let mids = midpoints(code);
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..20_000 {
            let v: f32 = rng.random::<f32>() * 2.0 - 1.0;
            if mids.iter().any(|m| (m - v).abs() < 2e-5) {
                continue;
            }
            let nearest = (0..256)
                .min_by(|&a, &b| (code[a] - v).abs().total_cmp(&(code[b] - v).abs()))
                .unwrap();
            assert_eq!(dynamic_index(v) as usize, nearest, "v = {v}");
        }
    }

    #[test]
    fn double_quantized_absmax_is_within_half_an_8bit_step_of_the_plain_absmax() {
        let mut rng = StdRng::seed_from_u64(9);
        let w = cpu(randn(&mut rng, 300 * 64, 0.05), &[300, 64]);
        let plain = Nf4Weight::quantize(&w, 64, false).unwrap().absmax_values();
        let nested = Nf4Weight::quantize(&w, 64, true).unwrap();
        let Nf4Absmax::Nested(n) = &nested.absmax else {
            panic!("nested expected")
        };
        assert_eq!(n.absmax2.len(), 2, "300 blocks make two nested blocks of 256");
        // Half the widest gap of the dynamic map (0.0141 / 2) and the distance from -1 to its
        // lowest code (1 - 0.99297) are both 0.00703; the 65,536-bin LUT adds <= 3.1e-5.
        for (b, (p, d)) in plain.iter().zip(nested.absmax_values()).enumerate() {
            let tol = 0.0071 * n.absmax2[b / NESTED_BLOCKSIZE] + 1e-6;
            assert!((p - d).abs() <= tol, "block {b}: {p} vs {d}");
        }
    }

    #[test]
    fn forward_stays_within_the_nf4_rounding_bound_of_the_f32_product() {
        let (n, k, out) = (8, 128, 48);
        let mut rng = StdRng::seed_from_u64(13);
        let (xv, wv) = (randn(&mut rng, n * k, 1.0), randn(&mut rng, out * k, 0.05));
        let (x, w) = (cpu(xv.clone(), &[n, k]), cpu(wv, &[out, k]));
        let lin = Nf4Linear::from_dense(&w, None, 64, true).unwrap();
        // Indices are chosen with the f32 absmax A; the nested A' only rescales, so
        // |W - deq W| <= A (1 - 0.7229568) / 2 + |A - A'| (widest half-gap of the levels).
        let plain = Nf4Weight::quantize(&w, 64, false).unwrap().absmax_values();
        let nested = lin.weight.absmax_values();
        let exact = vals(&x.matmul(&w.t().unwrap()).unwrap());
        let y = vals(&lin.forward(&x).unwrap());
        for r in 0..n {
            for o in 0..out {
                let bound: f32 = (0..k)
                    .map(|j| {
                        let b = (o * k + j) / 64;
                        xv[r * k + j].abs() * (plain[b] * 0.1386 + (plain[b] - nested[b]).abs())
                    })
                    .sum();
                let d = (y[r * out + o] - exact[r * out + o]).abs();
                assert!(d <= bound * 1.001 + 1e-4, "({r}, {o}): {d} > {bound}");
            }
        }
    }

    #[test]
    fn nf4_input_gradient_equals_plain_candle_matmul_on_the_dequantized_weight() {
        let (n, k, out) = (6, 4096, 70);
        let mut rng = StdRng::seed_from_u64(17);
        let w = cpu(randn(&mut rng, out * k, 0.05), &[out, k]);
        let lin = Nf4Linear::from_dense(&w, None, 64, true).unwrap();
        let deq = lin.weight.dequantize().unwrap();
        let r = cpu(randn(&mut rng, n * out, 1.0), &[n, out]);
        let x = Var::from_tensor(&cpu(randn(&mut rng, n * k, 1.0), &[n, k])).unwrap();
        let loss = (lin.forward(x.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap();
        let g1 = loss.backward().unwrap().get(&x).unwrap().clone();
        let y2 = x.as_tensor().matmul(&deq.t().unwrap()).unwrap();
        let loss2 = (y2 * &r).unwrap().sum_all().unwrap();
        let g2 = loss2.backward().unwrap().get(&x).unwrap().clone();
        let d = vals(&g1)
            .iter()
            .zip(vals(&g2))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "input gradient differs by {d}");
    }
}
