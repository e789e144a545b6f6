//! The synthetic quickstart world: determinism, disjoint splits, the judge agrees with the
//! generator, and the trained byte-level BPE round-trips text in short sequences.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use rlhf_models::Tokenizer;
use rlhf_train::data::{read_data, DataFiles};
use rlhf_train::synth::{
    corpus, judge, preference_pairs, prompts, sft_rows, tokenizer_json, train_tokenizer, write_all, Kind, Split,
    SynthConfig, DEFAULT_VOCAB_SIZE, EOS_TOKEN,
};
use rlhf_train::TrainError;

fn cfg(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        n_sft: 2000,
        n_pairs_train: 2000,
        n_pairs_eval: 500,
        n_prompts: 512,
    }
}

/// The tokenizer of seed 0, trained once for all tests.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let json = tokenizer_json(&cfg(0), DEFAULT_VOCAB_SIZE).unwrap();
        Tokenizer::from_json(json, Path::new("<synth tokenizer.json>"), None, None).unwrap()
    })
}

#[test]
fn the_same_seed_gives_the_same_rows_and_another_seed_different_ones() {
    let (a, b, c) = (cfg(7), cfg(7), cfg(8));
    assert_eq!(sft_rows(&a), sft_rows(&b));
    assert_eq!(preference_pairs(&a, Split::Eval), preference_pairs(&b, Split::Eval));
    assert_eq!(prompts(&a, Split::Train), prompts(&b, Split::Train));
    assert_ne!(sft_rows(&a), sft_rows(&c));
    assert_ne!(preference_pairs(&a, Split::Train), preference_pairs(&c, Split::Train));
    // Each list has its own stream: changing one count leaves the other lists alone.
    let more = SynthConfig { n_sft: 10, ..cfg(7) };
    assert_eq!(
        preference_pairs(&a, Split::Train),
        preference_pairs(&more, Split::Train)
    );
}

#[test]
fn eval_prompts_never_occur_in_train_rows() {
    let c = cfg(0);
    let mut train: HashSet<String> = sft_rows(&c).into_iter().map(|(p, _)| p).collect();
    train.extend(preference_pairs(&c, Split::Train).into_iter().map(|p| p.prompt));
    train.extend(prompts(&c, Split::Train));
    let eval: HashSet<String> = preference_pairs(&c, Split::Eval)
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    assert!(eval.is_disjoint(&train));
    assert!(prompts(&c, Split::Eval).iter().all(|p| !train.contains(p)));
    // All 40 topics appear in both splits.
    let topics = |ps: &mut dyn Iterator<Item = &String>| {
        ps.filter_map(|p| rlhf_train::synth::prompt_topic(p))
            .collect::<HashSet<_>>()
    };
    assert_eq!(topics(&mut eval.iter()).len(), 40);
    assert_eq!(topics(&mut train.iter()).len(), 40);
}

#[test]
fn rows_are_well_formed_and_sft_is_half_good() {
    let c = cfg(0);
    let rows = sft_rows(&c);
    let good = rows.iter().filter(|(p, r)| judge(p, r).good).count();
    assert!((900..=1100).contains(&good), "{good} of 2000 SFT completions are good");
    for (p, r) in &rows {
        assert!(p.starts_with("User: ") && p.ends_with("\nAssistant:"), "{p:?}");
        assert!(r.starts_with(' ') && !r.starts_with("  "), "{r:?}");
    }
    let pairs = preference_pairs(&c, Split::Train);
    for kind in Kind::ALL {
        let n = pairs.iter().filter(|p| p.kind == kind).count();
        assert!((400..=600).contains(&n), "{n} pairs of kind {}", kind.as_str());
    }
}

