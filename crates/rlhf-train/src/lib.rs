//! Training: data loading, optimizers, and the SFT, reward and PPO trainers.
#![warn(missing_docs)]

pub mod assets;
pub mod checkpoint;
pub mod collate;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod optim;
pub mod peft_args;
pub mod ppo;
pub mod ppo_config;
pub mod ppo_dist;
pub mod ppo_run;
pub mod reward;
pub mod score;
pub mod sft;
pub mod stop;
pub mod synth;
pub mod trainer;

pub use error::{Result, TrainError};
pub use rlhf_models as models;
pub use rlhf_ops as ops;
pub use rlhf_peft as peft;
pub use stop::StopSignal;
