//! Reward models as GRPO/RLOO reward functions: the score of `prompt + completion`, as TRL
//! 1.16's `GRPOTrainer._calculate_rewards` computes it (no EOS appended, no special tokens).

mod common;

use common::{fixtures, parity, tiny_seqcls};
use rlhf_models::{Fwd, LoadOptions, Message, Model, RenderOptions};
use rlhf_train::data::PromptRow;
use rlhf_train::ppo_run::{score_texts, Query};
use rlhf_train::reward_fns::{RewardArgs, RewardBatch, RewardFuncs};

fn row(prompt: &str) -> PromptRow {
    PromptRow {
        prompt: prompt.into(),
        columns: Default::default(),
        conversation: None,
    }
}

#[test]
fn a_reward_model_scores_prompt_plus_completion_as_transformers() {
    // fixtures/parity_tiny.json `seqcls_padded_batch` (parity_dump.py, transformers
    // GPT2ForSequenceClassification): the scores of three texts, here split into a prompt
    // and a completion that concatenate to them.
    let dir = tempfile::tempdir().unwrap();
    let rm = dir.path().join("tiny-rm");
    tiny_seqcls(&rm);
    let args = RewardArgs {
        reward_model_name_or_path: Some(rm.display().to_string()),
        reward_funcs: vec!["distinct_words".into()],
        ..RewardArgs::default()
    };
    let mut funcs = RewardFuncs::from_args(&args, Some(&[1.0, 0.5]), 64, &LoadOptions::default()).unwrap();
    assert_eq!(funcs.names(), ["tiny-rm", "distinct_words"]);
    let (a, b, c) = (
        row("User: Hi!\nAssistant:"),
        row("User: Can you tell me something about chess?\nAssistant:"),
        row("sh"),
    );
    let batch = RewardBatch::new(
        &[&a, &b, &c],
        1,
        vec![" Hello, happy to help.".into(), " No. Go away.".into(), "ort".into()],
        vec![vec![0; 3]; 3],
    )
    .unwrap();
    let rewards = funcs.score(&batch).unwrap();
    let want = common::f32s(&parity()["seqcls_padded_batch"]["scores"]);
    for (got, want) in rewards[0].iter().zip(&want) {
        let got = got.unwrap();
        assert!((got - *want as f64).abs() < 1e-4, "{got} vs {want}");
    }
    // Raw values: the weights apply in the aggregation.
    assert_eq!(rewards[1], [Some(0.4), Some(0.3), Some(0.1)]);
    assert_eq!(funcs.weights, [1.0, 0.5]);
}

#[test]
fn a_model_without_a_score_head_is_refused_with_the_fix() {
    let args = RewardArgs {
        reward_model_name_or_path: Some(fixtures().join("tiny-gpt2").display().to_string()),
        ..RewardArgs::default()
    };
    let err = RewardFuncs::from_args(&args, None, 64, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reward function `tiny-gpt2`") && err.contains("no score head") && err.contains("rlhf reward"),
        "{err}"
    );
}

/// The score a reward model gives `conversation + [assistant: completion]` rendered with its own
/// chat template and tokenised without special tokens.
fn rendered_score(rm: &Model, conversation: &[Message], completion: &str) -> (String, f64) {
    let mut msgs = conversation.to_vec();
    msgs.push(Message::new("assistant", completion));
    let text = rm
        .chat_template()
        .unwrap()
        .render(&msgs, &RenderOptions::default())
        .unwrap();
    let ids = rm.tokenizer().unwrap().encode(&text).unwrap();
    let s = rm.scores_packed(&[ids.as_slice()], &mut Fwd::eval()).unwrap();
    (text, s.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64)
}

/// Conversational prompts, as TRL 1.16's `_calculate_rewards` treats them: a reward model reads
/// `prompt + [{"role": "assistant", "content": completion}]` rendered with its own chat template
/// (no generation prompt, no special tokens added), and a reward command receives the prompt
/// as its message list and the completion as a one-message list. PPO's reward scoring of a
/// conversational query is the same rendering.
#[test]
fn conversational_prompts_reach_reward_models_and_commands_as_conversations() {
    let dir = fixtures().join("families/tiny-qwen2-seqcls");
    let args = RewardArgs {
        reward_model_name_or_path: Some(dir.display().to_string()),
        ..RewardArgs::default()
    };
    let mut funcs = RewardFuncs::from_args(&args, None, 64, &LoadOptions::default()).unwrap();
    let conversation = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Name a colour."),
    ];
    let r = PromptRow {
        prompt: "Name a colour.".into(),
        columns: Default::default(),
        conversation: Some(conversation.clone()),
    };
    let completions = ["Blue.", "I will not."];
    let batch = RewardBatch::new(
        &[&r],
        2,
        completions.iter().map(|c| c.to_string()).collect(),
        vec![vec![1], vec![2]],
    )
    .unwrap();
    let got = funcs.score(&batch).unwrap();
    let rm = Model::load(&dir, &LoadOptions::default()).unwrap();
    for (i, c) in completions.iter().enumerate() {
        let (text, want) = rendered_score(&rm, &conversation, c);
        assert!(
            text.ends_with(&format!("<|im_start|>assistant\n{c}<|im_end|>\n")),
            "{text:?}"
        );
        let g = got[0][i].unwrap();
        assert!((g - want).abs() < 1e-6, "completion {i}: {g} vs {want}");
    }
    let (_, blue) = rendered_score(&rm, &conversation, "Blue.");
    assert!(((got[0][0].unwrap()) - blue).abs() < 1e-6);

    let req: serde_json::Value = serde_json::from_str(&batch.request_json().unwrap()).unwrap();
    assert_eq!(
        req["prompts"][1],
        serde_json::json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    );
    assert_eq!(
        req["completions"][1],
        serde_json::json!([{"role": "assistant", "content": "I will not."}])
    );

    // PPO: a conversational query scored by the reward model reads the same rendering.
    let q = Query {
        text: "ignored for a conversation".into(),
        ids: vec![1, 2, 3],
        conversation: Some(conversation.clone()),
    };
    let scores = score_texts(&rm, &[&q, &q], &["Blue.".into(), "I will not.".into()], 2).unwrap();
    for (i, c) in completions.iter().enumerate() {
        let (_, want) = rendered_score(&rm, &conversation, c);
        assert!((scores[i] as f64 - want).abs() < 1e-5, "{} vs {want}", scores[i]);
    }

    // A reward model without a chat template cannot read a conversation: the error says so.
    let rm_dir = tempfile::tempdir().unwrap();
    let plain = rm_dir.path().join("plain-rm");
    tiny_seqcls(&plain);
    let args = RewardArgs {
        reward_model_name_or_path: Some(plain.display().to_string()),
        ..RewardArgs::default()
    };
    let mut funcs = RewardFuncs::from_args(&args, None, 64, &LoadOptions::default()).unwrap();
    let err = funcs.score(&batch).unwrap_err().to_string();
    assert!(err.contains("plain-rm") && err.contains("chat template"), "{err}");
}
