//! Training: data loading, optimizers, the SFT, reward and PPO trainers, and the configs and
//! reward functions of the GRPO, RLOO and DPO trainers.
#![warn(missing_docs)]

pub mod assets;
pub mod chat_data;
pub mod checkpoint;
pub mod collate;
pub mod config;
pub mod config_values;
pub mod data;
pub mod dist;
pub mod dpo;
pub mod dpo_config;
pub mod error;
pub mod grpo;
pub mod grpo_config;
pub mod online;
pub mod online_config;
pub mod optim;
pub mod peft_args;
pub mod ppo;
pub mod ppo_config;
pub mod ppo_dist;
pub mod ppo_run;
pub mod reward;
pub mod reward_fns;
pub mod rloo;
pub mod rloo_config;
pub mod score;
pub mod sft;
pub mod stop;
pub mod synth;
pub mod tensorboard;
pub mod trainer;

pub use error::{Result, TrainError};
pub use rlhf_models as models;
pub use rlhf_ops as ops;
pub use rlhf_peft as peft;
pub use stop::StopSignal;
