//! Attention with shared prefixes (a sequence continuing the first `l` tokens of an earlier
//! one, whose rows are computed once; chains of them): the fused op equals the composed oracle (values and
//! gradients of q, k, v), both equal running every sequence in full on its own, and bad
//! prefix tables are errors.

mod common;

use candle_core::Tensor;
use common::{close, flat, fused_equals_composed, gradients_match_finite_differences, random, value_and_grads};
use rlhf_ops::attention::{attention, attention_composed, AttentionConfig};

type Prefixes = Vec<Option<(usize, usize)>>;

fn config(lens: &[usize], prefixes: Prefixes, heads: (usize, usize, usize), window: Option<usize>) -> AttentionConfig {
    let (n_head, n_kv_head, d) = heads;
    AttentionConfig {
        lens: lens.to_vec(),
        n_head,
        n_kv_head,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        window,
        keep: None,
        prefixes,
    }
}

fn qkv(cfg: &AttentionConfig, seed: u64) -> [Tensor; 3] {
    let n: usize = cfg.lens.iter().sum();
    let d = cfg.head_dim;
    [
        random(&[n, cfg.n_head * d], 1.5, seed),
        random(&[n, cfg.n_kv_head * d], 1.5, seed + 1),
        random(&[n, cfg.n_kv_head * d], 1.5, seed + 2),
    ]
}

/// (lens, prefixes, (heads, kv heads, head_dim), window).
type Case = (Vec<usize>, Prefixes, (usize, usize, usize), Option<usize>);

fn cases() -> Vec<Case> {
    vec![
        // A pair sharing a prompt of 4 (a reward or DPO pair).
        (vec![9, 5], vec![None, Some((0, 4))], (4, 2, 8), None),
        // Several continuations of one sequence, one of them of the whole sequence.
        (
            vec![7, 6, 1, 3],
            vec![None, Some((0, 5)), Some((0, 2)), Some((0, 7))],
            (6, 2, 8),
            None,
        ),
        // Chains: 2 continues 1, which continues 0 (a prefix common to all three, then one
        // common to the last two).
        (
            vec![8, 4, 2, 3],
            vec![None, Some((0, 3)), Some((1, 5)), Some((2, 7))],
            (4, 2, 8),
            Some(4),
        ),
        // Two groups, a sliding window shorter and longer than the prefix.
        (
            vec![8, 4, 4, 10, 2],
            vec![None, Some((0, 6)), Some((0, 6)), None, Some((3, 1))],
            (4, 1, 16),
            Some(3),
        ),
        (vec![8, 4, 4], vec![None, Some((0, 6)), None], (2, 2, 8), Some(9)),
        // An empty table: no sharing.
        (vec![5, 3], Vec::new(), (2, 1, 8), None),
    ]
}

#[test]
fn shared_prefix_attention_matches_the_composed_oracle() {
    for (lens, prefixes, heads, window) in cases() {
        let cfg = config(&lens, prefixes, heads, window);
        fused_equals_composed(
            &qkv(&cfg, 10),
            &|t| attention(&t[0], &t[1], &t[2], &cfg).unwrap(),
            &|t| attention_composed(&t[0], &t[1], &t[2], &cfg).unwrap(),
            // f32, sums of at most T·d products in another order.
            2e-5,
        );
    }
}

/// Rows of the unshared layout (every sequence in full) as indices into the shared one, and
/// which unshared rows are a sequence's own (not a copy of its prefix).
fn unshared_rows(lens: &[usize], prefixes: &Prefixes) -> (Vec<u32>, Vec<u32>) {
    let (mut map, mut own) = (Vec::new(), Vec::new());
    // Each sequence in full, as shared rows.
    let mut full: Vec<Vec<u32>> = Vec::new();
    let mut row = 0u32;
    for (i, &t) in lens.iter().enumerate() {
        let mut rows: Vec<u32> = match prefixes.get(i).copied().flatten() {
            Some((j, l)) => full[j][..l].to_vec(),
            None => Vec::new(),
        };
        own.extend((0..t as u32).map(|r| (map.len() + rows.len()) as u32 + r));
        rows.extend(row..row + t as u32);
        row += t as u32;
        map.extend_from_slice(&rows);
        full.push(rows);
    }
    (map, own)
}

