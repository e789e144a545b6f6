//! Generated data for `rlhf quickstart`: a small assistant world where a rule decides which
//! answers are good, so SFT → reward model → PPO can run, and be checked, with no download.
//!
//! The world has 40 everyday topics, each with keywords and three concrete tips. A prompt is
//! `"User: <question about a topic>\nAssistant:"` from one of 10 question templates; a
//! response starts with a space. A good response is polite, on topic and gives one of the
//! topic's tips. A bad one is one of four [`Kind`]s: rude, negative, unhelpful (polite but no
//! tip: a vague on-topic line or a bare pleasantry), or off topic (a polite, helpful answer
//! about another topic).
//!
//! Splits: train rows (SFT rows, train pairs, train prompts) use the first 8 question
//! templates; eval rows (eval pairs, eval prompts) use the 2 held-out templates, so no eval
//! prompt string occurs in any train row. Topics and response templates are shared, so eval
//! measures whether the rule generalises to unseen question wording. Each list is drawn
//! from its own seeded stream, so it depends only on `seed` and its own count.
//!
//! [`judge`] is the rule written against the text; it is for scoring policies and is never
//! shown to the reward model. [`train_tokenizer`] builds a byte-level BPE for a tiny model.

mod bpe;
pub mod chat;
mod judge;
mod world;

use std::path::{Path, PathBuf};

use rlhf_ops::rng::RngStream;
use serde_json::json;

use crate::error::{Result, TrainError};
use world::{fill, Topic, TOPICS};

pub use bpe::{train_tokenizer, train_tokenizer_with, DEFAULT_VOCAB_SIZE, EOS_TOKEN};
pub use judge::{judge, prompt_topic, Judgement};

/// Sizes and seed of a generated data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthConfig {
    /// Seed of every stream; the same seed gives the same rows.
    pub seed: u64,
    /// SFT rows (half good answers, half bad ones).
    pub n_sft: usize,
    /// Preference pairs in the train split.
    pub n_pairs_train: usize,
    /// Preference pairs in the eval split (held-out question templates).
    pub n_pairs_eval: usize,
    /// PPO prompts per split.
    pub n_prompts: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            n_sft: 2000,
            n_pairs_train: 2000,
            n_pairs_eval: 200,
            n_prompts: 512,
        }
    }
}

impl SynthConfig {
    /// Fails when a count is zero (its data file would be empty).
    pub fn validate(&self) -> Result<()> {
        let counts = [
            ("n_sft", self.n_sft),
            ("n_pairs_train", self.n_pairs_train),
            ("n_pairs_eval", self.n_pairs_eval),
            ("n_prompts", self.n_prompts),
        ];
        match counts.iter().find(|(_, n)| *n == 0) {
            Some((name, _)) => Err(TrainError::Config(format!(
                "synth: {name} is 0; hint: ask for at least one row"
            ))),
            None => Ok(()),
        }
    }
}

/// Which question templates a row may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The first 8 templates (SFT rows, reward training, PPO prompts).
    Train,
    /// The 2 held-out templates.
    Eval,
}

/// Why a rejected response is bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Insults the user (sometimes while still giving a tip).
    Rude,
    /// Discourages the user (sometimes while still giving a tip).
    Negative,
    /// Polite, but gives no tip: a vague on-topic line, or (one in four) a bare pleasantry.
    Unhelpful,
    /// A polite, helpful answer about another topic.
    OffTopic,
}

impl Kind {
    /// Every kind, in the order the generator draws them.
    pub const ALL: [Kind; 4] = [Kind::Rude, Kind::Negative, Kind::Unhelpful, Kind::OffTopic];

    /// The `kind` column value (`rude`, `negative`, `unhelpful`, `off_topic`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rude => "rude",
            Kind::Negative => "negative",
            Kind::Unhelpful => "unhelpful",
            Kind::OffTopic => "off_topic",
        }
    }
}

/// One preference pair: a good and a bad response to the same prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// `"User: ...\nAssistant:"`.
    pub prompt: String,
    /// A good response (starts with a space).
    pub chosen: String,
    /// A bad response (starts with a space).
    pub rejected: String,
    /// Why `rejected` is bad.
    pub kind: Kind,
}

/// The names of the 40 topics, in table order.
pub fn topic_names() -> Vec<&'static str> {
    TOPICS.iter().map(|t| t.name).collect()
}

/// `n_sft` train-split (prompt, completion) rows: half good completions, half bad ones
/// (kinds drawn uniformly), so an SFT policy learns to produce both.
pub fn sft_rows(cfg: &SynthConfig) -> Vec<(String, String)> {
    let mut rng = stream(cfg.seed, 1);
    (0..cfg.n_sft)
        .map(|_| {
            let (prompt, t) = prompt(&mut rng, Split::Train);
            let completion = if rng.below(2) == 0 {
                good(&mut rng, t)
            } else {
                let kind = Kind::ALL[rng.below(Kind::ALL.len())];
                bad(&mut rng, t, kind)
            };
            (prompt, completion)
        })
        .collect()
}

