//! Reward models as GRPO/RLOO reward functions: the score of `prompt + completion`, as TRL
//! 1.16's `GRPOTrainer._calculate_rewards` computes it (no EOS appended, no special tokens).

mod common;

use common::{fixtures, parity, tiny_seqcls};
use rlhf_models::LoadOptions;
use rlhf_train::data::PromptRow;
use rlhf_train::reward_fns::{RewardArgs, RewardBatch, RewardFuncs};

fn row(prompt: &str) -> PromptRow {
    PromptRow {
        prompt: prompt.into(),
        columns: Default::default(),
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
