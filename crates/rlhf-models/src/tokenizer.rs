//! The model's tokenizer (`tokenizer.json` through the `tokenizers` crate) and its special-token
//! rules (`tokenizer_config.json`, `special_tokens_map.json`), as transformers 5 reads them.
//!
//! - Special tokens (`bos_token`, `eos_token`, `pad_token`, ...) come from `tokenizer_config.json`,
//!   as plain strings or `AddedToken` objects (`{"content": "<s>", ...}`); a key missing there is
//!   taken from the legacy `special_tokens_map.json`. Their strings are what chat templates see.
//! - `add_bos_token` / `add_eos_token` are ignored when `tokenizer.json` exists, as transformers 5
//!   does (`PreTrainedTokenizerBase.from_pretrained` drops them): the post-processor in
//!   `tokenizer.json` alone decides what `add_special_tokens = true` adds (Llama 3's
//!   `TemplateProcessing` adds `<|begin_of_text|>`; Qwen's adds nothing).
//! - The padding id is the tokenizer's pad token, else `config.json`'s `pad_token_id`, else EOS:
//!   TRL's `pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{io_err, ModelError, Result};

/// The named special tokens of transformers' `SPECIAL_TOKENS_ATTRIBUTES`, as strings.
///
/// Chat templates receive every token that is set under its name (`bos_token`, ...), as
/// transformers passes `tokenizer.special_tokens_map` to `apply_chat_template`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence (`<|begin_of_text|>`, `<s>`).
    pub bos_token: Option<String>,
    /// End of sequence (`<|eot_id|>`, `<|im_end|>`, `</s>`).
    pub eos_token: Option<String>,
    /// Unknown token.
    pub unk_token: Option<String>,
    /// Separator.
    pub sep_token: Option<String>,
    /// Padding (`<|endoftext|>` for Qwen; none for Llama 3 and Mistral).
    pub pad_token: Option<String>,
    /// Classifier token.
    pub cls_token: Option<String>,
    /// Mask token.
    pub mask_token: Option<String>,
}

impl SpecialTokens {
    /// The names transformers lists in `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
    pub const NAMES: [&'static str; 7] = [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ];

    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            "bos_token" => &mut self.bos_token,
            "eos_token" => &mut self.eos_token,
            "unk_token" => &mut self.unk_token,
            "sep_token" => &mut self.sep_token,
            "pad_token" => &mut self.pad_token,
            "cls_token" => &mut self.cls_token,
            "mask_token" => &mut self.mask_token,
            _ => return None,
        })
    }

    /// The tokens that are set, by name (what a chat template sees as variables).
    pub fn as_map(&self) -> BTreeMap<&'static str, &str> {
        let all = [
            &self.bos_token,
            &self.eos_token,
            &self.unk_token,
            &self.sep_token,
            &self.pad_token,
            &self.cls_token,
            &self.mask_token,
        ];
        Self::NAMES
            .iter()
            .zip(all)
            .filter_map(|(name, tok)| tok.as_deref().map(|t| (*name, t)))
            .collect()
    }
}

/// Where a chat template was found in `tokenizer_config.json`: one string, or named ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigTemplates {
    /// `"chat_template": "{% for message in messages %}..."`.
    Single(String),
    /// `"chat_template": [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]`.
    Named(Vec<(String, String)>),
}