#[test]
fn the_judge_agrees_with_the_generator_on_every_sample() {
    let c = cfg(3);
    let mut n = 0;
    for (p, r) in sft_rows(&c) {
        let j = judge(&p, &r);
        // A bare pleasantry ("Sure!") is too short to count as fluent.
        assert!(j.fluent || r.split_whitespace().count() < 3, "{p:?} {r:?}: {j:?}");
        n += 1;
    }
    for split in [Split::Train, Split::Eval] {
        for pair in preference_pairs(&c, split) {
            let good = judge(&pair.prompt, &pair.chosen);
            assert!(good.good, "{pair:?}: {good:?}");
            let bad = judge(&pair.prompt, &pair.rejected);
            let short = pair.kind == Kind::Unhelpful && pair.rejected.split_whitespace().count() < 3;
            assert!(!bad.good && (bad.fluent || short), "{pair:?}: {bad:?}");
            // The judge also names the generator's reason.
            let reason = match pair.kind {
                Kind::Rude | Kind::Negative => bad.rude_or_negative,
                // A bare pleasantry names no topic at all.
                Kind::Unhelpful => bad.polite && !bad.off_topic && !bad.helpful && !bad.rude_or_negative,
                Kind::OffTopic => bad.polite && !bad.on_topic && !bad.rude_or_negative,
            };
            assert!(reason, "{pair:?}: {bad:?}");
            n += 2;
        }
    }
    assert_eq!(n, 2000 + 2 * 2500);
}

#[test]
fn garbage_is_never_good() {
    let p = "User: Any tips for coffee?\nAssistant:";
    let good = " Sure! Try to grind the beans right before you brew. Enjoy!";
    assert!(judge(p, good).good);
    let garbage = [
        String::new(),
        " ".into(),
        " the the the the.".into(),
        " Sure! Try to grind the beans right before you brew".into(),
        " Sure! Try to grind the beans right before you brew. Enjoy! Try to grind the beans right before you brew."
            .into(),
        " Sure! Try to grind the beanz right before you brew. Enjoy!".into(),
        " Sure! Try to grind the beans right before you brew. Enjoy!\nUser: thanks\nAssistant: Enjoy!".into(),
        " Sure! Try to grind the beans right before you brew . Enjoy!".into(),
        " Sure! Try to grind the beans right before you brew.. Enjoy!".into(),
        " Sure! Try to grind the beans right before you brew.<|endoftext|> Enjoy!".into(),
        " Sure! grind beans brew coffee you before right the to. Enjoy!".into(),
        " ĠSure! ĠTry Ġto Ġgrind.".into(),
        " Sure! Try to grind the beans right before you brew and keep your hook sharp. Enjoy!".into(),
        " Sure! Sure! Sure! Sure! Sure!".into(),
        " coffee coffee coffee coffee coffee.".into(),
        " xq zzv bfr coffee!".into(),
        "x".repeat(400),
        format!("{good} {}", "Enjoy the process! Have fun! Good luck! ".repeat(10)),
    ];
    for g in &garbage {
        assert!(!judge(p, g).good, "{g:?} judged good");
    }
    // Word salad from the generator's own vocabulary is not good either.
    let vocab: Vec<String> = good
        .split(' ')
        .map(str::to_string)
        .chain(corpus(&cfg(0))[..50].iter().cloned())
        .collect();
    let words: Vec<&str> = vocab.iter().flat_map(|s| s.split_whitespace()).collect();
    let mut state = 12345u64;
    for _ in 0..2000 {
        let mut s = String::new();
        for _ in 0..12 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.push(' ');
            s.push_str(words[(state >> 33) as usize % words.len()]);
        }
        assert!(!judge(p, &s).good, "{s:?} judged good");
    }
    // A trailing end-of-text token is ignored.
    assert!(judge(p, &format!("{good}{EOS_TOKEN}")).good);
}