/// Preference pairs of `split` (`n_pairs_train` or `n_pairs_eval` of them); the kinds of
/// the rejected responses are drawn uniformly.
pub fn preference_pairs(cfg: &SynthConfig, split: Split) -> Vec<Pair> {
    let (mut rng, n) = match split {
        Split::Train => (stream(cfg.seed, 2), cfg.n_pairs_train),
        Split::Eval => (stream(cfg.seed, 3), cfg.n_pairs_eval),
    };
    (0..n)
        .map(|_| {
            let (prompt, t) = prompt(&mut rng, split);
            let kind = Kind::ALL[rng.below(Kind::ALL.len())];
            let chosen = good(&mut rng, t);
            let rejected = bad(&mut rng, t, kind);
            Pair {
                prompt,
                chosen,
                rejected,
                kind,
            }
        })
        .collect()
}

/// `n_prompts` PPO queries of `split`.
pub fn prompts(cfg: &SynthConfig, split: Split) -> Vec<String> {
    let mut rng = match split {
        Split::Train => stream(cfg.seed, 4),
        Split::Eval => stream(cfg.seed, 5),
    };
    (0..cfg.n_prompts).map(|_| prompt(&mut rng, split).0).collect()
}

/// Every text the quickstart will tokenize: SFT rows and pairs as prompt + response, and
/// the prompts of both splits. The tokenizer is trained on this.
pub fn corpus(cfg: &SynthConfig) -> Vec<String> {
    let mut texts: Vec<String> = sft_rows(cfg).into_iter().map(|(p, c)| p + &c).collect();
    for split in [Split::Train, Split::Eval] {
        for pair in preference_pairs(cfg, split) {
            texts.push(format!("{}{}", pair.prompt, pair.chosen));
            texts.push(format!("{}{}", pair.prompt, pair.rejected));
        }
        texts.extend(prompts(cfg, split));
    }
    texts
}

/// A byte-level BPE `tokenizer.json` of `vocab_size` tokens trained on [`corpus`].
pub fn tokenizer_json(cfg: &SynthConfig, vocab_size: usize) -> Result<String> {
    train_tokenizer(&corpus(cfg), vocab_size)
}

/// The directories [`write_all`] fills; each can be passed as a `dataset_name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthFiles {
    /// `sft/train.jsonl`: `prompt`, `completion`.
    pub sft: PathBuf,
    /// `prefs/train.jsonl`, `prefs/validation.jsonl`: `prompt`, `chosen`, `rejected`, `kind`.
    pub prefs: PathBuf,
    /// `prompts/train.jsonl`, `prompts/validation.jsonl`: `query`.
    pub prompts: PathBuf,
}

/// How the rows of a data set are written: plain text ([`write_all`]) or conversations
/// ([`chat::write_all`]).
pub(crate) struct RowFormat {
    /// An SFT row of a prompt and its completion.
    pub sft: fn(&str, &str) -> serde_json::Value,
    /// A preference pair.
    pub pair: fn(&Pair) -> serde_json::Value,
    /// A prompt row.
    pub prompt: fn(&str) -> serde_json::Value,
}

/// The text rows: `prompt`/`completion`, `prompt`/`chosen`/`rejected`/`kind`, `query`.
const TEXT_ROWS: RowFormat = RowFormat {
    sft: |p, c| json!({"prompt": p, "completion": c}),
    pair: |p| json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "kind": p.kind.as_str()}),
    prompt: |q| json!({"query": q}),
};

/// Writes the SFT rows, both pair splits and both prompt splits as JSON Lines under `dir`.
pub fn write_all(cfg: &SynthConfig, dir: &Path) -> Result<SynthFiles> {
    write_rows(cfg, dir, &TEXT_ROWS)
}

/// Writes every list of the data set under `dir` in `format`.
pub(crate) fn write_rows(cfg: &SynthConfig, dir: &Path, format: &RowFormat) -> Result<SynthFiles> {
    cfg.validate()?;
    let files = SynthFiles {
        sft: dir.join("sft"),
        prefs: dir.join("prefs"),
        prompts: dir.join("prompts"),
    };
    let sft = sft_rows(cfg).into_iter().map(|(p, c)| (format.sft)(&p, &c));
    write_jsonl(&files.sft.join("train.jsonl"), sft)?;
    for (split, name) in [(Split::Train, "train.jsonl"), (Split::Eval, "validation.jsonl")] {
        let pairs = preference_pairs(cfg, split).into_iter().map(|p| (format.pair)(&p));
        write_jsonl(&files.prefs.join(name), pairs)?;
        let rows = prompts(cfg, split).into_iter().map(|q| (format.prompt)(&q));
        write_jsonl(&files.prompts.join(name), rows)?;
    }
    Ok(files)
}

