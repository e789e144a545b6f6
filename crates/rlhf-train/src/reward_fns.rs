//! Reward functions of the online trainers (GRPO, RLOO): TRL 1.16's `reward_funcs`.
//!
//! Three kinds, one closed enum [`RewardFunc`]:
//! - **reward models** (`reward_model_name_or_path`): a sequence classifier scores
//!   `prompt + completion` ([`model`]);
//! - **built-in rules** by name in `reward_funcs` ([`rules`]): `regex_match`,
//!   `length_target`, `exact_answer`, `distinct_words`, `think_format_reward` and
//!   `get_soft_overlong_punishment` (the last two TRL's own);
//! - **an external command** (`reward_command`): a long-lived subprocess speaking one JSON
//!   line per batch each way ([`command`]), the stand-in for TRL's Python callables.
//!
//! The functions run in that order — the reward model, the `reward_funcs` in their order,
//! the command (TRL's `grpo.py` script puts the reward model first too) — and
//! `reward_weights`, when given, has one weight per function in the same order.
//! Each scores the whole generation batch at once and returns one value per completion,
//! `None` where it does not apply (TRL's `None`, NaN in the math). A function's name is the
//! one its metrics are logged under, `rewards/<name>/mean` and `rewards/<name>/std`.
//!
//! TRL's `accuracy_reward` and `reasoning_accuracy_reward` need the `math_verify` package
//! (symbolic LaTeX equivalence); `exact_answer` is the plain-text stand-in, and a
//! `reward_command` can run `math_verify` itself.

pub mod command;
pub mod model;
pub mod rules;

use std::collections::BTreeMap;
use std::time::Duration;

use fancy_regex::Regex;
use rlhf_models::LoadOptions;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config_values::names;
use crate::data::PromptRow;
use crate::error::{Result, TrainError};

pub use command::RewardCommand;
pub use model::RewardModel;

/// The reward-function keys of the GRPO and RLOO configs. TRL's scripts name the first two
/// (`reward_model_name_or_path`, `reward_funcs`); the rest configure the functions here.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RewardArgs {
    /// A reward model directory, scored first (TRL script key).
    pub reward_model_name_or_path: Option<String>,
    /// Built-in reward functions by name (TRL script key; a list, or names separated by
    /// commas): `regex_match`, `length_target`, `exact_answer`, `distinct_words`,
    /// `think_format_reward`, `get_soft_overlong_punishment`.
    #[serde(deserialize_with = "names")]
    pub reward_funcs: Vec<String>,
    /// An external reward command, run once with `sh -c` and kept for the run.
    pub reward_command: Option<String>,
    /// Seconds to wait for the command's answer to one batch.
    pub reward_command_timeout: f64,
    /// The pattern of `regex_match` (fancy-regex syntax, close to Python's `re`).
    pub reward_regex: Option<String>,
    /// The target of `length_target`, in completion tokens.
    pub reward_target_length: Option<usize>,
    /// The column with the reference answer of `exact_answer` (default: `solution`, else
    /// `answer`).
    pub reward_answer_column: Option<String>,
    /// `L_cache` of `get_soft_overlong_punishment` (`L_max` is `max_completion_length`;
    /// TRL's script uses 256 with `L_max` 1280).
    pub soft_punish_cache: usize,
}

impl Default for RewardArgs {
    fn default() -> Self {
        Self {
            reward_model_name_or_path: None,
            reward_funcs: Vec::new(),
            reward_command: None,
            reward_command_timeout: 300.0,
            reward_regex: None,
            reward_target_length: None,
            reward_answer_column: None,
            soft_punish_cache: 256,
        }
    }
}

/// The built-in names `reward_funcs` accepts.
pub const BUILTIN_REWARDS: [&str; 6] = [
    "regex_match",
    "length_target",
    "exact_answer",
    "distinct_words",
    "think_format_reward",
    "get_soft_overlong_punishment",
];