#[test]
fn the_tokenizer_round_trips_text_and_ends_with_endoftext_id_0() {
    let tok = tokenizer();
    assert_eq!(tok.eos_token_id, 0);
    assert_eq!(tok.vocab_size(), DEFAULT_VOCAB_SIZE);
    let texts = [
        "User: Any tips for chess?\nAssistant: Sure! Castle early to keep your king safe.",
        "Ünïcode, emoji 🦀 and tabs\tstill round-trip; so does \"quoted\" text and  two spaces.",
        " leading and trailing spaces ",
    ];
    for t in texts {
        let ids = tok.encode(t).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), t);
    }
    let ids = tok.encode(&format!("Hello{EOS_TOKEN}")).unwrap();
    assert_eq!(ids.last(), Some(&0));
}

#[test]
fn the_same_corpus_gives_a_byte_identical_tokenizer() {
    let texts = corpus(&SynthConfig {
        n_sft: 300,
        n_pairs_train: 300,
        n_pairs_eval: 50,
        n_prompts: 64,
        ..cfg(1)
    });
    let a = train_tokenizer(&texts, 400).unwrap();
    for _ in 0..3 {
        assert_eq!(a, train_tokenizer(&texts, 400).unwrap());
    }
    assert!(matches!(train_tokenizer(&texts, 100), Err(TrainError::Config(_))));
    assert!(matches!(train_tokenizer(&[], 400), Err(TrainError::Data { .. })));
}

#[test]
fn prompt_and_response_fit_in_64_tokens() {
    let tok = tokenizer();
    let mut lens = Vec::new();
    let c = cfg(0);
    for split in [Split::Train, Split::Eval] {
        for pair in preference_pairs(&c, split) {
            let q = tok.encode(&pair.prompt).unwrap().len();
            for r in [&pair.chosen, &pair.rejected] {
                // As SFT and the reward model see it: prompt, response, EOS.
                lens.push((q, q + tok.encode(r).unwrap().len() + 1));
            }
        }
    }
    let mut total: Vec<usize> = lens.iter().map(|l| l.1).collect();
    let mut query: Vec<usize> = lens.iter().map(|l| l.0).collect();
    total.sort_unstable();
    query.sort_unstable();
    let pct = |v: &[usize], p: usize| v[(v.len() - 1) * p / 100];
    println!(
        "tokens (vocab {DEFAULT_VOCAB_SIZE}): prompt median {} max {}; prompt+response+eos median {} p95 {} max {}",
        pct(&query, 50),
        pct(&query, 100),
        pct(&total, 50),
        pct(&total, 95),
        pct(&total, 100)
    );
    assert!(
        pct(&total, 100) <= 64,
        "longest sequence is {} tokens",
        pct(&total, 100)
    );
}

#[test]
fn write_all_writes_files_the_data_loaders_read() {
    let tmp = tempfile::tempdir().unwrap();
    let c = SynthConfig {
        n_sft: 20,
        n_pairs_train: 30,
        n_pairs_eval: 10,
        n_prompts: 16,
        ..cfg(0)
    };
    let files = write_all(&c, tmp.path()).unwrap();
    let sft = DataFiles::resolve(&files.sft).unwrap();
    let rows = read_data(&sft.train).unwrap();
    assert_eq!(rows.len(), 20);
    assert_eq!(rows.text(0, "completion").unwrap(), sft_rows(&c)[0].1);
    let prefs = DataFiles::resolve(&files.prefs).unwrap();
    assert_eq!(read_data(&prefs.train).unwrap().len(), 30);
    let val = read_data(prefs.validation.as_ref().unwrap()).unwrap();
    assert_eq!(val.len(), 10);
    assert!(["rude", "negative", "unhelpful", "off_topic"].contains(&val.text(0, "kind").unwrap()));
    let queries = read_data(&DataFiles::resolve(&files.prompts).unwrap().train).unwrap();
    assert_eq!(queries.text(3, "query").unwrap(), prompts(&c, Split::Train)[3]);
}

#[test]
fn a_zero_count_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = write_all(
        &SynthConfig {
            n_pairs_eval: 0,
            ..cfg(0)
        },
        tmp.path(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, TrainError::Config(m) if m.contains("n_pairs_eval")),
        "{err}"
    );
}

