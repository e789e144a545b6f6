//! Parameter-efficient layers: dense projections, LoRA adapters (PEFT's contract and
//! file format) and frozen quantized bases (LLM.int8 and NF4, bitsandbytes' formats).
#![warn(missing_docs)]

pub mod int8;
pub mod lora;
pub mod nf4;
pub mod param;
pub mod proj;

pub use lora::{LoraConfig, LoraError, LoraLinear};
pub use param::Param;
pub use proj::{Proj, ProjCtx};