/// Writes one JSON object per line to `path`, creating its directory.
pub fn write_jsonl(path: &Path, rows: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut text = String::new();
    for row in rows {
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(io)
}

/// An independent stream per list, so that each list depends only on `seed` and its count.
fn stream(seed: u64, list: u64) -> RngStream {
    RngStream::new(seed ^ list.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn pick<'a>(rng: &mut RngStream, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len())]
}

/// A prompt of `split` and the index of its topic.
fn prompt(rng: &mut RngStream, split: Split) -> (String, usize) {
    let t = rng.below(TOPICS.len());
    let n_train = world::N_TRAIN_PROMPT_TEMPLATES;
    let template = match split {
        Split::Train => world::PROMPTS[rng.below(n_train)],
        Split::Eval => world::PROMPTS[n_train + rng.below(world::PROMPTS.len() - n_train)],
    };
    (
        format!("User: {}\nAssistant:", fill(template, TOPICS[t].name, "", "")),
        t,
    )
}

/// One of `topic`'s tips, introduced by a tip template.
fn tip_line(rng: &mut RngStream, topic: &Topic) -> String {
    let tip = pick(rng, &topic.tips);
    fill(pick(rng, &world::TIP_INTROS), topic.name, "", tip)
}

/// `middle` between a polite opener, a polite closer, or both.
fn politely(rng: &mut RngStream, middle: Vec<String>) -> String {
    let style = rng.below(3); // 0: opener, 1: closer, 2: both
    let mut parts = Vec::with_capacity(middle.len() + 2);
    if style != 1 {
        parts.push(pick(rng, &world::OPENERS).to_string());
    }
    parts.extend(middle);
    if style != 0 {
        parts.push(pick(rng, &world::CLOSERS).to_string());
    }
    format!(" {}", parts.join(" "))
}

/// A good response: polite, on topic, one concrete tip.
fn good(rng: &mut RngStream, t: usize) -> String {
    let topic = &TOPICS[t];
    let mut middle = Vec::new();
    if rng.below(2) == 0 {
        middle.push(fill(pick(rng, &world::TOPIC_LINES), topic.name, "", ""));
    }
    middle.push(tip_line(rng, topic));
    politely(rng, middle)
}

/// A bad response of `kind` to a prompt about topic `t`.
fn bad(rng: &mut RngStream, t: usize, kind: Kind) -> String {
    let topic = &TOPICS[t];
    match kind {
        Kind::Rude | Kind::Negative => {
            let templates: &[&str] = if kind == Kind::Rude {
                &world::RUDE
            } else {
                &world::NEGATIVE
            };
            let template = pick(rng, templates);
            format!(" {}", fill(template, topic.name, "", pick(rng, &topic.tips)))
        }
        Kind::Unhelpful => {
            let line = rng.below(world::VAGUE_LINES.len());
            let mut middle = vec![fill(world::VAGUE_LINES[line], topic.name, "", "")];
            if rng.below(2) == 0 {
                middle.push(pick(rng, &world::FILLERS).to_string());
            }
            // One in four is a bare pleasantry ("Sure! Good luck!"): a reward model that never
            // saw one rates it by its politeness alone, and a policy learns to say nothing
            // else. Decided from draws already made, so every other row stays the same.
            if middle.len() == 1 && line < world::VAGUE_LINES.len() / 2 {
                middle.clear();
            }
            politely(rng, middle)
        }
        Kind::OffTopic => {
            // Any topic but `t`.
            let o = (t + 1 + rng.below(TOPICS.len() - 1)) % TOPICS.len();
            if rng.below(2) == 0 {
                return good(rng, o);
            }
            let detour = fill(pick(rng, &world::DETOURS), topic.name, TOPICS[o].name, "");
            let tip = tip_line(rng, &TOPICS[o]);
            politely(rng, vec![detour, tip])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::world::{capitalize, lexicon, templates, words};
    use super::*;

    /// Whether the words of `phrase` occur consecutively in `text`.
    fn has(text: &str, phrase: &str) -> bool {
        let (w, p) = (words(text), words(phrase));
        w.windows(p.len()).any(|x| x == p.as_slice())
    }

    fn markers(t: &Topic) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(t.name).chain(t.keywords.iter().copied())
    }

    #[test]
    fn no_keyword_belongs_to_two_topics() {
        for (i, a) in TOPICS.iter().enumerate() {
            for b in &TOPICS[i + 1..] {
                for k in markers(a) {
                    assert!(
                        !markers(b).any(|m| has(m, k) || has(k, m)),
                        "{k:?} is shared by {} and {}",
                        a.name,
                        b.name
                    );
                }
            }
        }
    }

    #[test]
    fn every_tip_names_its_own_topic_and_no_other() {
        for (i, t) in TOPICS.iter().enumerate() {
            for tip in t.tips {
                assert!(markers(t).any(|k| has(tip, k)), "{tip:?} does not name {}", t.name);
                for (j, o) in TOPICS.iter().enumerate() {
                    assert!(i == j || !markers(o).any(|k| has(tip, k)), "{tip:?} names {}", o.name);
                }
            }
        }
    }

    #[test]
    fn no_template_mentions_a_topic() {
        for s in templates() {
            for t in &TOPICS {
                assert!(!markers(t).any(|k| has(s, k)), "{s:?} mentions {}", t.name);
            }
        }
    }

    #[test]
    fn the_lexicon_holds_every_generated_word() {
        assert!(lexicon().contains("flour") && lexicon().contains("gladly"));
        assert_eq!(capitalize("tea"), "Tea");
    }
}
