//! The built-in rule rewards: cheap functions of the completion text, its token ids and the
//! row's columns. Each returns one value per completion (`None`: not applicable).

use fancy_regex::Regex;
use serde_json::Value;

use super::RewardBatch;

/// `regex_match`: 1.0 when `re` matches anywhere in the completion, else 0.0 (Python's
/// `re.search`; anchor with `^` / `$`, set flags inline, e.g. `(?s)`). Errors carry the
/// regex engine's message (a pattern that backtracks too much on some completion).
pub fn regex_match(re: &Regex, batch: &RewardBatch) -> Result<Vec<Option<f64>>, String> {
    batch
        .completions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            re.is_match(c)
                .map(|m| Some(f64::from(u8::from(m))))
                .map_err(|e| format!("pattern `{}` failed on completion {i}: {e}", re.as_str()))
        })
        .collect()
}

/// `length_target`: `−|n − target| / target`, `n` the completion's token count as the
/// trainer passes it (TRL's `completion_ids`: through the first EOS, inclusive). 0 at the
/// target, −1 for an empty completion, falling linearly with the distance.
pub fn length_target(target: usize, batch: &RewardBatch) -> Vec<Option<f64>> {
    let t = target as f64;
    batch
        .completion_ids
        .iter()
        .map(|ids| Some(-(ids.len() as f64 - t).abs() / t))
        .collect()
}

/// `distinct_words`: the number of distinct whitespace-separated words divided by 10
/// (Python `len(set(completion.split())) / 10`; case and punctuation count), the rule of
/// the `grpo-small` benchmark workload.
pub fn distinct_words(batch: &RewardBatch) -> Vec<Option<f64>> {
    batch
        .completions
        .iter()
        .map(|c| {
            let words: std::collections::HashSet<&str> = c.split_whitespace().collect();
            Some(words.len() as f64 / 10.0)
        })
        .collect()
}

/// `think_format_reward` (TRL `trl.rewards.think_format_reward`): 1.0 when the completion
/// starts with `<think>`, has no second `<think>` and closes with `</think>` somewhere
/// after it, else 0.0. This is what TRL's `re.match(r"^<think>(?!.*<think>)(.*?)</think>.*$",
/// text, re.DOTALL | re.MULTILINE)` accepts. TRL reads the text of a conversational
/// completion's first message; here the completion text.
pub fn think_format(batch: &RewardBatch) -> Vec<Option<f64>> {
    batch
        .completions
        .iter()
        .map(|c| {
            let ok = c
                .strip_prefix("<think>")
                .is_some_and(|rest| !rest.contains("<think>") && rest.contains("</think>"));
            Some(f64::from(u8::from(ok)))
        })
        .collect()
}

/// `soft_overlong_punishment_reward` (TRL `get_soft_overlong_punishment`, DAPO eq. 13,
/// Yu et al. 2025): with `n` the completion's token count, `L = max_completion_len`,
/// `C = soft_punish_cache`: 0 when `n ≤ L − C`, `(L − C − n) / C` when `L − C < n ≤ L`,
/// −1 beyond `L`.
pub fn soft_overlong(max_completion_len: usize, soft_punish_cache: usize, batch: &RewardBatch) -> Vec<Option<f64>> {
    let (l, c) = (max_completion_len as f64, soft_punish_cache as f64);
    batch
        .completion_ids
        .iter()
        .map(|ids| {
            let n = ids.len() as f64;
            Some(if n <= l - c {
                0.0
            } else if n <= l {
                (l - c - n) / c
            } else {
                -1.0
            })
        })
        .collect()
}

/// The columns `exact_answer` looks in when `reward_answer_column` is not set, in order.
pub const ANSWER_COLUMNS: [&str; 2] = ["solution", "answer"];

/// `exact_answer`: 1.0 when the completion states the row's reference answer, else 0.0;
/// `None` (not applicable) where the reference is missing or empty.
///
/// Both sides go through [`stated_answer`] (the last `\boxed{...}`, else the text after the
/// last `####`, else everything) and [`normalise_answer`]; they match when the normalised
/// texts are equal or both read as numbers that are equal (`|a − b| ≤ 1e-9·max(1, |a|, |b|)`,
/// so `"42"` matches `"42.0"`). The reference column is `column`, else `solution`, else
/// `answer`. A number in the column counts as its text.
pub fn exact_answer(column: Option<&str>, batch: &RewardBatch) -> Result<Vec<Option<f64>>, String> {
    let col = match column {
        Some(c) => c,
        None => ANSWER_COLUMNS
            .into_iter()
            .find(|c| batch.columns.contains_key(*c))
            .ok_or_else(|| {
                format!(
                    "the rows have no `solution` or `answer` column (columns: {})\nhint: set \
                     reward_answer_column to the column holding the reference answer",
                    batch.column_list()
                )
            })?,
    };
    let gold = batch.columns.get(col).ok_or_else(|| {
        format!(
            "the rows have no column `{col}` (columns: {})\nhint: set reward_answer_column to one of them",
            batch.column_list()
        )
    })?;
    Ok(gold
        .iter()
        .zip(&batch.completions)
        .map(|(g, c)| {
            let g = match g {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            let g = normalise_answer(stated_answer(&g));
            (!g.is_empty()).then(|| f64::from(u8::from(same_answer(&g, &normalise_answer(stated_answer(c))))))
        })
        .collect())
}

/// The answer a text states: the content of its last `\boxed{...}` (braces balanced), else
/// the text after its last `####` (GSM8K's solutions), else the whole text.
pub fn stated_answer(text: &str) -> &str {
    if let Some(start) = text.rfind("\\boxed{") {
        let body = &text[start + "\\boxed{".len()..];
        let mut depth = 1usize;
        for (i, ch) in body.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return &body[..i];
                    }
                }
                _ => {}
            }
        }
    }
    match text.rfind("####") {
        Some(i) => &text[i + 4..],
        None => text,
    }
}

