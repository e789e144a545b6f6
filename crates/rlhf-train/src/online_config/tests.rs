use super::*;

fn online(g: usize) -> OnlineArgs {
    let mut o = OnlineArgs {
        num_generations: g,
        ..OnlineArgs::default()
    };
    o.rewards.reward_funcs = vec!["distinct_words".into()];
    o
}

fn train(bs: usize, ga: usize) -> TrainingArgs {
    TrainingArgs {
        per_device_train_batch_size: bs,
        gradient_accumulation_steps: ga,
        ..TrainingArgs::default()
    }
}

#[test]
fn derived_sizes_follow_trls_post_init() {
    // (bs, GA, processes, G, generation_batch_size, steps_per_generation)
    //   -> (steps_per_generation, generation_batch_size, prompts per generation);
    // the sizes TRL 1.16's `GRPOConfig.__post_init__` derives for the same settings.
    // fixtures/algorithms: bs 8, G 4 -> generation_batch_size 8, steps_per_generation 1.
    let cases = [
        ((8, 1, 1, 8, None, None), (1, 8, 1)),
        ((8, 1, 1, 4, None, None), (1, 8, 2)),
        ((4, 4, 2, 8, None, None), (4, 32, 4)),
        ((4, 1, 2, 4, Some(24), None), (3, 24, 6)),
        ((3, 2, 1, 2, None, Some(4)), (4, 12, 6)),
    ];
    for ((bs, ga, p, g, gb, spg), (want_spg, want_gb, want_ppg)) in cases {
        let o = OnlineArgs {
            generation_batch_size: gb,
            steps_per_generation: spg,
            ..online(g)
        };
        let plan = o.plan(&train(bs, ga), p, "GRPO").unwrap();
        assert_eq!(
            (
                plan.steps_per_generation,
                plan.generation_batch_size,
                plan.prompts_per_generation
            ),
            (want_spg, want_gb, want_ppg),
            "{bs} {ga} {p} {g} {gb:?} {spg:?}"
        );
        assert_eq!(plan.local_generation_batch_size, bs * want_spg);
        assert_eq!(plan.completions_per_optimizer_step, bs * ga * p);
    }
}

