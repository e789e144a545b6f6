//! GPT-2 as in Hugging Face transformers, for training and generation on candle:
//! `config.json` parsing, `model.safetensors` in and out, the backbone with an
//! attention-mask-driven forward, LM / value / score heads, a KV cache kept outside the
//! model, batched generation, and the tokenizer.
#![warn(missing_docs)]

pub mod cache;
pub mod chat;
pub mod config;
pub mod decode;
pub mod error;
pub mod generate;
pub mod gpt2;
pub mod heads;
pub mod hub;
pub mod lora;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use chat::{ChatTemplate, Message, RenderOptions};
pub use config::Gpt2Config;
pub use decode::Decoder;
pub use error::{ModelError, Result};
pub use generate::{generate, generate_composed, Generation, GenerationConfig};
pub use gpt2::{Fwd, Gpt2};
pub use heads::{ScoreHead, ValueHead};
pub use hub::{resolve_model, HubEnv};
pub use model::{LoadOptions, Model};
pub use tokenizer::Tokenizer;
