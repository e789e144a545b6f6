//! The rule that defines a good answer in the synthetic world, written against the text.
//!
//! A response is good when it is fluent, polite, helpful, on topic and neither rude nor
//! negative. The judge reads only the prompt and the response: it finds the asked topic in
//! the prompt, then looks for marker phrases (its own politeness and rudeness lexicons), the
//! topic's keywords and tips, and the keywords of every other topic. It is meant to score
//! policies (win rates, PPO sanity checks); the reward model never sees it.

use std::collections::HashSet;

use super::world::{lexicon, words, TOPICS};

/// Phrases that make a response polite.
const POLITE: [&str; 13] = [
    "sure",
    "of course",
    "happy to help",
    "great question",
    "good question",
    "thanks for asking",
    "gladly",
    "glad you asked",
    "enjoy",
    "have fun",
    "good luck",
    "hope this helps",
    "hope that helps",
];

/// Phrases that make a response rude (first block) or negative (second block).
const RUDE_OR_NEGATIVE: [&str; 28] = [
    "ugh",
    "silly question",
    "dumb",
    "figure it out yourself",
    "whatever",
    "go away",
    "better things to do",
    "nobody cares",
    "stop wasting my time",
    "leave me alone",
    "look it up yourself",
    "not your servant",
    "stop bothering me",
    "even a child",
    "do not ask me again",
    "pointless",
    "would not bother",
    "hate",
    "nothing good",
    "never works",
    "give up",
    "boring",
    "quit",
    "not worth",
    "waste of time",
    "fail",
    "hopeless",
    "stupid",
];

/// Longest response, in words, that still counts as fluent (generated ones stay under 45).
const MAX_WORDS: usize = 60;

/// The judge's verdict on one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// Fluent, polite, helpful, on topic, and neither rude nor negative.
    pub good: bool,
    /// Well-formed text: known words only, ends a sentence, no repeated word or sentence,
    /// no stray characters (a newline, a second `User:` turn, special tokens).
    pub fluent: bool,
    /// Contains a polite phrase ("Happy to help!", "Good luck!").
    pub polite: bool,
    /// Gives one of the asked topic's concrete tips.
    pub helpful: bool,
    /// Mentions the asked topic and no other topic.
    pub on_topic: bool,
    /// Contains a rude or negative phrase ("figure it out yourself", "pointless").
    pub rude_or_negative: bool,
    /// Talks about another topic than the one asked about.
    pub off_topic: bool,
}

/// Judges `response` as an answer to `prompt` (`"User: ...\nAssistant:"` or a bare question).
/// A trailing `<|endoftext|>` and trailing whitespace are ignored.
pub fn judge(prompt: &str, response: &str) -> Judgement {
    let text = response.trim_end();
    let text = text.strip_suffix("<|endoftext|>").unwrap_or(text).trim_end();
    let w = words(text);
    let polite = POLITE.iter().any(|p| contains(&w, p));
    let rude_or_negative = RUDE_OR_NEGATIVE.iter().any(|p| contains(&w, p));
    let (on_topic, helpful, off_topic) = match topic_index(prompt) {
        Some(i) => {
            let own = mentions(&w, i) > 0;
            let others = (0..TOPICS.len()).any(|j| j != i && mentions(&w, j) > 0);
            (own && !others, TOPICS[i].tips.iter().any(|t| contains(&w, t)), others)
        }
        None => (false, false, false),
    };
    let fluent = is_fluent(text, &w);
    Judgement {
        good: fluent && polite && helpful && on_topic && !rude_or_negative,
        fluent,
        polite,
        helpful,
        on_topic,
        rude_or_negative,
        off_topic,
    }
}

/// The topic a prompt asks about: the one whose name or keywords it mentions most (the
/// first in table order on a tie), or `None` when it mentions none.
pub fn prompt_topic(prompt: &str) -> Option<&'static str> {
    topic_index(prompt).map(|i| TOPICS[i].name)
}

fn topic_index(prompt: &str) -> Option<usize> {
    // Only the user's words count: a prompt may end with "Assistant:" or hold earlier turns.
    let user = prompt.rsplit("User:").next().unwrap_or(prompt);
    let user = user.split("Assistant:").next().unwrap_or(user);
    let w = words(user);
    let mut best: Option<(usize, usize)> = None;
    for i in 0..TOPICS.len() {
        let n = mentions(&w, i);
        if n > 0 && best.is_none_or(|(_, m)| n > m) {
            best = Some((i, n));
        }
    }
    best.map(|(i, _)| i)
}

/// How many of topic `i`'s name and keywords occur in `w`.
fn mentions(w: &[String], i: usize) -> usize {
    let t = &TOPICS[i];
    std::iter::once(t.name)
        .chain(t.keywords.iter().copied())
        .filter(|k| contains(w, k))
        .count()
}

/// Whether the words of `phrase` occur consecutively in `w`.
fn contains(w: &[String], phrase: &str) -> bool {
    let p = words(phrase);
    !p.is_empty() && w.windows(p.len()).any(|win| win == p.as_slice())
}

fn is_fluent(text: &str, w: &[String]) -> bool {
    let body = text.trim_start();
    let chars_ok = body.chars().all(|c| c.is_ascii_alphanumeric() || " .,!?'".contains(c));
    let punct = |c: char| ".,!?".contains(c);
    let spacing_ok = !body.contains("  ")
        && !body.as_bytes().windows(2).any(|p| {
            let (a, b) = (p[0] as char, p[1] as char);
            (a == ' ' && punct(b)) || (punct(a) && punct(b))
        });
    let mut sentences = HashSet::new();
    let sentences_distinct = body
        .split(['.', '!', '?'])
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .all(|s| sentences.insert(s));
    let lex = lexicon();
    chars_ok
        && spacing_ok
        && sentences_distinct
        && (3..=MAX_WORDS).contains(&w.len())
        && body.ends_with(['.', '!', '?'])
        && !w.windows(2).any(|p| p[0] == p[1])
        && w.iter().all(|x| lex.contains(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT: &str = "User: Any tips for bread baking?\nAssistant:";

    #[test]
    fn a_polite_on_topic_tip_is_good() {
        let j = judge(
            PROMPT,
            " Sure! Try to weigh your flour instead of using cups. Good luck!",
        );
        assert!(j.good, "{j:?}");
    }

    #[test]
    fn a_tip_for_another_topic_is_off_topic() {
        let j = judge(PROMPT, " Sure! Try to keep your hook sharp. Good luck!");
        assert!(j.polite && !j.on_topic && !j.helpful && !j.good, "{j:?}");
    }

    #[test]
    fn the_prompt_topic_is_found_from_name_or_keywords() {
        assert_eq!(prompt_topic(PROMPT), Some("bread baking"));
        assert_eq!(prompt_topic("User: my dough is flat\nAssistant:"), Some("bread baking"));
        assert_eq!(prompt_topic("User: hello\nAssistant:"), None);
    }

    #[test]
    fn a_cut_off_or_repeated_answer_is_not_fluent() {
        assert!(!judge(PROMPT, " Sure! Try to weigh your flour instead of using cups").fluent);
        let twice =
            " Sure! Try to weigh your flour instead of using cups. Try to weigh your flour instead of using cups.";
        assert!(!judge(PROMPT, twice).fluent);
        assert!(!judge(PROMPT, " Sure! Try to weigh weigh your flour instead of using cups.").fluent);
    }
}