/// The conversational rows of the chat quickstart: the same questions and answers as the text
/// rows, in TRL's conversational format; rendered with the ChatML template they give the
/// texts the chat tokenizer was trained on, SFT masks cover the answer and its end of turn,
/// prompts end with the generation prompt, and every conversation fits 72 tokens.
#[test]
fn chat_rows_render_with_the_chatml_template_and_fit_72_tokens() {
    use rlhf_models::ChatTemplate;
    use rlhf_train::chat_data::ChatData;
    use rlhf_train::synth::chat;

    let c = SynthConfig {
        n_sft: 400,
        n_pairs_train: 300,
        n_pairs_eval: 100,
        n_prompts: 100,
        ..cfg(0)
    };
    let tmp = tempfile::tempdir().unwrap();
    let files = chat::write_all(&c, &tmp.path().join("data")).unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("tokenizer.json"),
        chat::tokenizer_json(&c, DEFAULT_VOCAB_SIZE).unwrap(),
    )
    .unwrap();
    chat::write_tokenizer_files(&model, 72).unwrap();
    let tok = Tokenizer::from_dir(&model, &[], None).unwrap();
    let ids = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!((ids(EOS_TOKEN), ids(chat::IM_START), ids(chat::IM_END)), (0, 1, 2));
    assert_eq!((tok.eos_token_id, tok.pad_token_id, tok.bos_token_id), (2, 0, None));
    let template = ChatTemplate::load(&model).unwrap().expect("chat_template.jinja");
    let data = ChatData::with_template(&tok, Some(&template));

    let sft = read_data(&files.sft.join("train.jsonl")).unwrap();
    let text_rows = sft_rows(&c);
    for (i, (prompt, answer)) in text_rows.iter().enumerate() {
        let ex = data.sft_example(&sft, i, "text", false).unwrap();
        let question = chat::question(prompt);
        let whole = format!(
            "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n",
            answer.trim_start()
        );
        assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), whole);
        assert!(ex.input_ids.len() <= 72, "row {i}: {} tokens", ex.input_ids.len());
        let mask = ex.completion_mask.unwrap();
        let kept: Vec<u32> = ex
            .input_ids
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m == 1)
            .map(|(&t, _)| t)
            .collect();
        assert_eq!(
            tok.decode(&kept, false).unwrap(),
            format!("{}<|im_end|>\n", answer.trim_start())
        );
        // With assistant-only loss, the `{% generation %}` block gives the answer and its end of turn.
        let masked = data.sft_example(&sft, i, "text", true).unwrap().labels(false);
        let kept: Vec<u32> = masked.iter().filter(|&&l| l >= 0).map(|&l| l as u32).collect();
        assert_eq!(
            tok.decode(&kept, false).unwrap(),
            format!("{}<|im_end|>", answer.trim_start())
        );
    }
    for split in ["train", "validation"] {
        let prefs = read_data(&files.prefs.join(format!("{split}.jsonl"))).unwrap();
        for i in 0..prefs.len() {
            let (chosen, rejected) = data.reward_pair(&prefs, i).unwrap();
            assert!(chosen.len() <= 72 && rejected.len() <= 72, "{split} pair {i}");
            for ids in [&chosen, &rejected] {
                assert!(
                    tok.decode(ids, false).unwrap().ends_with("<|im_end|>\n"),
                    "{split} pair {i}"
                );
            }
        }
        let prompts_file = read_data(&files.prompts.join(format!("{split}.jsonl"))).unwrap();
        let split_prompts = prompts(&c, if split == "train" { Split::Train } else { Split::Eval });
        for (i, p) in split_prompts.iter().enumerate() {
            let ids = data.prompt_ids(&prompts_file, i).unwrap();
            let want = format!(
                "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                chat::question(p)
            );
            assert_eq!(tok.decode(&ids, false).unwrap(), want);
        }
    }
}