#[test]
fn shared_prefixes_equal_every_sequence_run_in_full() {
    for fused in [true, false] {
        for (lens, prefixes, heads, window) in cases() {
            let shared = config(&lens, prefixes.clone(), heads, window);
            let (map, own) = unshared_rows(&lens, &prefixes);
            let mut full_lens: Vec<usize> = Vec::new();
            for (i, &t) in lens.iter().enumerate() {
                let l = prefixes.get(i).copied().flatten().map_or(0, |(_, l)| l);
                full_lens.push(l + t);
            }
            let full = config(&full_lens, Vec::new(), heads, window);
            let run = |cfg: &AttentionConfig, q: &Tensor, k: &Tensor, v: &Tensor| {
                if fused {
                    attention(q, k, v, cfg).unwrap()
                } else {
                    attention_composed(q, k, v, cfg).unwrap()
                }
            };
            let inputs = qkv(&shared, 20);
            let (a, ga) = value_and_grads(&inputs, &|t| run(&shared, &t[0], &t[1], &t[2]));
            // The same tokens in full: prefix rows copied (their gradients summed back by
            // the copy's backward), only each sequence's own output rows kept.
            let (b, gb) = value_and_grads(&inputs, &|t| {
                let dev = t[0].device();
                let map = Tensor::from_slice(&map, map.len(), dev).unwrap();
                let own = Tensor::from_slice(&own, own.len(), dev).unwrap();
                let g = |x: &Tensor| x.index_select(&map, 0).unwrap();
                run(&full, &g(&t[0]), &g(&t[1]), &g(&t[2]))
                    .index_select(&own, 0)
                    .unwrap()
            });
            let what = format!("lens {lens:?} prefixes {prefixes:?} fused {fused}");
            close(&format!("{what}: value"), &a, &b, 2e-5);
            for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
                close(&format!("{what}: gradient of input {i}"), x, y, 2e-5);
            }
        }
    }
}

#[test]
fn composed_shared_prefix_gradients_equal_finite_differences() {
    let cfg = config(&[4, 3, 2], vec![None, Some((0, 3)), Some((0, 1))], (2, 1, 3), Some(3));
    gradients_match_finite_differences(
        &qkv(&cfg, 50),
        &|t| attention_composed(&t[0], &t[1], &t[2], &cfg).unwrap(),
        30,
        1e-6,
    );
}

#[test]
fn bad_prefix_tables_are_errors() {
    let heads = (2, 1, 8);
    let base = config(&[4, 3], Vec::new(), heads, None);
    let [q, k, v] = qkv(&base, 1);
    let bad: &[(Prefixes, &str)] = &[
        (vec![None], "1 prefix entries for 2 sequences"),
        (vec![None, Some((1, 2))], "sequence 1 continues 2 tokens of sequence 1"),
        (vec![None, Some((0, 5))], "of at least 5 tokens"),
        (vec![Some((1, 1)), None], "an earlier sequence"),
        (vec![None, Some((2, 1))], "of sequence 2"),
    ];
    for (prefixes, want) in bad {
        let cfg = config(&[4, 3], prefixes.clone(), heads, None);
        for err in [
            attention(&q, &k, &v, &cfg).unwrap_err().to_string(),
            attention_composed(&q, &k, &v, &cfg).unwrap_err().to_string(),
        ] {
            assert!(err.contains(want), "{prefixes:?}: {err}");
        }
    }
    // Dropout factors with a prefix.
    let mut cfg = config(&[4, 3], vec![None, Some((0, 2))], heads, None);
    cfg.keep = Some(std::sync::Arc::new(vec![1.0; 2 * (16 + 9)]));
    let err = attention(&q, &k, &v, &cfg).unwrap_err().to_string();
    assert!(err.contains("with dropout"), "{err}");
    assert!(flat(&attention(&q, &k, &v, &base).unwrap())
        .iter()
        .all(|x| x.is_finite()));
}
