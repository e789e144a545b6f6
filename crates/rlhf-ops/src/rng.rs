//! A small, seedable, serialisable random stream for dropout masks and sampling.
//!
//! The state is two integers (seed, counter), so a checkpoint can store it and a resumed
//! run draws exactly the numbers an uninterrupted one would.

/// SplitMix64 stream (Steele et al. 2014): fast, statistically sound for masks and
/// sampling, and fully determined by `(seed, counter)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngStream {
    /// The seed.
    pub seed: u64,
    /// How many 64-bit words were drawn so far.
    pub counter: u64,
}

impl RngStream {
    /// A stream starting at word 0 of `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: 0 }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        let mut z = self
            .seed
            .wrapping_mul(0xD1B5_4A32_D192_ED03)
            .wrapping_add(self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform sample in `[0, 1)` with 24 bits of precision.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform sample in `[0, 1)` with 53 bits of precision.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `n` uniform samples in `[0, 1)`.
    pub fn uniform_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform_f64().max(f64::MIN_POSITIVE);
        let u2 = self.uniform_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// A stream whose seed hashes `key` (each word through SplitMix64's finaliser): the
    /// stream of a tuple such as `(seed, step, example)`, the same wherever it is built.
    pub fn keyed(key: &[u64]) -> Self {
        let seed = key.iter().fold(0x243F_6A88_85A3_08D3u64, |h, &k| {
            let mut z = (h ^ k).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        });
        Self::new(seed)
    }

    /// An independent stream derived from this one (advances this stream by one word).
    pub fn fork(&mut self) -> Self {
        Self::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_resume_continues_it() {
        let mut a = RngStream::new(7);
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let mut b = RngStream::new(7);
        assert_eq!(first, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        let saved = a.clone();
        let mut resumed = RngStream {
            seed: saved.seed,
            counter: saved.counter,
        };
        assert_eq!(a.next_u64(), resumed.next_u64());
    }

    #[test]
    fn uniform_mean_is_one_half() {
        let mut r = RngStream::new(1);
        let m: f64 = (0..100_000).map(|_| r.uniform_f64()).sum::<f64>() / 100_000.0;
        assert!((m - 0.5).abs() < 0.01);
    }
}
