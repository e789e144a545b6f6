//! Rows as TRL 1.16's trainers tokenize them: plain text, or conversations (lists of
//! `{"role", "content"}` messages) rendered with the model's chat template.
//!
//! A row is conversational when one of `prompt`, `chosen`, `rejected`, `completion`, `messages`
//! holds a list whose first element is an object with a `role` (TRL's `is_conversational`);
//! every other of those columns in the row must then be a message list too. A row may also carry
//! `tools` (a list of JSON schemas, or that list as a JSON string) and `chat_template_kwargs` (an
//! object passed to the template, e.g. `{"enable_thinking": false}`).
//!
//! Per trainer (TRL 1.16 `*_trainer.py` `_prepare_dataset`, `data_utils.py`):
//! - reward ([`ChatData::reward_pair`]): conversational `prompt + chosen` / `prompt + rejected`
//!   rendered whole (no generation prompt, no EOS appended: the turn terminator ends it);
//!   text: `prompt + chosen + eos` tokenized with special tokens (Llama 3: BOS first).
//! - DPO ([`ChatData::dpo_triple`]): the prompt alone with the generation prompt, `prompt + chosen`
//!   and `prompt + rejected`; the prompt length is the shortest common token prefix, the rest is
//!   the completion. Rows without `prompt` have it extracted first (`extract_prompt`: the longest
//!   common prefix of messages, or of characters for text).
//! - SFT ([`ChatData::sft_example`]): prompt-completion rows get `completion_mask` (0 on the common
//!   token prefix of the prompt with generation prompt and the whole render); with
//!   `assistant_only_loss` the template's `{% generation %}` blocks give `assistant_mask`.
//!   Language-modeling rows are `messages` (or the text column + EOS).
//! - GRPO / RLOO / PPO prompts ([`ChatData::prompt_ids`]): rendered with the generation prompt;
//!   text prompts tokenized with special tokens.
//!
//! Deliberate deviations: with `assistant_only_loss` TRL swaps in its own `*_training.jinja`
//! when the tokenizer's template has no `{% generation %}`; here the template must already have
//! it (an error says so). GRPO reads only the trainer's `chat_template_kwargs`; here a row's own
//! `chat_template_kwargs` also apply (they win), as in the other trainers.

use std::path::Path;

use rlhf_models::chat::{looks_conversational, messages_from_json, Message, RenderOptions};
use rlhf_models::{ChatTemplate, Model, Tokenizer};
use serde_json::{Map, Value};

use crate::data::{prompt_rows, read_data, PromptSet, Rows};
use crate::error::{Result, TrainError};

/// The columns TRL's `is_conversational` looks at.
pub const CONVERSATIONAL_COLUMNS: [&str; 5] = ["prompt", "chosen", "rejected", "completion", "messages"];

/// One column of a row: text, or a conversation.
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    /// A plain string.
    Text(String),
    /// A list of messages.
    Messages(Vec<Message>),
}

/// Whether row `idx` is conversational (TRL's `is_conversational`).
pub fn is_conversational(rows: &Rows, idx: usize) -> bool {
    CONVERSATIONAL_COLUMNS
        .iter()
        .filter_map(|c| rows.rows[idx].get(*c))
        .any(looks_conversational)
}

/// SFT ids with TRL's masks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftTokens {
    /// The whole sequence.
    pub input_ids: Vec<u32>,
    /// Prompt-completion rows: 1 on the completion.
    pub completion_mask: Option<Vec<u8>>,
    /// With assistant-only loss: 1 on assistant tokens.
    pub assistant_mask: Option<Vec<u8>>,
}

impl SftTokens {
    /// TRL's `labels`: the id where every applicable mask is 1, else -100 (`completion_mask`
    /// applies only with `completion_only_loss`; `assistant_mask` always).
    pub fn labels(&self, completion_only_loss: bool) -> Vec<i64> {
        (0..self.input_ids.len())
            .map(|t| {
                let completion = !completion_only_loss || self.completion_mask.as_ref().is_none_or(|m| m[t] == 1);
                let assistant = self.assistant_mask.as_ref().is_none_or(|m| m[t] == 1);
                if completion && assistant {
                    i64::from(self.input_ids[t])
                } else {
                    -100
                }
            })
            .collect()
    }
}

/// DPO's three id lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpoTokens {
    /// The shared prompt.
    pub prompt_ids: Vec<u32>,
    /// The chosen completion (after the prompt).
    pub chosen_ids: Vec<u32>,
    /// The rejected completion.
    pub rejected_ids: Vec<u32>,
}