#[test]
fn every_bad_size_is_an_error_with_the_fix() {
    let cases: Vec<(OnlineArgs, TrainingArgs, &str)> = vec![
        (online(1), train(8, 1), "at least 2 generations"),
        (
            OnlineArgs {
                generation_batch_size: Some(16),
                steps_per_generation: Some(2),
                ..online(8)
            },
            train(8, 1),
            "cannot both be set",
        ),
        (
            OnlineArgs {
                generation_batch_size: Some(12),
                ..online(4)
            },
            train(8, 1),
            "multiple of the global batch size",
        ),
        (online(3), train(8, 1), "whole groups of num_generations (3)"),
        (
            OnlineArgs {
                num_iterations: 0,
                ..online(8)
            },
            train(8, 1),
            "`num_iterations`: must be at least 1",
        ),
        (
            OnlineArgs {
                max_completion_length: 0,
                ..online(8)
            },
            train(8, 1),
            "`max_completion_length`",
        ),
        (
            OnlineArgs {
                steps_per_generation: Some(0),
                ..online(8)
            },
            train(8, 1),
            "`steps_per_generation`",
        ),
        (
            OnlineArgs {
                temperature: 0.0,
                ..online(8)
            },
            train(8, 1),
            "`temperature`: must be a positive number",
        ),
        (
            OnlineArgs {
                top_p: 1.5,
                ..online(8)
            },
            train(8, 1),
            "`top_p`: must be in (0, 1]",
        ),
        (
            OnlineArgs {
                epsilon: -0.1,
                ..online(8)
            },
            train(8, 1),
            "`epsilon`",
        ),
        (
            OnlineArgs {
                epsilon_high: Some(f64::NAN),
                ..online(8)
            },
            train(8, 1),
            "`epsilon_high`",
        ),
        (
            OnlineArgs {
                reward_weights: Some(vec![1.0, 2.0]),
                ..online(8)
            },
            train(8, 1),
            "2 weight(s) for 1 reward function(s)",
        ),
        (
            OnlineArgs {
                rewards: RewardArgs::default(),
                ..online(8)
            },
            train(8, 1),
            "no reward function",
        ),
        (
            online(8),
            TrainingArgs {
                eval_strategy: "steps".into(),
                per_device_eval_batch_size: 6,
                ..train(8, 1)
            },
            "evaluation batch (per_device_eval_batch_size 6",
        ),
        (
            online(8),
            train(0, 1),
            "`per_device_train_batch_size`: must be at least 1",
        ),
    ];
    for (o, a, want) in cases {
        let e = o.plan(&a, 1, "GRPO").unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    // num_generations_eval makes an evaluation batch of 6 valid.
    let o = OnlineArgs {
        num_generations_eval: Some(3),
        ..online(8)
    };
    let a = TrainingArgs {
        eval_strategy: "steps".into(),
        per_device_eval_batch_size: 6,
        ..train(8, 1)
    };
    assert_eq!(o.plan(&a, 1, "GRPO").unwrap().num_generations_eval, 3);
}

#[test]
fn the_run_length_counts_whole_generation_batches() {
    // bs 4, GA 2, G 4, num_iterations 2: generation batch 8 = 2 prompts, 4 micro-steps.
    let o = OnlineArgs {
        num_iterations: 2,
        ..online(4)
    };
    let a = train(4, 2);
    let plan = o.plan(&a, 1, "GRPO").unwrap();
    assert_eq!(plan.micro_steps_per_generation, 4);
    let len = plan.run_length(7, &a).unwrap();
    assert_eq!(
        len,
        RunLength {
            generations_per_epoch: 3,
            prompts_dropped_per_epoch: 1,
            micro_steps_per_epoch: 12,
            steps_per_epoch: 6,
            total_steps: 18,
        }
    );
    let a = TrainingArgs {
        max_steps: 5,
        ..train(4, 2)
    };
    assert_eq!(plan.run_length(7, &a).unwrap().total_steps, 5);
    let e = plan.run_length(1, &a).unwrap_err().to_string();
    assert!(e.contains("needs 2 prompts") && e.contains("has 1"), "{e}");
    // A last partial accumulation window counts as a step: 3 micro-steps, GA 2 -> 2.
    let o = OnlineArgs {
        steps_per_generation: Some(3),
        ..online(2)
    };
    let plan = o.plan(&train(2, 2), 1, "RLOO").unwrap();
    assert_eq!(plan.run_length(3, &train(2, 2)).unwrap().steps_per_epoch, 2);
}

#[test]
fn generation_uses_the_plans_sampling_settings() {
    let o = OnlineArgs {
        temperature: 0.7,
        top_k: 40,
        max_completion_length: 64,
        ..online(8)
    };
    let g = o.plan(&train(8, 1), 1, "GRPO").unwrap().generation_config(vec![2], 0);
    assert_eq!((g.max_new_tokens, g.temperature, g.top_k, g.top_p), (64, 0.7, 40, 1.0));
    assert!(g.do_sample && g.eos_token_id == vec![2] && g.pad_token_id == 0);
}

#[test]
fn the_reference_is_none_a_path_the_adapters_off_policy_or_a_copy() {
    assert_eq!(ReferenceModel::resolve(false, Some("r"), true), ReferenceModel::None);
    assert_eq!(
        ReferenceModel::resolve(true, Some("r"), true),
        ReferenceModel::Model("r".into())
    );
    assert_eq!(
        ReferenceModel::resolve(true, None, true),
        ReferenceModel::AdaptersDisabled
    );
    assert_eq!(
        ReferenceModel::resolve(true, None, false),
        ReferenceModel::InitialPolicy
    );
}
