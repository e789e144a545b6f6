//! Training: data loading, optimizers, and the SFT, reward and PPO trainers.
#![warn(missing_docs)]

pub mod assets;
pub mod collate;
pub mod data;
pub mod error;
pub mod score;

pub use error::{Result, TrainError};
pub use rlhf_models as models;
pub use rlhf_ops as ops;
pub use rlhf_peft as peft;
