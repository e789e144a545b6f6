//! Decoder-only language models as in Hugging Face transformers — GPT-2, Llama 2/3.x,
//! SmolLM2, Qwen2/2.5, Qwen3 and Mistral — for training and generation on candle: one
//! backbone built from shared pieces with a family table of names and rules, `config.json`
//! parsing, `model.safetensors` in and out, an attention-mask-driven forward, LM / value /
//! score heads, a KV cache kept outside the model, batched generation, and the tokenizer.
#![warn(missing_docs)]

pub mod cache;
pub mod chat;
pub mod config;
pub mod decode;
pub mod error;
pub mod family;
pub mod generate;
pub mod heads;
pub mod hub;
pub mod lora;
pub mod model;
pub mod rope;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use cache::KvCache;
pub use chat::{ChatTemplate, Message, RenderOptions};
pub use config::ModelConfig;
pub use decode::Decoder;
pub use error::{ModelError, Result};
pub use family::Family;
pub use generate::{generate, generate_composed, generate_groups, Generation, GenerationConfig};
pub use heads::{ScoreHead, ValueHead};
pub use hub::{resolve_model, HubEnv};
pub use model::{LoadOptions, Model};
pub use tokenizer::Tokenizer;
pub use transformer::{prefix_sharing, set_prefix_sharing, Fwd, PrefixSharingGuard, Transformer};
