//! Prompt-only data of the online trainers (GRPO, RLOO): TRL 1.x's `prompt` column, or
//! `query` as in the PPO prompt files, with every other column kept per row so that the
//! reward functions receive them (TRL passes each other column to a reward function under
//! its own name, one value per completion).
//!
//! A prompt is plain text or a conversation (a list of `{"role", "content"}` messages, TRL's
//! conversational format). A conversation is kept in [`PromptRow::conversation`] for the
//! trainer to render with the model's chat template (and reward models with theirs); its
//! [`PromptRow::prompt`] is the text of its last message, for rule rewards and reports.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{read_data, Row, Rows};
use crate::error::{Result, TrainError};

/// One prompt and the row's other columns.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptRow {
    /// The prompt text.
    pub prompt: String,
    /// Every other column of the row (`solution`, `answer`, ...), by name.
    pub columns: Row,
    /// The conversation, when the prompt is one (`None` for a text prompt).
    pub conversation: Option<Vec<rlhf_models::Message>>,
}

/// The prompts of a data file.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSet {
    /// The file, for messages.
    pub path: PathBuf,
    /// The column the prompts came from: `prompt` or `query`.
    pub prompt_column: String,
    /// The rows in file order.
    pub rows: Vec<PromptRow>,
}

/// The column names that hold prompts, in order of preference (TRL 1.x's `prompt`, then
/// the PPO prompt files' `query`).
pub const PROMPT_COLUMNS: [&str; 2] = ["prompt", "query"];

/// Reads the prompts of a data file (JSONL, CSV, TSV or Parquet; see [`read_data`]).
pub fn read_prompt_rows(path: &Path) -> Result<PromptSet> {
    prompt_rows(read_data(path)?)
}

/// The prompts of rows already read: the `prompt` column if the first row has one, else
/// `query`. Every row must then hold non-empty text there; the row's other columns are kept.
pub fn prompt_rows(rows: Rows) -> Result<PromptSet> {
    let first = rows.rows.first().ok_or_else(|| super::no_rows(&rows.path, ""))?;
    let Some(col) = PROMPT_COLUMNS.into_iter().find(|c| first.contains_key(*c)) else {
        // Names the missing column, the present ones and near misses.
        let err = rows.require_columns(&["prompt"]).err();
        return Err(err.unwrap_or_else(|| TrainError::Data {
            path: rows.path.clone(),
            msg: "no `prompt` or `query` column".into(),
        }));
    };
    let row_err = |i: usize, msg: String| TrainError::Row {
        path: rows.path.clone(),
        row: i + 1,
        msg,
    };
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.rows.iter().enumerate() {
        let (prompt, conversation) = match row.get(col) {
            Some(v @ Value::Array(_)) => {
                let msgs =
                    rlhf_models::chat::messages_from_json(v).map_err(|e| row_err(i, format!("column `{col}`: {e}")))?;
                let last = msgs.last().and_then(|m| m.text()).unwrap_or_default().to_string();
                (last, Some(msgs))
            }
            _ => (rows.text(i, col)?.to_string(), None),
        };
        if prompt.is_empty() {
            return Err(row_err(
                i,
                format!("column `{col}` is empty; a completion needs a prompt to continue\nhint: remove the row or write its prompt"),
            ));
        }
        let mut columns = row.clone();
        columns.remove(col);
        out.push(PromptRow {
            prompt,
            columns,
            conversation,
        });
    }
    Ok(PromptSet {
        path: rows.path,
        prompt_column: col.to_string(),
        rows: out,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rows(values: Vec<Value>) -> Rows {
        Rows {
            path: "prompts.jsonl".into(),
            rows: values.into_iter().map(|v| v.as_object().unwrap().clone()).collect(),
        }
    }

    #[test]
    fn prompts_come_from_prompt_and_keep_the_other_columns() {
        let set = prompt_rows(rows(vec![
            json!({"prompt": "2+2=", "solution": "4", "query": "ignored"}),
            json!({"prompt": "3+3=", "solution": 6}),
        ]))
        .unwrap();
        assert_eq!(set.prompt_column, "prompt");
        assert_eq!(set.rows[0].prompt, "2+2=");
        assert_eq!(
            set.rows[0].columns,
            json!({"solution": "4", "query": "ignored"})
                .as_object()
                .unwrap()
                .clone()
        );
        assert_eq!(set.rows[1].columns["solution"], json!(6));
    }

    #[test]
    fn a_query_column_serves_when_there_is_no_prompt() {
        let set = prompt_rows(rows(vec![json!({"query": "Hello", "id": 1})])).unwrap();
        assert_eq!(set.prompt_column, "query");
        assert_eq!(set.rows[0].prompt, "Hello");
        assert!(!set.rows[0].columns.contains_key("query"));
    }

    #[test]
    fn a_file_without_prompts_names_the_column_and_the_present_ones() {
        let err = prompt_rows(rows(vec![json!({"Prompt": "x"})])).unwrap_err().to_string();
        assert!(
            err.contains("missing column `prompt`") && err.contains("`Prompt` differs"),
            "{err}"
        );
    }

    #[test]
    fn bad_rows_are_named() {
        let err = prompt_rows(rows(vec![json!({"prompt": "a"}), json!({"other": "b"})]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 2") && err.contains("missing column `prompt`"),
            "{err}"
        );
        let err = prompt_rows(rows(vec![json!({"prompt": [{"role": "user"}]})]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1") && err.contains("content"), "{err}");
        let err = prompt_rows(rows(vec![json!({"prompt": "a"}), json!({"prompt": ""})]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 2") && err.contains("empty"), "{err}");
    }

    #[test]
    fn conversational_prompts_are_kept_as_messages() {
        let set = prompt_rows(rows(vec![
            json!({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "answer": "1"}),
            json!({"prompt": "text"}),
        ]))
        .unwrap();
        let conv = set.rows[0].conversation.as_ref().unwrap();
        assert_eq!(conv.len(), 2);
        assert_eq!(conv[1].text(), Some("hi"));
        assert_eq!(set.rows[0].prompt, "hi");
        assert_eq!(set.rows[0].columns["answer"], json!("1"));
        assert!(set.rows[1].conversation.is_none());
    }

    #[test]
    fn prompts_are_read_from_csv_files_too() {
        let f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        std::fs::write(f.path(), "prompt,answer\nWhat is 6*7?,42\n").unwrap();
        let set = read_prompt_rows(f.path()).unwrap();
        assert_eq!(set.rows[0].prompt, "What is 6*7?");
        assert_eq!(set.rows[0].columns["answer"], json!("42"));
    }
}
