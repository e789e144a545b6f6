//! Conversational rows tokenize to exactly the ids and masks TRL 1.16's trainers made of them:
//! every entry of `fixtures/families/trl_tokenization.json` (made by `family_fixtures.py`, which
//! read the rows back from `RewardTrainer`, `DPOTrainer`, `SFTTrainer` and `GRPOTrainer`), for
//! tiny-qwen2 (Qwen2.5 template), tiny-qwen3 (Qwen3) and tiny-llama (Llama 3.2). The training
//! templates TRL swaps in for assistant-only loss are in `fixtures/families/templates/`.

use std::path::PathBuf;

use rlhf_models::{ChatTemplate, Tokenizer};
use rlhf_train::chat_data::{is_conversational, ChatData};
use rlhf_train::data::Rows;
use serde_json::Value;

fn families() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/families"))
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(families().join("trl_tokenization.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn one_row(row: &Value) -> Rows {
    Rows {
        path: "trl_tokenization.json".into(),
        rows: vec![row.as_object().unwrap().clone()],
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn mask(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

fn labels(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

struct Family {
    name: String,
    fx: Value,
    tok: Tokenizer,
    template: ChatTemplate,
}

fn each_family() -> Vec<Family> {
    let fx = fixture();
    fx["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, f)| {
            let dir = families().join(
                f["tokenizer_dir"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("fixtures/families/"),
            );
            Family {
                name: name.clone(),
                fx: f.clone(),
                tok: Tokenizer::from_dir(&dir, &[], None).unwrap(),
                template: ChatTemplate::from_dir(&dir).unwrap(),
            }
        })
        .collect()
}

#[test]
fn reward_pairs_equal_trl_reward_trainer() {
    for f in each_family() {
        let r = &f.fx["reward"];
        let rows = one_row(&r["row"]);
        assert!(is_conversational(&rows, 0));
        let data = ChatData::with_template(&f.tok, Some(&f.template));
        let (chosen, rejected) = data.reward_pair(&rows, 0).unwrap();
        assert_eq!(chosen, ids(&r["chosen_ids"]), "{} chosen", f.name);
        assert_eq!(rejected, ids(&r["rejected_ids"]), "{} rejected", f.name);
        assert_eq!(
            u64::from(f.tok.pad_token_id),
            r["pad_token_id_set_by_trainer"].as_u64().unwrap(),
            "{}",
            f.name
        );
        // The collator's batch: [chosen; rejected] right-padded with the pad id.
        let (batch, _) = rlhf_train::collate::pad(
            &[chosen, rejected],
            f.tok.pad_token_id,
            rlhf_train::collate::PadSide::Right,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let want: Vec<Vec<u32>> = r["collated"]["input_ids"].as_array().unwrap().iter().map(ids).collect();
        assert_eq!(batch.to_vec2::<u32>().unwrap(), want, "{} collated", f.name);
    }
}

#[test]
fn dpo_triples_equal_trl_dpo_trainer() {
    for f in each_family() {
        let d = &f.fx["dpo"];
        let data = ChatData::with_template(&f.tok, Some(&f.template));
        let t = data.dpo_triple(&one_row(&d["row"]), 0).unwrap();
        assert_eq!(t.prompt_ids, ids(&d["prompt_ids"]), "{} prompt", f.name);
        assert_eq!(t.chosen_ids, ids(&d["chosen_ids"]), "{} chosen", f.name);
        assert_eq!(t.rejected_ids, ids(&d["rejected_ids"]), "{} rejected", f.name);
    }
}

#[test]
fn sft_prompt_completion_equals_trl_sft_trainer() {
    for f in each_family() {
        let s = &f.fx["sft_prompt_completion"];
        let data = ChatData::with_template(&f.tok, Some(&f.template));
        let t = data.sft_example(&one_row(&s["row"]), 0, "text", false).unwrap();
        assert_eq!(t.input_ids, ids(&s["input_ids"]), "{} input_ids", f.name);
        assert_eq!(
            t.completion_mask.as_ref().unwrap(),
            &mask(&s["completion_mask"]),
            "{} mask",
            f.name
        );
        assert!(s["completion_only_loss_effective"].as_bool().unwrap());
        assert_eq!(t.labels(true), labels(&s["labels"]), "{} labels", f.name);
    }
}

#[test]
fn sft_assistant_only_loss_equals_trl_with_its_training_templates() {
    for f in each_family() {
        let s = &f.fx["sft_assistant_only_loss"];
        // The template TRL used: its *_training.jinja swapped in (Qwen), or the
        // `chat_template_path` given (Llama, whose own template TRL cannot patch).
        let file = match f.name.as_str() {
            "qwen2" => "qwen2_5_training.jinja",
            "qwen3" => "qwen3_training.jinja",
            _ => "llama3_training.jinja",
        };
        let training =
            ChatTemplate::from_file(&families().join("templates").join(file), f.tok.config.special.clone()).unwrap();
        let rows = one_row(&s["row"]);

        // The tokenizer's own template has no {% generation %}: a clear error, not silent zeros.
        let plain = ChatData::with_template(&f.tok, Some(&f.template));
        let err = plain.sft_example(&rows, 0, "text", true).unwrap_err().to_string();
        assert!(err.contains("row 1") && err.contains("{% generation %}"), "{err}");

        let data = ChatData::with_template(&f.tok, Some(&training));
        let t = data.sft_example(&rows, 0, "text", true).unwrap();
        assert_eq!(t.input_ids, ids(&s["input_ids"]), "{} input_ids", f.name);
        assert_eq!(
            t.assistant_mask.as_ref().unwrap(),
            &mask(&s["assistant_masks"]),
            "{} assistant mask",
            f.name
        );
        assert_eq!(
            t.labels(true),
            labels(&s["labels_with_completion_only_loss_default"]),
            "{}",
            f.name
        );
        assert_eq!(
            t.labels(false),
            labels(&s["labels_with_completion_only_loss_false"]),
            "{}",
            f.name
        );
    }
}

#[test]
fn grpo_prompts_equal_trl_grpo_trainer() {
    for f in each_family() {
        let g = &f.fx["grpo_prompt_only"];
        let kwargs = g["args_chat_template_kwargs"].as_object().unwrap().clone();
        let data = ChatData {
            kwargs: Some(&kwargs),
            ..ChatData::with_template(&f.tok, Some(&f.template))
        };
        let got = data.prompt_ids(&one_row(&g["row"]), 0).unwrap();
        assert_eq!(got, ids(&g["prompt_ids"]), "{}", f.name);
        assert_eq!(
            f.tok.decode(&got, false).unwrap(),
            g["prompt_rendered"].as_str().unwrap(),
            "{}",
            f.name
        );
    }
}

#[test]
fn text_rows_follow_trl_text_rules() {
    // Llama's tokenizer adds BOS to text (TRL tokenizes text with special tokens) and EOS is
    // appended once.
    let dir = families().join("tiny-llama");
    let tok = Tokenizer::from_dir(&dir, &[2009, 2001], None).unwrap();
    let data = ChatData::text(&tok);
    let row = serde_json::json!({"prompt": "Hi", "chosen": " there<|eot_id|>", "rejected": " you"});
    let rows = one_row(&row);
    assert!(!is_conversational(&rows, 0));
    let (c, r) = data.reward_pair(&rows, 0).unwrap();
    assert_eq!(c, tok.encode_special("Hi there<|eot_id|>", true).unwrap());
    assert_eq!(r, tok.encode_special("Hi you<|eot_id|>", true).unwrap());
    assert_eq!((c[0], *c.last().unwrap()), (2000, 2009));
    let prompt = data
        .prompt_ids(&one_row(&serde_json::json!({"query": "Hi"})), 0)
        .unwrap();
    assert_eq!(prompt, tok.encode_special("Hi", true).unwrap());
    let sft = data
        .sft_example(&one_row(&serde_json::json!({"text": "Hello"})), 0, "text", false)
        .unwrap();
    assert_eq!(sft.input_ids, tok.encode_special("Hello<|eot_id|>", true).unwrap());
}

#[test]
fn bad_conversational_rows_are_errors_naming_the_row_and_column() {
    let f = &each_family()[0];
    let data = ChatData::with_template(&f.tok, Some(&f.template));
    let cases = [
        (
            serde_json::json!({"prompt": [{"role": "user", "content": "q"}], "chosen": "text", "rejected": [{"role": "assistant", "content": "b"}]}),
            "column `chosen` is text",
        ),
        (
            serde_json::json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]}),
            "column `chosen`: message 0: a message needs a `content`",
        ),
        (
            serde_json::json!({"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"}),
            "column `prompt` must be text or a list",
        ),
        (
            serde_json::json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}], "tools": 3}),
            "column `tools`",
        ),
    ];
    for (row, want) in cases {
        let err = data.reward_pair(&one_row(&row), 0).unwrap_err().to_string();
        assert!(err.contains("row 1") && err.contains(want), "{want}: {err}");
    }
    let no_template = ChatData::text(&f.tok);
    let row = serde_json::json!({"prompt": [{"role": "user", "content": "q"}]});
    let err = no_template.prompt_ids(&one_row(&row), 0).unwrap_err().to_string();
    assert!(err.contains("no chat template") && err.contains("hint:"), "{err}");
}