impl RewardArgs {
    /// The names of the functions, in scoring order, as their metrics are logged.
    pub fn names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .reward_model_name_or_path
            .iter()
            .map(|p| model::model_name(p))
            .collect();
        for f in &self.reward_funcs {
            out.push(match f.as_str() {
                // TRL logs the callable's `__name__`.
                "get_soft_overlong_punishment" | "soft_overlong_punishment" => "soft_overlong_punishment_reward".into(),
                other => other.to_string(),
            });
        }
        out.extend(self.reward_command.iter().map(|c| command::command_name(c)));
        out
    }

    /// Checks the settings and builds the rule functions (cheap; no model or process):
    /// at least one function, known names, each rule's parameter present and valid, no
    /// parameter without its rule, distinct names. `max_completion_length` is
    /// `get_soft_overlong_punishment`'s `L_max`.
    pub fn rules(&self, max_completion_length: usize) -> Result<Vec<RewardFunc>> {
        let bad = |k: &str, msg: String| Err(TrainError::setting(k, msg));
        if self.reward_funcs.is_empty() && self.reward_model_name_or_path.is_none() && self.reward_command.is_none() {
            return bad(
                "reward_funcs",
                "no reward function: set reward_funcs (built-in rules), reward_model_name_or_path or reward_command\n\
                 hint: e.g. --reward-funcs distinct_words"
                    .into(),
            );
        }
        let uses = |name: &str| self.reward_funcs.iter().any(|f| f == name);
        for (key, set, rule) in [
            ("reward_regex", self.reward_regex.is_some(), "regex_match"),
            (
                "reward_target_length",
                self.reward_target_length.is_some(),
                "length_target",
            ),
            (
                "reward_answer_column",
                self.reward_answer_column.is_some(),
                "exact_answer",
            ),
        ] {
            if set && !uses(rule) {
                return bad(
                    key,
                    format!("is set but reward_funcs does not list `{rule}`, which reads it\nhint: add `{rule}` to reward_funcs or drop {key}"),
                );
            }
        }
        if self.reward_command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return bad(
                "reward_command",
                "is empty; give the command line, e.g. \"python my_reward.py\"".into(),
            );
        }
        if !(self.reward_command_timeout.is_finite() && self.reward_command_timeout > 0.0) {
            return bad(
                "reward_command_timeout",
                format!(
                    "must be a positive number of seconds, got {}",
                    self.reward_command_timeout
                ),
            );
        }
        let out = self
            .reward_funcs
            .iter()
            .map(|f| self.rule(f, max_completion_length))
            .collect::<Result<Vec<_>>>()?;
        let names = self.names();
        if let Some(dup) = names
            .iter()
            .enumerate()
            .find_map(|(i, n)| names[..i].contains(n).then_some(n))
        {
            return bad(
                "reward_funcs",
                format!("two reward functions are named `{dup}`; their rewards/{dup}/* metrics would mix\nhint: list each once"),
            );
        }
        Ok(out)
    }

    /// The rule function `f` of `reward_funcs`, with its parameters checked.
    fn rule(&self, f: &str, max_completion_length: usize) -> Result<RewardFunc> {
        let bad = |k: &str, msg: String| Err(TrainError::setting(k, msg));
        Ok(match f {
            "regex_match" => {
                let Some(p) = &self.reward_regex else {
                    return bad(
                        "reward_regex",
                        "regex_match needs a pattern, e.g. --reward-regex '\\d+'".into(),
                    );
                };
                RewardFunc::RegexMatch(
                    Regex::new(p).map_err(|e| TrainError::setting("reward_regex", format!("`{p}`: {e}")))?,
                )
            }
            "length_target" => match self.reward_target_length {
                Some(target) if target > 0 => RewardFunc::LengthTarget { target },
                _ => {
                    return bad(
                        "reward_target_length",
                        "length_target needs a target of at least 1 token, e.g. --reward-target-length 64".into(),
                    )
                }
            },
            "exact_answer" => RewardFunc::ExactAnswer {
                column: self.reward_answer_column.clone(),
            },
            "distinct_words" => RewardFunc::DistinctWords,
            "think_format_reward" => RewardFunc::ThinkFormat,
            "get_soft_overlong_punishment" | "soft_overlong_punishment" => {
                if self.soft_punish_cache == 0 || self.soft_punish_cache > max_completion_length {
                    return bad(
                        "soft_punish_cache",
                        format!(
                            "({}) must be in 1..=max_completion_length ({max_completion_length}): the penalty \
                             ramps over the last soft_punish_cache tokens",
                            self.soft_punish_cache
                        ),
                    );
                }
                RewardFunc::SoftOverlongPunishment {
                    max_completion_len: max_completion_length,
                    soft_punish_cache: self.soft_punish_cache,
                }
            }
            "accuracy_reward" | "reasoning_accuracy_reward" => {
                return bad(
                    "reward_funcs",
                    format!(
                        "`{f}` needs Python's math_verify and is not built in\nhint: use `exact_answer` (normalised \
                         text or number match against the `solution` column), or a reward_command that runs math_verify"
                    ),
                )
            }
            other => {
                let near = crate::config::closest(other, BUILTIN_REWARDS.into_iter())
                    .map_or(String::new(), |k| format!("; did you mean `{k}`?"));
                return bad(
                    "reward_funcs",
                    format!(
                        "unknown reward function `{other}`{near}\nhint: the built-in ones are {}; run your own with \
                         reward_command",
                        BUILTIN_REWARDS.join(", ")
                    ),
                );
            }
        })
    }
}

