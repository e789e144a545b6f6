//! Chat templates: found where transformers finds them, rendered as its `apply_chat_template`
//! renders them (byte for byte), and encoded to the same token ids.
//!
//! Where the template comes from ([`ChatTemplate::load`]), as transformers 5 loads a tokenizer:
//! `chat_template.jinja` (named `default`) plus `additional_chat_templates/<name>.jinja`; only
//! when there is no such file, the `chat_template` key of `tokenizer_config.json` (a string, or a
//! list of `{"name", "template"}`). Which one renders: the selected name, else `tool_use` when
//! tools are given and it exists, else `default`, else the only one.
//!
//! Rendering ([`ChatTemplate::render`]) follows `transformers.utils.chat_template_utils`
//! (`render_jinja_template`) and `apply_chat_template`:
//! - message keys whose value is null are dropped; `reasoning_content` / `thinking` /
//!   `reasoning` are aliased to each other (`_alias_reasoning_fields`);
//! - the template sees `messages`, `tools` (none unless given), `documents`,
//!   `add_generation_prompt`, the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and
//!   the extra kwargs (`enable_thinking`, `date_string`, ...), which win over special tokens;
//! - `continue_final_message` appends `"CONTINUE_FINAL_MESSAGE_TAG "` to the last message,
//!   renders, and cuts at the tag (trailing whitespace stripped when the template trimmed it);
//! - see [`env`](self::env) for the Jinja2 features (trim/lstrip blocks, `tojson`,
//!   `raise_exception`, `strftime_now`, `{% generation %}`).
//!
//! Encoding ([`ChatTemplate::encode`]) is `tokenizer(rendered, add_special_tokens=False)`, as
//! `apply_chat_template(tokenize=True)` does: a template that writes `<|begin_of_text|>` gets one
//! BOS, not two. The assistant mask of `return_assistant_tokens_mask=True` maps each
//! `{% generation %}` span to tokens with `char_to_token` on its first and last character.
//!
//! Deliberate deviations: tools must be JSON schemas (transformers also converts Python
//! functions); `continue_final_message` continues `content` only (not another field).

mod env;
mod error;
mod message;
mod pyjson;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use minijinja::value::{Serde, Value as JinjaValue};
use minijinja::Environment;
use serde_json::{Map, Value};

pub use env::{Clock, TemplateRaised};
pub use error::ChatError;
pub use message::{looks_conversational, messages_from_json, Message};

use crate::error::{io_err, ModelError, Result};
use crate::tokenizer::{ConfigTemplates, SpecialTokens, Tokenizer, TokenizerConfig};

/// Options of one render, with transformers' names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    /// End with the header of a new assistant turn.
    pub add_generation_prompt: bool,
    /// End inside the last message, so that generation continues it (no end-of-turn token).
    pub continue_final_message: bool,
    /// Tool JSON schemas (`{"type": "function", "function": {...}}`); `None`: the template sees none.
    pub tools: Option<Vec<Value>>,
    /// Documents for retrieval-augmented templates.
    pub documents: Option<Vec<Value>>,
    /// Extra template variables (`enable_thinking`, `date_string`, ...).
    pub kwargs: Map<String, Value>,
}

impl RenderOptions {
    /// Options with the generation prompt on or off.
    pub fn generation_prompt(on: bool) -> Self {
        Self {
            add_generation_prompt: on,
            ..Self::default()
        }
    }
}

/// A render with the byte spans of its `{% generation %}` blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The text.
    pub text: String,
    /// Byte ranges of `text` that `{% generation %}` blocks wrote, in the order they closed.
    pub generation_spans: Vec<Range<usize>>,
}

/// A rendered and tokenised conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatEncoding {
    /// The rendered text.
    pub text: String,
    /// Its token ids (no special tokens added).
    pub ids: Vec<u32>,
    /// 1 on tokens of assistant turns (`{% generation %}` blocks), when asked for; else empty.
    pub assistant_mask: Vec<u8>,
}

/// One model's chat templates, compiled, with the special tokens they see.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template names in load order.
    names: Vec<String>,
    /// Names of templates that contain `{% generation %}`.
    tracked: Vec<String>,
    selected: Option<String>,
    special: SpecialTokens,
    path: PathBuf,
    sources: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .field("names", &self.names)
            .field("selected", &self.selected)
            .finish()
    }
}