/// The tokenizer, chat template and trainer-level template inputs that turn rows into ids.
#[derive(Clone, Copy, Debug)]
pub struct ChatData<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The model's chat template (`None`: conversational rows are an error).
    pub template: Option<&'a ChatTemplate>,
    /// The trainer's `chat_template_kwargs` (a row's own win).
    pub kwargs: Option<&'a Map<String, Value>>,
    /// The trainer's `tools` (a row's own `tools` win).
    pub tools: Option<&'a [Value]>,
}

/// The chat template a trainer renders with: the file `path` when given (TRL's
/// `chat_template_path`), else the model's own (`None` when it has none).
pub fn template_for(model: &rlhf_models::Model, path: Option<&str>) -> Result<Option<ChatTemplate>> {
    match path {
        Some(p) => Ok(Some(ChatTemplate::from_file(
            std::path::Path::new(p),
            model.tokenizer()?.config.special.clone(),
        )?)),
        None => Ok(model.chat_template.clone()),
    }
}

impl<'a> ChatData<'a> {
    /// Plain-text rows only (no template).
    pub fn text(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            template: None,
            kwargs: None,
            tools: None,
        }
    }

    /// With the model's chat template.
    pub fn with_template(tokenizer: &'a Tokenizer, template: Option<&'a ChatTemplate>) -> Self {
        Self {
            template,
            ..Self::text(tokenizer)
        }
    }

    /// Reward pair ids `(prompt + chosen, prompt + rejected)`.
    pub fn reward_pair(&self, rows: &Rows, idx: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let conversational = self.conversational(rows, idx)?;
        let prompt = self.opt_field(rows, idx, "prompt")?;
        let chosen = self.field(rows, idx, "chosen")?;
        let rejected = self.field(rows, idx, "rejected")?;
        if conversational {
            let opts = self.options(rows, idx, false)?;
            let whole = |answer: Field| -> Result<Vec<u32>> {
                let msgs = concat(prompt.clone(), answer);
                self.encode(rows, idx, &msgs, &opts)
            };
            Ok((whole(chosen)?, whole(rejected)?))
        } else {
            let p = text_of(prompt);
            let eos = self.eos_text(rows, idx)?;
            let whole =
                |answer: Field| self.tokenize(rows, idx, &format!("{p}{}", with_eos(&text_of(Some(answer)), &eos)));
            Ok((whole(chosen)?, whole(rejected)?))
        }
    }

    /// DPO ids: prompt, chosen and rejected completions.
    pub fn dpo_triple(&self, rows: &Rows, idx: usize) -> Result<DpoTokens> {
        let conversational = self.conversational(rows, idx)?;
        let chosen = self.field(rows, idx, "chosen")?;
        let rejected = self.field(rows, idx, "rejected")?;
        let (prompt, chosen, rejected) = match self.opt_field(rows, idx, "prompt")? {
            Some(p) => (p, chosen, rejected),
            None => extract_prompt(chosen, rejected),
        };
        let (prompt_ids, chosen_full, rejected_full) = if conversational {
            let prompt_opts = self.options(rows, idx, true)?;
            let opts = self.options(rows, idx, false)?;
            let p = messages_of(prompt.clone());
            (
                self.encode(rows, idx, &p, &prompt_opts)?,
                self.encode(rows, idx, &concat(Some(prompt.clone()), chosen), &opts)?,
                self.encode(rows, idx, &concat(Some(prompt), rejected), &opts)?,
            )
        } else {
            let eos = self.eos_text(rows, idx)?;
            let p = text_of(Some(prompt));
            (
                self.tokenize(rows, idx, &p)?,
                self.tokenize(rows, idx, &format!("{p}{}", with_eos(&text_of(Some(chosen)), &eos)))?,
                self.tokenize(rows, idx, &format!("{p}{}", with_eos(&text_of(Some(rejected)), &eos)))?,
            )
        };
        let n = common_prefix_length(&prompt_ids, &chosen_full).min(common_prefix_length(&prompt_ids, &rejected_full));
        Ok(DpoTokens {
            prompt_ids: prompt_ids[..n].to_vec(),
            chosen_ids: chosen_full[n..].to_vec(),
            rejected_ids: rejected_full[n..].to_vec(),
        })
    }

    /// SFT ids and masks; `text_field` is the column of language-modeling text rows.
    pub fn sft_example(
        &self,
        rows: &Rows,
        idx: usize,
        text_field: &str,
        assistant_only_loss: bool,
    ) -> Result<SftTokens> {
        let conversational = self.conversational(rows, idx)?;
        if assistant_only_loss && !conversational {
            return Err(row_err(
                rows,
                idx,
                "assistant_only_loss needs conversational rows (lists of {\"role\", \"content\"} messages); \
                 hint: turn assistant_only_loss off for plain text",
            ));
        }
        let mut out = if rows.has(idx, "prompt") {
            let prompt = self.field(rows, idx, "prompt")?;
            let completion = self.field(rows, idx, "completion")?;
            let (prompt_ids, full, assistant_mask) = if conversational {
                let p = messages_of(prompt.clone());
                let prompt_ids = self.encode(rows, idx, &p, &self.options(rows, idx, true)?)?;
                let (ids, mask) =
                    self.encode_masked(rows, idx, &concat(Some(prompt), completion), assistant_only_loss)?;
                (prompt_ids, ids, mask)
            } else {
                let eos = self.eos_text(rows, idx)?;
                let p = text_of(Some(prompt));
                let c = with_eos(&text_of(Some(completion)), &eos);
                (
                    self.tokenize(rows, idx, &p)?,
                    self.tokenize(rows, idx, &format!("{p}{c}"))?,
                    None,
                )
            };
            let n = common_prefix_length(&prompt_ids, &full);
            SftTokens {
                completion_mask: Some((0..full.len()).map(|t| u8::from(t >= n)).collect()),
                input_ids: full,
                assistant_mask,
            }
        } else if conversational {
            let msgs = messages_of(self.field(rows, idx, "messages")?);
            let (input_ids, assistant_mask) = self.encode_masked(rows, idx, &msgs, assistant_only_loss)?;
            SftTokens {
                input_ids,
                completion_mask: None,
                assistant_mask,
            }
        } else {
            let eos = self.eos_text(rows, idx)?;
            let text = with_eos(rows.text(idx, text_field)?, &eos);
            SftTokens {
                input_ids: self.tokenize(rows, idx, &text)?,
                completion_mask: None,
                assistant_mask: None,
            }
        };
        if let Some(mask) = &out.assistant_mask {
            if !mask.contains(&1) {
                return Err(row_err(
                    rows,
                    idx,
                    "assistant_only_loss: the row has no assistant tokens ({% generation %} blocks rendered nothing); \
                     hint: check that the row has an assistant message and the template marks it",
                ));
            }
        }
        out.input_ids.shrink_to_fit();
        Ok(out)
    }

    /// Prompt ids for generation (GRPO, RLOO, PPO): the `prompt` column (or `query` for text)
    /// rendered with the generation prompt.
    pub fn prompt_ids(&self, rows: &Rows, idx: usize) -> Result<Vec<u32>> {
        let col = if rows.has(idx, "prompt") || !rows.has(idx, "query") {
            "prompt"
        } else {
            "query"
        };
        self.prompt_ids_in(rows, idx, col)
    }

    /// Prompt ids for generation from column `col`: text tokenised with the tokenizer's
    /// special tokens (Llama 3: BOS first), as TRL does, or messages rendered with the chat
    /// template, the generation prompt and the row's `chat_template_kwargs` and `tools`.
    pub fn prompt_ids_in(&self, rows: &Rows, idx: usize, col: &str) -> Result<Vec<u32>> {
        self.conversational(rows, idx)?;
        match self.field(rows, idx, col)? {
            Field::Messages(m) => self.encode(rows, idx, &m, &self.options(rows, idx, true)?),
            Field::Text(t) => self.tokenize(rows, idx, &t),
        }
    }

    /// [`ChatData::prompt_ids_in`] of every row.
    pub fn prompt_set_ids(&self, rows: &Rows, col: &str) -> Result<Vec<Vec<u32>>> {
        (0..rows.len()).map(|i| self.prompt_ids_in(rows, i, col)).collect()
    }

    /// The column as text or messages, with the row named in errors.
    pub fn field(&self, rows: &Rows, idx: usize, col: &str) -> Result<Field> {
        match rows.rows[idx].get(col) {
            Some(Value::Array(_)) => {
                let v = &rows.rows[idx][col];
                messages_from_json(v)
                    .map(Field::Messages)
                    .map_err(|e| row_err(rows, idx, &format!("column `{col}`: {e}")))
            }
            _ => rows.text(idx, col).map(|t| Field::Text(t.to_string())),
        }
    }

    fn opt_field(&self, rows: &Rows, idx: usize, col: &str) -> Result<Option<Field>> {
        if rows.has(idx, col) {
            self.field(rows, idx, col).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Whether the row is conversational, checking that its columns agree.
    fn conversational(&self, rows: &Rows, idx: usize) -> Result<bool> {
        let conv = is_conversational(rows, idx);
        for col in CONVERSATIONAL_COLUMNS {
            match rows.rows[idx].get(col) {
                Some(Value::String(_)) if conv => {
                    return Err(row_err(
                        rows,
                        idx,
                        &format!(
                            "column `{col}` is text while other columns hold messages; hint: give every column as a \
                             list of {{\"role\", \"content\"}} messages, or every column as text"
                        ),
                    ))
                }
                Some(Value::Array(_)) if !conv => {
                    return Err(row_err(
                        rows,
                        idx,
                        &format!(
                            "column `{col}` must be text or a list of {{\"role\", \"content\"}} messages; \
                             its first element is not an object with a `role`"
                        ),
                    ))
                }
                _ => {}
            }
        }
        if conv && self.template.is_none() {
            return Err(row_err(
                rows,
                idx,
                "the row is conversational but the model has no chat template; hint: use a model whose \
                 tokenizer has a chat template (chat_template.jinja or tokenizer_config.json), or give text rows",
            ));
        }
        Ok(conv)
    }

    /// Template inputs of the row: tools and kwargs (row over trainer), and the generation prompt.
    fn options(&self, rows: &Rows, idx: usize, add_generation_prompt: bool) -> Result<RenderOptions> {
        let mut kwargs = self.kwargs.cloned().unwrap_or_default();
        match rows.rows[idx].get("chat_template_kwargs") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => kwargs.extend(m.clone()),
            Some(_) => return Err(row_err(rows, idx, "column `chat_template_kwargs` must be an object")),
        }
        let tools = match rows.rows[idx].get("tools") {
            None | Some(Value::Null) => self.tools.map(<[Value]>::to_vec),
            Some(Value::Array(a)) => Some(a.clone()),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Array(a)) => Some(a),
                Ok(Value::Null) => None,
                _ => {
                    return Err(row_err(
                        rows,
                        idx,
                        "column `tools` must be a list of tool schemas (or that list as JSON text)",
                    ))
                }
            },
            Some(_) => return Err(row_err(rows, idx, "column `tools` must be a list of tool schemas")),
        };
        Ok(RenderOptions {
            add_generation_prompt,
            // `tools or None`: an empty list renders as no tools (TRL's Llama workaround).
            tools: tools.filter(|t| !t.is_empty()),
            kwargs,
            ..RenderOptions::default()
        })
    }

    fn template(&self, rows: &Rows, idx: usize) -> Result<&'a ChatTemplate> {
        self.template.ok_or_else(|| {
            row_err(
                rows,
                idx,
                "the row is conversational but the model has no chat template",
            )
        })
    }

    fn encode(&self, rows: &Rows, idx: usize, msgs: &[Message], opts: &RenderOptions) -> Result<Vec<u32>> {
        let t = self.template(rows, idx)?;
        Ok(t.encode(self.tokenizer, msgs, opts)
            .map_err(|e| in_row(rows, idx, e))?
            .ids)
    }

    fn encode_masked(
        &self,
        rows: &Rows,
        idx: usize,
        msgs: &[Message],
        masked: bool,
    ) -> Result<(Vec<u32>, Option<Vec<u8>>)> {
        let opts = self.options(rows, idx, false)?;
        if !masked {
            return Ok((self.encode(rows, idx, msgs, &opts)?, None));
        }
        let t = self.template(rows, idx)?;
        let enc = t
            .encode_with_assistant_mask(self.tokenizer, msgs, &opts)
            .map_err(|e| in_row(rows, idx, e))?;
        Ok((enc.ids, Some(enc.assistant_mask)))
    }

    /// `tokenizer(text)`: special tokens added, as TRL's `_tokenize` on text.
    fn tokenize(&self, rows: &Rows, idx: usize, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_special(text, true)
            .map_err(|e| in_row(rows, idx, e))
    }

    fn eos_text(&self, rows: &Rows, idx: usize) -> Result<String> {
        self.tokenizer
            .eos_token()
            .ok_or_else(|| row_err(rows, idx, "the tokenizer has no EOS token to append to text rows"))
    }
}

