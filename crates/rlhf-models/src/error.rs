//! Errors of model loading, running and saving.

use std::path::PathBuf;

/// Everything that can go wrong when loading, running or saving a model.
///
/// Messages name the file (and tensor or field), what was expected, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{}: not valid JSON: {source}\nhint: fix the file or re-save the model", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A `config.json` field is missing, of the wrong type, or out of range.
    #[error("{}: field `{field}`: {msg}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What was expected and found.
        msg: String,
    },
    /// A weights file is not a readable safetensors file.
    #[error("{}: cannot read safetensors: {msg}\nhint: the file may be truncated or corrupt; re-save or re-download it", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The reader's message.
        msg: String,
    },
    /// A tensor the config requires is not in the weights.
    #[error("{}: tensor `{name}` is missing\nhint: the checkpoint does not match config.json (n_layer, architecture) or is incomplete", path.display())]
    MissingTensor {
        /// The weights file (or index).
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?} from config.json\nhint: the checkpoint does not match its config.json", path.display())]
    Shape {
        /// The weights file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape found.
        got: Vec<usize>,
        /// The shape expected.
        expected: Vec<usize>,
    },
    /// A tensor has a non-float dtype.
    #[error("{}: tensor `{name}` has dtype {got}, expected a float tensor (F32, F16 or BF16)", path.display())]
    Dtype {
        /// The weights file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype found.
        got: String,
    },
    /// The tokenizer could not be loaded or used.
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A LoRA adapter directory does not fit the model, or an adapter operation does not
    /// fit the model's state.
    #[error("{}: {msg}", path.display())]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What does not match, with a hint.
        msg: String,
    },
    /// A LoRA config or layer error.
    #[error(transparent)]
    Lora(#[from] rlhf_peft::LoraError),
    /// A quantization error.
    #[error(transparent)]
    Quant(#[from] rlhf_peft::int8::QuantError),
    /// An input does not fit the model.
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A packed matrix product was given operands of the wrong size.
    #[error(transparent)]
    Gemm(#[from] rlhf_ops::bf16::GemmError),
    /// A chat template is missing, does not parse, or rejected the conversation.
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    /// A model id could not be resolved in the Hugging Face cache or downloaded (boxed: its
    /// paths would make every `Result` of this crate larger).
    #[error(transparent)]
    Hub(Box<crate::hub::HubError>),
}

impl From<crate::hub::HubError> for ModelError {
    fn from(e: crate::hub::HubError) -> Self {
        Self::Hub(Box::new(e))
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