impl ChatTemplate {
    /// The templates of a model directory, or `None` when it has none (see the module docs for
    /// the order). Special tokens come from its `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let cfg = TokenizerConfig::from_dir(dir)?;
        let mut named = Vec::new();
        let file = dir.join("chat_template.jinja");
        let extra_dir = dir.join("additional_chat_templates");
        if file.is_file() {
            named.push((
                "default".to_string(),
                std::fs::read_to_string(&file).map_err(io_err(&file))?,
            ));
        }
        if extra_dir.is_dir() {
            let mut extra: Vec<PathBuf> = std::fs::read_dir(&extra_dir)
                .map_err(io_err(&extra_dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
                .collect();
            extra.sort();
            for p in extra {
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                named.push((name, std::fs::read_to_string(&p).map_err(io_err(&p))?));
            }
        }
        let mut path = if file.is_file() { file } else { extra_dir };
        if named.is_empty() {
            path = cfg.path.clone();
            match &cfg.chat_template {
                None => return Ok(None),
                Some(ConfigTemplates::Single(s)) => named.push(("default".into(), s.clone())),
                Some(ConfigTemplates::Named(list)) => named.clone_from(list),
            }
        }
        Self::from_named(named, &path, cfg.special).map(Some)
    }

    /// [`ChatTemplate::load`], with an error that names the directory when it has no template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::load(dir)?.ok_or_else(|| ChatError::NoTemplate { dir: dir.to_path_buf() }.into())
    }

    /// One template from its source text (`path` names it in messages), as transformers'
    /// `apply_chat_template(chat_template=...)`.
    pub fn from_source(source: &str, path: &Path, special: SpecialTokens) -> Result<Self> {
        Self::from_named(vec![("default".into(), source.to_string())], path, special)
    }

    /// One template read from a `.jinja` file, with the tokenizer's special tokens.
    pub fn from_file(path: &Path, special: SpecialTokens) -> Result<Self> {
        let source = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_source(&source, path, special)
    }

    fn from_named(named: Vec<(String, String)>, path: &Path, special: SpecialTokens) -> Result<Self> {
        let mut this = Self {
            env: env::environment(env::Clock::default()),
            names: Vec::new(),
            tracked: Vec::new(),
            selected: None,
            special,
            path: path.to_path_buf(),
            sources: BTreeMap::new(),
        };
        for (name, source) in named {
            this.add(name, source)?;
        }
        Ok(this)
    }

    fn add(&mut self, name: String, source: String) -> Result<()> {
        let (rewritten, tracked) = env::rewrite_generation_tags(&source);
        self.env
            .add_template_owned(name.clone(), rewritten)
            .map_err(|e| ChatError::Syntax {
                path: self.path.clone(),
                name: name.clone(),
                msg: describe(&e),
            })?;
        if tracked {
            self.tracked.push(name.clone());
        }
        self.sources.insert(name.clone(), source);
        self.names.push(name);
        Ok(())
    }

    /// Uses the template `name` for every render (error if there is none of that name).
    pub fn select(mut self, name: &str) -> Result<Self> {
        if !self.names.iter().any(|n| n == name) {
            return Err(ChatError::UnknownName {
                path: self.path.clone(),
                name: name.into(),
                available: self.names.clone(),
            }
            .into());
        }
        self.selected = Some(name.into());
        Ok(self)
    }

    /// Sets the time `strftime_now` reads (default: the local time at each render).
    pub fn with_clock(mut self, clock: env::Clock) -> Self {
        let names: Vec<String> = self.names.clone();
        self.env = env::environment(clock);
        for name in names {
            let (rewritten, _) = env::rewrite_generation_tags(&self.sources[&name]);
            self.env
                .add_template_owned(name, rewritten)
                .expect("invariant: the template parsed when it was added");
        }
        self
    }

    /// The template names, in load order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The special tokens the templates see.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Where the templates came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The source text of the template a render with `opts` uses.
    pub fn source(&self, opts: &RenderOptions) -> Result<&str> {
        let name = self.pick(opts)?;
        Ok(&self.sources[name])
    }

    /// Whether the template a render with `opts` uses marks assistant turns with
    /// `{% generation %}` (needed for assistant-only loss).
    pub fn has_generation_tags(&self, opts: &RenderOptions) -> Result<bool> {
        let name = self.pick(opts)?;
        Ok(self.tracked.iter().any(|n| n == name))
    }

    fn pick(&self, opts: &RenderOptions) -> Result<&str> {
        if let Some(s) = &self.selected {
            return Ok(s);
        }
        let has = |n: &str| self.names.iter().any(|x| x == n);
        if opts.tools.is_some() && has("tool_use") {
            return Ok("tool_use");
        }
        if has("default") {
            return Ok("default");
        }
        match self.names.as_slice() {
            [only] => Ok(only),
            _ => Err(ChatError::NoDefault {
                path: self.path.clone(),
                available: self.names.clone(),
            }
            .into()),
        }
    }

