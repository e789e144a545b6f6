//! Pure tensor math for RLHF: log-probabilities, masked statistics, KL penalties, GAE,
//! PPO and Bradley–Terry losses; the layer math of GPT-2 and the Llama family (layer norm,
//! RMSNorm, RoPE, SwiGLU, grouped-query attention with a sliding window); and the fused CPU
//! kernels that speed them up.
//!
//! Every function documents its formula, the behaviour it matches (TRL 0.11 / PEFT) and
//! the shapes it takes, in the alphabet `B` batch, `T` time, `V` vocab, `H` hidden.
#![warn(missing_docs)]

pub mod attention;
pub mod bf16;
pub mod dropout;
pub mod kernels;
pub mod linear;
pub mod nn;
pub mod packed;
pub mod ppo;
pub mod precision;
pub mod rl;
pub mod rng;
pub mod rope;
pub mod simd;
pub mod sink;

pub use candle_core::{Error as CandleError, Result as CandleResult};