/// The completions of one generation batch and what reward functions read about them.
/// Every field has one entry per completion `B`; a prompt's generations are consecutive.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardBatch {
    /// The prompt of each completion.
    pub prompts: Vec<String>,
    /// The completion texts (decoded with special tokens skipped, as TRL).
    pub completions: Vec<String>,
    /// The completion token ids, through the first EOS inclusive (TRL's `completion_ids`).
    pub completion_ids: Vec<Vec<u32>>,
    /// Every other dataset column by name, the row's value repeated per generation
    /// (`null` where a row lacks the column).
    pub columns: BTreeMap<String, Vec<Value>>,
    /// The prompt's conversation, for conversational rows (`None` for text prompts).
    pub conversations: Vec<Option<Vec<rlhf_models::Message>>>,
}

/// Keys of the command protocol that a dataset column may not take.
const PROTOCOL_KEYS: [&str; 3] = ["prompts", "completions", "completion_ids"];

impl RewardBatch {
    /// The batch of `rows` (the prompts of a generation batch, in order), each with
    /// `num_generations` consecutive completions.
    pub fn new(
        rows: &[&PromptRow],
        num_generations: usize,
        completions: Vec<String>,
        completion_ids: Vec<Vec<u32>>,
    ) -> Result<Self> {
        let b = rows.len() * num_generations;
        if completions.len() != b || completion_ids.len() != b {
            return Err(TrainError::Config(format!(
                "RewardBatch::new: {} prompts × {num_generations} generations = {b} completions, but got {} texts and {} id lists",
                rows.len(),
                completions.len(),
                completion_ids.len()
            )));
        }
        let repeat = |v: &Value| std::iter::repeat_n(v.clone(), num_generations);
        let mut columns: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for key in rows.iter().flat_map(|r| r.columns.keys()) {
            if columns.contains_key(key) {
                continue;
            }
            if PROTOCOL_KEYS.contains(&key.as_str()) {
                return Err(TrainError::Config(format!(
                    "the prompt data has a column `{key}`, a name reward functions receive the batch under\n\
                     hint: rename the column"
                )));
            }
            let col = rows
                .iter()
                .flat_map(|r| repeat(r.columns.get(key).unwrap_or(&Value::Null)))
                .collect();
            columns.insert(key.clone(), col);
        }
        Ok(Self {
            prompts: rows
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.prompt.clone(), num_generations))
                .collect(),
            conversations: rows
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.conversation.clone(), num_generations))
                .collect(),
            completions,
            completion_ids,
            columns,
        })
    }

    /// Number of completions `B`.
    pub fn len(&self) -> usize {
        self.completions.len()
    }

    /// Whether the batch holds no completion.
    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// The request line of the command protocol ([`command`]): one JSON object. As TRL calls
    /// a reward function, a conversational row's prompt is its message list and its
    /// completion `[{"role": "assistant", "content": ...}]`; a text row's are strings.
    pub fn request_json(&self) -> Result<String> {
        let err = |e: serde_json::Error| TrainError::Config(format!("reward request: {e}"));
        let mut prompts = Vec::with_capacity(self.len());
        let mut completions = Vec::with_capacity(self.len());
        for (i, (p, c)) in self.prompts.iter().zip(&self.completions).enumerate() {
            match self.conversations.get(i).and_then(Option::as_ref) {
                Some(msgs) => {
                    let list: Vec<&Map<String, Value>> = msgs.iter().map(|m| m.fields()).collect();
                    prompts.push(serde_json::to_value(list).map_err(err)?);
                    completions.push(serde_json::json!([{"role": "assistant", "content": c}]));
                }
                None => {
                    prompts.push(Value::String(p.clone()));
                    completions.push(Value::String(c.clone()));
                }
            }
        }
        let mut m = Map::new();
        m.insert("prompts".into(), Value::Array(prompts));
        m.insert("completions".into(), Value::Array(completions));
        m.insert(
            "completion_ids".into(),
            serde_json::to_value(&self.completion_ids).map_err(err)?,
        );
        for (k, v) in &self.columns {
            m.insert(k.clone(), Value::Array(v.clone()));
        }
        serde_json::to_string(&Value::Object(m)).map_err(err)
    }

    fn column_list(&self) -> String {
        if self.columns.is_empty() {
            return "none besides the prompt".into();
        }
        self.columns
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One reward function.
#[derive(Debug)]
pub enum RewardFunc {
    /// `regex_match`: 1.0 when the pattern matches the completion ([`rules::regex_match`]).
    RegexMatch(Regex),
    /// `length_target`: `−|n − target| / target` in tokens ([`rules::length_target`]).
    LengthTarget {
        /// Target completion length in tokens.
        target: usize,
    },
    /// `exact_answer`: 1.0 when the completion states the row's answer ([`rules::exact_answer`]).
    ExactAnswer {
        /// The reference column (`None`: `solution`, else `answer`).
        column: Option<String>,
    },
    /// `distinct_words`: distinct words / 10 ([`rules::distinct_words`]).
    DistinctWords,
    /// `think_format_reward` (TRL) ([`rules::think_format`]).
    ThinkFormat,
    /// `soft_overlong_punishment_reward` (TRL `get_soft_overlong_punishment`) ([`rules::soft_overlong`]).
    SoftOverlongPunishment {
        /// `L_max`.
        max_completion_len: usize,
        /// `L_cache`.
        soft_punish_cache: usize,
    },
    /// An external command ([`command`]).
    Command(RewardCommand),
    /// A reward model ([`model`]); boxed, as it is much larger than the other variants.
    Model(Box<RewardModel>),
}

impl RewardFunc {
    /// The name its metrics are logged under (`rewards/<name>/mean`).
    pub fn name(&self) -> String {
        match self {
            Self::RegexMatch(_) => "regex_match".into(),
            Self::LengthTarget { .. } => "length_target".into(),
            Self::ExactAnswer { .. } => "exact_answer".into(),
            Self::DistinctWords => "distinct_words".into(),
            Self::ThinkFormat => "think_format_reward".into(),
            Self::SoftOverlongPunishment { .. } => "soft_overlong_punishment_reward".into(),
            Self::Command(c) => c.name().to_string(),
            Self::Model(m) => m.name.clone(),
        }
    }

    /// One value per completion of `batch` (`None`: not applicable).
    pub fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Option<f64>>> {
        let name = self.name();
        let rule_err = |msg: String| TrainError::Reward {
            name: name.clone(),
            msg,
        };
        let out = match self {
            Self::RegexMatch(re) => rules::regex_match(re, batch).map_err(rule_err)?,
            Self::LengthTarget { target } => rules::length_target(*target, batch),
            Self::ExactAnswer { column } => rules::exact_answer(column.as_deref(), batch).map_err(rule_err)?,
            Self::DistinctWords => rules::distinct_words(batch),
            Self::ThinkFormat => rules::think_format(batch),
            Self::SoftOverlongPunishment {
                max_completion_len,
                soft_punish_cache,
            } => rules::soft_overlong(*max_completion_len, *soft_punish_cache, batch),
            Self::Command(c) => c.score(batch)?,
            Self::Model(m) => m.score(batch)?,
        };
        debug_assert_eq!(out.len(), batch.len());
        Ok(out)
    }
}

/// The reward functions of a run and their weights.
#[derive(Debug)]
pub struct RewardFuncs {
    /// The functions in scoring order.
    pub funcs: Vec<RewardFunc>,
    /// One weight per function (`reward_weights`; all 1.0 when not given).
    pub weights: Vec<f64>,
}

impl RewardFuncs {
    /// Builds the functions of `args` — loads the reward model (with `opts`), starts the
    /// command — with `weights` (`reward_weights`: one per function, or `None` for 1.0
    /// each). `max_completion_length` is `get_soft_overlong_punishment`'s `L_max`.
    pub fn from_args(
        args: &RewardArgs,
        weights: Option<&[f64]>,
        max_completion_length: usize,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let rules = args.rules(max_completion_length)?;
        let n = args.names().len();
        let weights = check_weights(weights, n)?;
        let mut funcs = Vec::with_capacity(n);
        if let Some(path) = &args.reward_model_name_or_path {
            funcs.push(RewardFunc::Model(Box::new(RewardModel::load(path, opts)?)));
        }
        funcs.extend(rules);
        if let Some(cmd) = &args.reward_command {
            let timeout = Duration::from_secs_f64(args.reward_command_timeout);
            funcs.push(RewardFunc::Command(RewardCommand::spawn(cmd, timeout)?));
        }
        Ok(Self { funcs, weights })
    }

    /// The functions' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.funcs.iter().map(RewardFunc::name).collect()
    }

    /// Scores a batch with every function: `rewards[f][i]` for function `f`, completion `i`
    /// (`None`: not applicable). [`rewards_per_completion`] turns it into the `B × K` table
    /// with NaN that `rlhf_ops::rl` takes.
    pub fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Vec<Option<f64>>>> {
        self.funcs.iter_mut().map(|f| f.score(batch)).collect()
    }
}

/// `reward_weights` checked against the number of functions: one finite weight each, or
/// 1.0 each when not given.
pub fn check_weights(weights: Option<&[f64]>, n: usize) -> Result<Vec<f64>> {
    match weights {
        None => Ok(vec![1.0; n]),
        Some(w) if w.len() != n => Err(TrainError::setting(
            "reward_weights",
            format!(
                "has {} weight(s) for {n} reward function(s); give one weight per function, in the order: \
                 reward model, reward_funcs, reward_command",
                w.len()
            ),
        )),
        Some(w) if w.iter().any(|x| !x.is_finite()) => Err(TrainError::setting(
            "reward_weights",
            format!("{w:?}: every weight must be a finite number"),
        )),
        Some(w) => Ok(w.to_vec()),
    }
}

/// Function × completion rewards as the `B × K` table (completion × function) of
/// `rlhf_ops::rl::rewards`, `None` as NaN.
pub fn rewards_per_completion(per_func: &[Vec<Option<f64>>]) -> Vec<Vec<f64>> {
    let b = per_func.first().map_or(0, Vec::len);
    (0..b)
        .map(|i| per_func.iter().map(|f| f[i].unwrap_or(f64::NAN)).collect())
        .collect()
}

#[cfg(test)]
mod tests;