    /// The text of `messages` (transformers' `apply_chat_template(..., tokenize=False)`).
    pub fn render(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        Ok(self.render_inner(messages, opts, false)?.text)
    }

    /// [`ChatTemplate::render`] plus the byte spans of its `{% generation %}` blocks.
    pub fn render_tracked(&self, messages: &[Message], opts: &RenderOptions) -> Result<Rendered> {
        if opts.continue_final_message {
            return Err(
                self.input_err("continue_final_message is not compatible with assistant masks (as in transformers)")
            );
        }
        self.render_inner(messages, opts, true)
    }

    /// The token ids of `messages`: the render encoded without adding special tokens
    /// (`apply_chat_template(..., tokenize=True)`).
    pub fn encode(&self, tok: &Tokenizer, messages: &[Message], opts: &RenderOptions) -> Result<ChatEncoding> {
        let text = self.render(messages, opts)?;
        let ids = tok.encode_special(&text, false)?;
        Ok(ChatEncoding {
            text,
            ids,
            assistant_mask: Vec::new(),
        })
    }

    /// [`ChatTemplate::encode`] with the assistant mask of `return_assistant_tokens_mask=True`.
    ///
    /// A template without `{% generation %}` is an error here (transformers only warns and
    /// returns an all-zero mask, which TRL then rejects).
    pub fn encode_with_assistant_mask(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        opts: &RenderOptions,
    ) -> Result<ChatEncoding> {
        if !self.has_generation_tags(opts)? {
            return Err(self.input_err(&format!(
                "chat template `{}` has no {{% generation %}} blocks, so assistant tokens cannot be masked\n\
                 hint: use a training template that wraps assistant turns in {{% generation %}}...{{% endgeneration %}} \
                 (TRL ships qwen2_5_training.jinja, qwen3_training.jinja, llama3_training.jinja) or turn assistant-only loss off",
                self.pick(opts)?
            )));
        }
        let rendered = self.render_tracked(messages, opts)?;
        let enc = tok.encoding(&rendered.text, false)?;
        let n = enc.get_ids().len();
        let mut mask = vec![0u8; n];
        for span in &rendered.generation_spans {
            if span.is_empty() {
                continue;
            }
            let Some(start) = enc.char_to_token(span.start, 0) else {
                break; // transformers: "start_token is out of bounds maybe due to truncation"
            };
            let last_char = rendered.text[..span.end]
                .char_indices()
                .next_back()
                .map_or(span.start, |(i, _)| i);
            // transformers: `range(start, end + 1 if end_token else len(ids))`; a token index 0
            // counts as "no end" there too.
            let end = match enc.char_to_token(last_char, 0) {
                Some(e) if e > 0 => e + 1,
                _ => n,
            };
            for m in &mut mask[start..end.min(n)] {
                *m = 1;
            }
        }
        Ok(ChatEncoding {
            text: rendered.text,
            ids: enc.get_ids().to_vec(),
            assistant_mask: mask,
        })
    }

    fn input_err(&self, msg: &str) -> ModelError {
        ChatError::Input {
            path: self.path.clone(),
            msg: msg.to_string(),
        }
        .into()
    }

    fn render_inner(&self, messages: &[Message], opts: &RenderOptions, track: bool) -> Result<Rendered> {
        const TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
        let name = self.pick(opts)?;
        if messages.is_empty() {
            return Err(self
                .input_err("cannot apply a chat template to an empty conversation; hint: give at least one message"));
        }
        if opts.continue_final_message && opts.add_generation_prompt {
            return Err(self.input_err(
                "continue_final_message and add_generation_prompt are not compatible: the first continues the \
                 last message, the second starts a new assistant turn",
            ));
        }
        let mut chat: Vec<Map<String, Value>> = messages.iter().map(prepare_message).collect();
        let mut final_text = String::new();
        if opts.continue_final_message {
            final_text = self.tag_final_message(&mut chat, name, TAG)?;
        }
        if track {
            let inputs = serde_json::to_string(&(&chat, &opts.tools, &opts.documents, &opts.kwargs))
                .expect("invariant: JSON values serialize");
            if inputs.contains([env::GEN_OPEN, env::GEN_CLOSE]) {
                return Err(self.input_err(
                    "the conversation contains the noncharacters U+FDD0/U+FDD1, which mark assistant spans",
                ));
            }
        }
        let ctx = self.context(&chat, opts, track);
        let tmpl = self.env.get_template(name).map_err(|e| ChatError::Render {
            path: self.path.clone(),
            name: name.into(),
            msg: describe(&e),
        })?;
        let text = tmpl.render(ctx).map_err(|e| self.render_error(name, &e))?;
        let (mut text, spans) = if track { take_spans(&text) } else { (text, Vec::new()) };
        if opts.continue_final_message {
            let needle = TAG.trim();
            if !text.contains(final_text.trim()) || !text.contains(needle) {
                return Err(self.input_err(
                    "continue_final_message is set but the final message does not appear in the rendered chat \
                     (the template deletes part of it); hint: check the template and the final message",
                ));
            }
            let at = text.rfind(needle).expect("invariant: checked just above");
            if text[at..].starts_with(TAG) {
                text.truncate(at);
            } else {
                text.truncate(text[..at].trim_end().len());
            }
        }
        Ok(Rendered {
            text,
            generation_spans: spans,
        })
    }

