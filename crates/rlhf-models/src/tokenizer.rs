//! The model's tokenizer (`tokenizer.json` through the `tokenizers` crate).

use std::path::{Path, PathBuf};

use crate::error::{io_err, ModelError, Result};

/// A Hugging Face fast tokenizer plus the special ids a causal LM needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    /// End-of-sequence id (`<|endoftext|>` for GPT-2).
    pub eos_token_id: u32,
    /// Padding id (GPT-2 has none and pads with EOS).
    pub pad_token_id: u32,
    /// Where it was read from, for messages.
    pub path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("eos_token_id", &self.eos_token_id)
            .finish()
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json`. `eos`/`pad` override the ids (else `<|endoftext|>`, and pad = eos).
    pub fn from_file(path: &Path, eos: Option<u32>, pad: Option<u32>) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(json, path, eos, pad)
    }

    /// Parses the contents of a `tokenizer.json` (`path` is only used in messages).
    pub fn from_json(json: String, path: &Path, eos: Option<u32>, pad: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let eos_token_id = match eos.or_else(|| inner.token_to_id("<|endoftext|>")) {
            Some(id) => id,
            None => {
                return Err(ModelError::Tokenizer {
                    path: path.to_path_buf(),
                    msg: "no end-of-sequence token: set eos_token_id in config.json".into(),
                })
            }
        };
        Ok(Self {
            inner,
            json,
            eos_token_id,
            pad_token_id: pad.unwrap_or(eos_token_id),
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| ModelError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text of one token id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The `tokenizer.json` contents.
    pub fn json(&self) -> &str {
        &self.json
    }
}