/// The prompts of a data file ([`prompt_rows`]: the `prompt` column if the first row has
/// one, else `query`) and their generation ids for `model` ([`ChatData::prompt_ids_in`]):
/// what PPO, GRPO and RLOO generate from.
pub fn read_prompts_for(model: &Model, path: &Path) -> Result<(PromptSet, Vec<Vec<u32>>)> {
    let rows = read_data(path)?;
    let set = prompt_rows(rows.clone())?;
    let data = ChatData::with_template(model.tokenizer()?, model.chat_template.as_ref());
    let ids = data.prompt_set_ids(&rows, &set.prompt_column)?;
    Ok((set, ids))
}

fn row_err(rows: &Rows, idx: usize, msg: &str) -> TrainError {
    TrainError::Row {
        path: rows.path.clone(),
        row: idx + 1,
        msg: msg.to_string(),
    }
}

/// A model error (a template that raised) with the row it happened on.
fn in_row(rows: &Rows, idx: usize, e: rlhf_models::ModelError) -> TrainError {
    row_err(rows, idx, &e.to_string())
}

fn with_eos(text: &str, eos: &str) -> String {
    if text.ends_with(eos) {
        text.to_string()
    } else {
        format!("{text}{eos}")
    }
}

fn text_of(f: Option<Field>) -> String {
    match f {
        Some(Field::Text(t)) => t,
        Some(Field::Messages(_)) => unreachable!("invariant: rows are checked to be text"),
        None => String::new(),
    }
}