    /// Appends the continuation tag to the final message's text; returns that text.
    fn tag_final_message(&self, chat: &mut [Map<String, Value>], name: &str, tag: &str) -> Result<String> {
        if !self.sources[name].contains("content") {
            return Err(self.input_err(
                "continue_final_message is set to \"content\" but the chat template never reads `content`",
            ));
        }
        let last = chat.last_mut().expect("invariant: messages are not empty");
        match last.get_mut("content") {
            Some(Value::String(s)) => {
                let original = s.clone();
                s.push_str(tag);
                Ok(original)
            }
            Some(Value::Array(blocks)) => {
                for block in blocks.iter_mut().rev() {
                    if let Some(Value::String(s)) = block.get_mut("text") {
                        let original = s.clone();
                        s.push_str(tag);
                        return Ok(original);
                    }
                }
                Err(self.input_err("continue_final_message is set but the final message has no text block to continue"))
            }
            _ => {
                Err(self
                    .input_err("continue_final_message is set but the final message has no \"content\" to continue"))
            }
        }
    }

    fn context(&self, chat: &[Map<String, Value>], opts: &RenderOptions, track: bool) -> JinjaValue {
        let mut ctx: Map<String, Value> = Map::new();
        for (k, v) in self.special.as_map() {
            ctx.insert(k.into(), Value::String(v.into()));
        }
        for (k, v) in &opts.kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        let mut vars = Map::new();
        vars.insert(
            "messages".into(),
            Value::Array(chat.iter().cloned().map(Value::Object).collect()),
        );
        vars.insert("tools".into(), opts.tools.clone().map_or(Value::Null, Value::Array));
        vars.insert(
            "documents".into(),
            opts.documents.clone().map_or(Value::Null, Value::Array),
        );
        vars.insert("add_generation_prompt".into(), Value::Bool(opts.add_generation_prompt));
        for (k, v) in ctx {
            vars.insert(k, v);
        }
        if track {
            vars.insert(env::TRACK_VAR.into(), Value::Bool(true));
        }
        JinjaValue::from(Serde(Value::Object(vars)))
    }

    fn render_error(&self, name: &str, e: &minijinja::Error) -> ModelError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(raised) = err.downcast_ref::<TemplateRaised>() {
                return ChatError::Raised {
                    path: self.path.clone(),
                    name: name.into(),
                    msg: raised.0.clone(),
                }
                .into();
            }
            source = err.source();
        }
        ChatError::Render {
            path: self.path.clone(),
            name: name.into(),
            msg: describe(e),
        }
        .into()
    }
}

/// A message as the template sees it: null fields dropped, reasoning fields aliased
/// (transformers' `apply_chat_template` and `_alias_reasoning_fields`).
fn prepare_message(m: &Message) -> Map<String, Value> {
    let mut msg: Map<String, Value> = m
        .fields()
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| msg.get(*k).cloned());
    if let Some(r) = reasoning {
        // `{"thinking": r, **message, "reasoning_content": r}`.
        let mut out = Map::new();
        out.insert("thinking".into(), r.clone());
        for (k, v) in std::mem::take(&mut msg) {
            out.insert(k, v);
        }
        out.insert("reasoning_content".into(), r);
        msg = out;
    }
    msg
}

/// Removes the span marks of a tracked render; returns the text and the spans' byte ranges.
fn take_spans(marked: &str) -> (String, Vec<Range<usize>>) {
    let mut text = String::with_capacity(marked.len());
    let mut open = Vec::new();
    let mut spans = Vec::new();
    for c in marked.chars() {
        match c {
            env::GEN_OPEN => open.push(text.len()),
            env::GEN_CLOSE => {
                if let Some(start) = open.pop() {
                    spans.push(start..text.len());
                }
            }
            c => text.push(c),
        }
    }
    (text, spans)
}

/// minijinja's message with the template line, without the debug dump.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e
        .detail()
        .map_or_else(|| e.kind().to_string(), |d| format!("{}: {d}", e.kind()));
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (line {line})"));
    }
    msg
}
