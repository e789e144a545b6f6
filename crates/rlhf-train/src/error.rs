//! Errors of data loading and training.

use std::path::PathBuf;

/// Everything that can go wrong while reading data or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A data row is malformed or lacks a required column.
    #[error("{}: row {row}: {msg}", path.display())]
    Row {
        /// The data file.
        path: PathBuf,
        /// 1-based row (line) number.
        row: usize,
        /// What was expected and how to fix it.
        msg: String,
    },
    /// A data set is unusable as a whole (empty, every row dropped, unknown format).
    #[error("{}: {msg}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// A checkpoint is incomplete or does not match the run.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A configuration value is unknown or of the wrong type, or a config is incomplete.
    #[error("{0}")]
    Config(String),
    /// A config key's value is out of range or conflicts with another key's.
    #[error("{}config key `{key}`: {msg}", origin.as_ref().map_or(String::new(), |o| format!("{o}: ")))]
    Setting {
        /// The key.
        key: String,
        /// What is wrong and how to fix it.
        msg: String,
        /// Where the value was set (a `--config` file, or `flags`), when known
        /// ([`crate::config::KeySources`]).
        origin: Option<String>,
    },
    /// A reward function failed on a batch (an external command crashed, timed out or
    /// answered malformed JSON; a rule met data it cannot score).
    #[error("reward function `{name}`: {msg}")]
    Reward {
        /// The function's name, as its metrics are logged (`rewards/<name>/mean`).
        name: String,
        /// What went wrong, what was sent and how to fix it.
        msg: String,
    },
    /// Training diverged (NaN or infinite loss, reward or gradient).
    #[error("{0}")]
    Diverged(String),
    /// Training stopped on request (Ctrl-C, SIGTERM) between optimizer steps.
    #[error("{msg}")]
    Interrupted {
        /// What asked for the stop (e.g. `SIGINT`).
        reason: String,
        /// The checkpoint holding the last completed step (`None` before the first step).
        checkpoint: Option<PathBuf>,
        /// The step, the checkpoint and how to resume.
        msg: String,
    },
    /// Data-parallel set-up or a collective failed, or another rank reported an error
    /// ([`crate::dist`]).
    #[error("{0}")]
    Dist(String),
    /// A model error.
    #[error(transparent)]
    Model(#[from] rlhf_models::ModelError),
    /// A loss or PPO-math error.
    #[error(transparent)]
    Ops(#[from] rlhf_ops::ppo::PpoError),
    /// A tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// The [`TrainError::Setting`] of `key` (its origin is added by the caller that knows it).
    pub fn setting(key: &str, msg: impl Into<String>) -> Self {
        Self::Setting {
            key: key.to_string(),
            msg: msg.into(),
            origin: None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
