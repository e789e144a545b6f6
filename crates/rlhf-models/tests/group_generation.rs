//! Generation for GRPO / RLOO groups ([`generate_groups`]): each prompt is prefilled once and
//! its cache shared by its `g` completions, each completion samples from its own stream.
//! Grouped generation gives every row exactly the tokens it gets when generated alone with
//! the same stream (on GPT-2 and a Llama-family model, on the packed decoder and on the
//! composed path of a quantized model), and greedy groups equal [`generate`] over the
//! repeated prompts.

mod common;

use common::*;
use rlhf_models::lora::{quantize, QuantConfig};
use rlhf_models::{generate, generate_groups, GenerationConfig, LoadOptions, Model};
use rlhf_ops::rng::RngStream;

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![464, 3290, 318, 257],
        vec![15496],
        vec![40, 588, 4771, 13, 632, 318, 11],
    ]
}

fn sampling(model: &Model, n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        eos_token_id: model.eos_token_ids(),
        pad_token_id: 0,
        ..GenerationConfig::default()
    }
}

fn streams(n: usize) -> Vec<RngStream> {
    (0..n).map(|i| RngStream::new(1000 + i as u64)).collect()
}

/// Every row of a grouped generation equals that row generated alone from its stream.
fn check_rows_alone(model: &Model, prompts: &[Vec<u32>], g: usize, cfg: &GenerationConfig) {
    let mut rngs = streams(prompts.len() * g);
    let grouped = generate_groups(model.backbone(), prompts, g, cfg, &mut rngs).unwrap();
    assert_eq!(grouped.response_ids.len(), prompts.len() * g);
    let mut distinct = std::collections::BTreeSet::new();
    for (row, got) in grouped.response_ids.iter().enumerate() {
        let p = &prompts[row / g];
        assert_eq!(&grouped.prompt_ids[row], p);
        let mut alone = streams(prompts.len() * g).swap_remove(row);
        let want = generate_groups(
            model.backbone(),
            std::slice::from_ref(p),
            1,
            cfg,
            std::slice::from_mut(&mut alone),
        )
        .unwrap()
        .response_ids
        .remove(0);
        assert_eq!(got, &want, "row {row}");
        // The group's streams were used: the group's stream positions advanced alike.
        assert_eq!(rngs[row], alone, "row {row}: stream position");
        distinct.insert(got.clone());
    }
    assert!(
        distinct.len() > prompts.len(),
        "sampling gave identical completions within groups"
    );
}

#[test]
fn grouped_generation_equals_generating_each_row_alone_on_gpt2() {
    let model = tiny();
    check_rows_alone(&model, &prompts(), 4, &sampling(&model, 12));
}

#[test]
fn grouped_generation_equals_generating_each_row_alone_on_llama() {
    let model = Model::load(&fixtures().join("families/tiny-llama"), &LoadOptions::default()).unwrap();
    let p = vec![vec![5u32, 17, 300, 42], vec![9], vec![1, 2, 3, 4, 5, 6]];
    check_rows_alone(&model, &p, 3, &sampling(&model, 10));
}

#[test]
fn grouped_generation_on_the_composed_path_equals_each_row_alone() {
    // An int8 base is not served by the packed decoder: rows go through generate_composed.
    let mut model = tiny();
    quantize(&mut model, &QuantConfig::int8()).unwrap();
    check_rows_alone(&model, &prompts()[..2], 2, &sampling(&model, 6));
}

#[test]
fn greedy_groups_equal_generate_over_the_repeated_prompts() {
    let model = tiny();
    let cfg = GenerationConfig {
        do_sample: false,
        ..sampling(&model, 9)
    };
    let g = 3;
    let mut rngs = streams(prompts().len() * g);
    let grouped = generate_groups(model.backbone(), &prompts(), g, &cfg, &mut rngs).unwrap();
    let repeated: Vec<Vec<u32>> = prompts().iter().flat_map(|p| vec![p.clone(); g]).collect();
    let plain = generate(model.backbone(), &repeated, &cfg, &mut RngStream::new(0)).unwrap();
    assert_eq!(grouped, plain);
}

#[test]
fn a_wrong_number_of_streams_is_an_error() {
    let model = tiny();
    let mut rngs = streams(3);
    let e = generate_groups(model.backbone(), &prompts(), 2, &sampling(&model, 4), &mut rngs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("need 6 random streams"), "{e}");
}