fn messages_of(f: Field) -> Vec<Message> {
    match f {
        Field::Messages(m) => m,
        Field::Text(_) => unreachable!("invariant: rows are checked to be conversational"),
    }
}

fn concat(prompt: Option<Field>, answer: Field) -> Vec<Message> {
    let mut out = prompt.map(messages_of).unwrap_or_default();
    out.extend(messages_of(answer));
    out
}

/// Number of leading tokens two sequences share (TRL's `common_prefix_length`).
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// TRL's `extract_prompt`: the shared start of `chosen` and `rejected` becomes the prompt (whole
/// messages, or characters for text, leaving a separating space with the completions).
pub fn extract_prompt(chosen: Field, rejected: Field) -> (Field, Field, Field) {
    fn split<T: PartialEq>(c: &[T], r: &[T], is_space: impl Fn(&T) -> bool) -> usize {
        match c.iter().zip(r).position(|(a, b)| a != b) {
            Some(i) if i > 0 && is_space(&c[i - 1]) => i - 1,
            Some(i) => i,
            // Python's `for idx in range(n)` leaves idx at n - 1 when nothing differs.
            None => c.len().min(r.len()).saturating_sub(1),
        }
    }
    match (chosen, rejected) {
        (Field::Messages(c), Field::Messages(r)) => {
            let k = split(&c, &r, |_| false);
            (
                Field::Messages(c[..k].to_vec()),
                Field::Messages(c[k..].to_vec()),
                Field::Messages(r[k..].to_vec()),
            )
        }
        (Field::Text(c), Field::Text(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let k = split(&cc, &rc, |ch| *ch == ' ');
            let s = |v: &[char]| v.iter().collect::<String>();
            (
                Field::Text(s(&cc[..k])),
                Field::Text(s(&cc[k..])),
                Field::Text(s(&rc[k..])),
            )
        }
        (c, r) => (Field::Text(String::new()), c, r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_prompt_takes_the_common_start_as_trl() {
        let (p, c, r) = extract_prompt(
            Field::Text("Q: sky? A: blue".into()),
            Field::Text("Q: sky? A: green".into()),
        );
        assert_eq!(
            (p, c, r),
            (
                Field::Text("Q: sky? A:".into()),
                Field::Text(" blue".into()),
                Field::Text(" green".into())
            )
        );
        let u = Message::new("user", "q");
        let (p, c, r) = extract_prompt(
            Field::Messages(vec![u.clone(), Message::new("assistant", "a")]),
            Field::Messages(vec![u.clone(), Message::new("assistant", "b")]),
        );
        assert_eq!(p, Field::Messages(vec![u]));
        assert_eq!(c, Field::Messages(vec![Message::new("assistant", "a")]));
        assert_eq!(r, Field::Messages(vec![Message::new("assistant", "b")]));
    }

    #[test]
    fn labels_keep_tokens_where_every_active_mask_is_one() {
        let t = SftTokens {
            input_ids: vec![5, 6, 7, 8],
            completion_mask: Some(vec![0, 0, 1, 1]),
            assistant_mask: Some(vec![0, 1, 1, 0]),
        };
        assert_eq!(t.labels(true), vec![-100, -100, 7, -100]);
        assert_eq!(t.labels(false), vec![-100, 6, 7, -100]);
        assert_eq!(common_prefix_length(&[1, 2, 3], &[1, 2, 4, 5]), 2);
    }
}