/// What `tokenizer_config.json` (and `special_tokens_map.json`) of a directory say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    /// The named special tokens.
    pub special: SpecialTokens,
    /// `add_bos_token`, if present (informational: ignored with a `tokenizer.json`, see the
    /// module docs).
    pub add_bos_token: Option<bool>,
    /// `add_eos_token`, if present (informational, as `add_bos_token`).
    pub add_eos_token: Option<bool>,
    /// `model_max_length`, if present.
    pub model_max_length: Option<u64>,
    /// The `chat_template` key, if present.
    pub chat_template: Option<ConfigTemplates>,
    /// The file the values came from (`tokenizer_config.json`; it need not exist).
    pub path: PathBuf,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json` of `dir`, filling tokens it lacks from
    /// `special_tokens_map.json`. Missing files give an empty config.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let mut cfg = match read_json_object(&path)? {
            Some(obj) => Self::from_json(&obj, &path)?,
            None => Self {
                path: path.clone(),
                ..Self::default()
            },
        };
        let map_path = dir.join("special_tokens_map.json");
        if let Some(obj) = read_json_object(&map_path)? {
            for name in SpecialTokens::NAMES {
                let slot = cfg.special.slot(name).expect("invariant: NAMES are slots");
                if slot.is_none() {
                    *slot = token_string(obj.get(name), &map_path, name)?;
                }
            }
        }
        Ok(cfg)
    }

    /// Parses the object of a `tokenizer_config.json` (`path` is used in messages).
    pub fn from_json(obj: &serde_json::Map<String, Value>, path: &Path) -> Result<Self> {
        let mut special = SpecialTokens::default();
        for name in SpecialTokens::NAMES {
            *special.slot(name).expect("invariant: NAMES are slots") = token_string(obj.get(name), path, name)?;
        }
        let flag = |key: &str| -> Result<Option<bool>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(config_err(path, key, format!("expected true or false, found {other}"))),
            }
        };
        let chat_template = match obj.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(ConfigTemplates::Single(s.clone())),
            Some(Value::Array(items)) => Some(ConfigTemplates::Named(named_templates(items, path)?)),
            Some(other) => {
                return Err(config_err(
                    path,
                    "chat_template",
                    format!("expected a string or a list of {{\"name\", \"template\"}} objects, found {other}"),
                ))
            }
        };
        Ok(Self {
            special,
            add_bos_token: flag("add_bos_token")?,
            add_eos_token: flag("add_eos_token")?,
            model_max_length: obj.get("model_max_length").and_then(Value::as_u64),
            chat_template,
            path: path.to_path_buf(),
        })
    }
}

fn named_templates(items: &[Value], path: &Path) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let name = item.get("name").and_then(Value::as_str);
            let template = item.get("template").and_then(Value::as_str);
            match (name, template) {
                (Some(n), Some(t)) => Ok((n.to_string(), t.to_string())),
                _ => Err(config_err(
                    path,
                    "chat_template",
                    format!("entry {i} must be an object with string `name` and `template`"),
                )),
            }
        })
        .collect()
}

fn config_err(path: &Path, field: &str, msg: String) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        msg,
    }
}

/// A special token given as a string or an `AddedToken` object (`{"content": ...}`).
fn token_string(v: Option<&Value>, path: &Path, name: &str) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(config_err(
                path,
                name,
                "an AddedToken object needs a string `content`".into(),
            )),
        },
        Some(other) => Err(config_err(
            path,
            name,
            format!("expected a string or an AddedToken object, found {other}"),
        )),
    }
}

/// The JSON object in `path`, or `None` when the file does not exist.
pub(crate) fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(obj)) => Ok(Some(obj)),
        Ok(_) => Err(config_err(path, "(root)", "expected a JSON object".into())),
        Err(source) => Err(ModelError::Json {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A Hugging Face fast tokenizer plus the special ids a causal LM needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    /// End-of-sequence id: the tokenizer's `eos_token` (`<|endoftext|>` for GPT-2). TRL appends
    /// it to non-conversational rows.
    pub eos_token_id: u32,
    /// The ids that end generation: `generation_config.json` / `config.json` `eos_token_id`
    /// (a list for Llama 3: `<|eot_id|>`, `<|end_of_text|>`), else `[eos_token_id]`.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if the tokenizer has a `bos_token`.
    pub bos_token_id: Option<u32>,
    /// Padding id: the tokenizer's `pad_token`, else `config.json`'s `pad_token_id`, else EOS.
    pub pad_token_id: u32,
    /// The named special tokens and chat template of `tokenizer_config.json` (empty for
    /// [`Tokenizer::from_file`]).
    pub config: TokenizerConfig,
    /// Where it was read from, for messages.
    pub path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("eos_token_id", &self.eos_token_id)
            .field("bos_token_id", &self.bos_token_id)
            .field("pad_token_id", &self.pad_token_id)
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
        let inner = parse(&json, path)?;
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
            eos_token_ids: vec![eos_token_id],
            bos_token_id: None,
            pad_token_id: pad.unwrap_or(eos_token_id),
            config: TokenizerConfig {
                path: path.with_file_name("tokenizer_config.json"),
                ..TokenizerConfig::default()
            },
            path: path.to_path_buf(),
        })
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` (+ `special_tokens_map.json`) of a
    /// model directory.
    ///
    /// `config_eos_ids` are the generation stop ids of `generation_config.json` (or
    /// `config.json`); `config_pad` is `config.json`'s `pad_token_id`. EOS is the tokenizer's
    /// `eos_token`, else the first config id, else `<|endoftext|>`.
    pub fn from_dir(dir: &Path, config_eos_ids: &[u32], config_pad: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let inner = parse(&json, &path)?;
        let config = TokenizerConfig::from_dir(dir)?;
        let id_of = |name: &str, tok: &Option<String>| -> Result<Option<u32>> {
            match tok {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| ModelError::Tokenizer {
                    path: config.path.clone(),
                    msg: format!(
                        "`{name}` {t:?} is not in the vocabulary of {}\nhint: fix `{name}` in tokenizer_config.json",
                        path.display()
                    ),
                }),
            }
        };
        let eos = id_of("eos_token", &config.special.eos_token)?;
        let bos_token_id = id_of("bos_token", &config.special.bos_token)?;
        let pad = id_of("pad_token", &config.special.pad_token)?;
        let eos_token_id = eos
            .or_else(|| config_eos_ids.first().copied())
            .or_else(|| inner.token_to_id("<|endoftext|>"))
            .ok_or_else(|| ModelError::Tokenizer {
                path: path.clone(),
                msg: "no end-of-sequence token\nhint: set `eos_token` in tokenizer_config.json or \
                      `eos_token_id` in generation_config.json"
                    .into(),
            })?;
        let eos_token_ids = if config_eos_ids.is_empty() {
            vec![eos_token_id]
        } else {
            config_eos_ids.to_vec()
        };
        Ok(Self {
            inner,
            json,
            eos_token_id,
            eos_token_ids,
            bos_token_id,
            pad_token_id: pad.or(config_pad).unwrap_or(eos_token_id),
            config,
            path,
        })
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_special(text, false)
    }

    /// Token ids of `text` as transformers' `tokenizer(text, add_special_tokens=...)`: with
    /// `true` the `tokenizer.json` post-processor adds its special tokens (Llama 3: BOS first).
    ///
    /// Added tokens written in the text (`<|im_start|>`) are matched either way; a rendered chat
    /// template is encoded with `false` so that its BOS is not doubled.
    pub fn encode_special(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encoding(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// The full encoding of `text` (ids and byte offsets into `text`).
    pub(crate) fn encoding(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                msg: e.to_string(),
            })
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

    /// The id of a token's text (added tokens included), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The EOS token's text (`tokenizer_config.json`'s, else the text of `eos_token_id`).
    pub fn eos_token(&self) -> Option<String> {
        self.config
            .special
            .eos_token
            .clone()
            .or_else(|| self.id_to_token(self.eos_token_id))
    }

    /// The BOS token's text, if the tokenizer has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.config.special.bos_token.as_deref()
    }

    /// The `tokenizer.json` contents.
    pub fn json(&self) -> &str {
        &self.json
    }
}

fn parse(json: &str, path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| ModelError::Tokenizer {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}