/// Normalises an answer for comparison: trims, drops surrounding `$` and trailing `.`,
/// lower-cases, collapses whitespace runs to one space, and removes `,` between digits
/// (`1,000` → `1000`).
pub fn normalise_answer(s: &str) -> String {
    let mut s = s;
    loop {
        let t = s.trim().trim_matches('$');
        let t = t.strip_suffix('.').unwrap_or(t);
        if t == s {
            break;
        }
        s = t;
    }
    let words: Vec<&str> = s.split_whitespace().collect();
    let s = words.join(" ").to_lowercase();
    let chars: Vec<char> = s.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| {
            !(c == ',' && i > 0 && chars[i - 1].is_ascii_digit() && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        })
        .map(|(_, &c)| c)
        .collect()
}

fn same_answer(gold: &str, stated: &str) -> bool {
    if gold == stated {
        return true;
    }
    match (gold.parse::<f64>(), stated.parse::<f64>()) {
        (Ok(a), Ok(b)) if a.is_finite() && b.is_finite() => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn batch(completions: &[&str], ids: &[usize]) -> RewardBatch {
        RewardBatch {
            prompts: vec!["p".into(); completions.len()],
            completions: completions.iter().map(|s| s.to_string()).collect(),
            completion_ids: ids.iter().map(|&n| vec![7; n]).collect(),
            columns: Default::default(),
            conversations: Vec::new(),
        }
    }

    #[test]
    fn regex_match_searches_anywhere_and_supports_lookarounds() {
        let b = batch(&["The answer is 42.", "no number", "<a><a>"], &[1, 1, 1]);
        let re = Regex::new(r"\d+").unwrap();
        assert_eq!(regex_match(&re, &b).unwrap(), [Some(1.0), Some(0.0), Some(0.0)]);
        let re = Regex::new(r"^<a>(?!.*<a>)").unwrap();
        assert_eq!(regex_match(&re, &b).unwrap(), [Some(0.0), Some(0.0), Some(0.0)]);
        let re = Regex::new(r"(?s)^no.*r$").unwrap();
        assert_eq!(regex_match(&re, &b).unwrap()[1], Some(1.0));
    }

    #[test]
    fn length_target_is_minus_the_relative_distance_in_tokens() {
        let b = batch(&["", "", "", ""], &[10, 5, 0, 25]);
        assert_eq!(length_target(10, &b), [Some(0.0), Some(-0.5), Some(-1.0), Some(-1.5)]);
    }

    #[test]
    fn distinct_words_counts_whitespace_words_once_per_spelling() {
        let b = batch(&["a b a  c\nb", "", "A a a."], &[1, 1, 1]);
        assert_eq!(distinct_words(&b), [Some(0.3), Some(0.0), Some(0.3)]);
    }

    #[test]
    fn think_format_matches_trls_examples() {
        // trl.rewards.think_format_reward's docstring: [1.0, 0.0].
        let b = batch(
            &[
                "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
                "<think>\nThis is my reasoning.\nThis is my answer.",
                "<think>a</think><think>b</think>",
                " <think>a</think>",
                "<think></think>",
            ],
            &[1; 5],
        );
        assert_eq!(
            think_format(&b),
            [Some(1.0), Some(0.0), Some(0.0), Some(0.0), Some(1.0)]
        );
    }

    #[test]
    fn soft_overlong_matches_trls_example_and_its_ends() {
        // trl.rewards.get_soft_overlong_punishment(100, 20) on 90 tokens: -0.5.
        let b = batch(&["", "", "", ""], &[90, 80, 100, 101]);
        assert_eq!(
            soft_overlong(100, 20, &b),
            [Some(-0.5), Some(0.0), Some(-1.0), Some(-1.0)]
        );
    }

    #[test]
    fn answers_are_read_from_boxes_and_gsm8k_marks_then_normalised() {
        assert_eq!(stated_answer(r"so \boxed{\frac{1}{2}} or \boxed{3}"), "3");
        assert_eq!(stated_answer(r"\boxed{\frac{1}{2}}"), r"\frac{1}{2}");
        assert_eq!(stated_answer("Natalia sold 48/2 = 24 clips.\n#### 72"), " 72");
        assert_eq!(stated_answer(r"\boxed{open"), r"\boxed{open");
        assert_eq!(normalise_answer("  $1,000$. "), "1000");
        assert_eq!(normalise_answer("New   York\n"), "new york");
        assert_eq!(normalise_answer("a, b"), "a, b");
    }

    #[test]
    fn exact_answer_compares_with_the_solution_column() {
        let mut b = batch(&["#### 72", r"It is \boxed{72.0}", "72 apples", "#### 5", "x"], &[1; 5]);
        b.columns.insert(
            "solution".into(),
            vec![json!("... #### 72"), json!(72), json!("72"), json!(""), json!(null)],
        );
        assert_eq!(
            exact_answer(None, &b).unwrap(),
            [Some(1.0), Some(1.0), Some(0.0), None, None]
        );
        let err = exact_answer(Some("gold"), &b).unwrap_err();
        assert!(err.contains("no column `gold`") && err.contains("`solution`"), "{err}");
        b.columns.clear();
        let err = exact_answer(None, &b).unwrap_err();
        assert!(err.contains("reward_answer_column"), "{err}");
    }
}