/// PPO and the online trainers read prompts by one rule: the `prompt` column when the first
/// row has one (else `query`), text and ids from the same column, a conversation rendered
/// with the row's `chat_template_kwargs`. Before, PPO took its text from `query` and its ids
/// from `prompt` when a file had both.
#[test]
fn ppo_prompts_take_text_and_ids_from_the_column_the_online_trainers_read() {
    let dir = families().join("tiny-qwen2");
    let model = rlhf_models::Model::load(&dir, &rlhf_models::LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("prompts.jsonl");
    let rows = [
        serde_json::json!({"query": "Old text", "prompt": "New text"}),
        serde_json::json!({"query": "Old", "prompt": [{"role": "user", "content": "Hello"}]}),
    ];
    let text: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n")).unwrap();
    let queries = rlhf_train::ppo_run::prompt_ids(&model, &path).unwrap();
    let tok = model.tokenizer().unwrap();
    assert_eq!(queries[0].text, "New text");
    assert_eq!(queries[0].ids, tok.encode_special("New text", true).unwrap());
    let data = ChatData::with_template(tok, model.chat_template.as_ref());
    let all = Rows {
        path: path.clone(),
        rows: rows.iter().map(|r| r.as_object().unwrap().clone()).collect(),
    };
    let want = data.prompt_set_ids(&all, "prompt").unwrap();
    assert_eq!(queries[1].ids, want[1]);
    assert!(queries[1].conversation.is_some());
    assert!(queries[1].text.ends_with("assistant\n"), "{:?}", queries[1].text);
}
