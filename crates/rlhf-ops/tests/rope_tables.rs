//! RoPE frequencies and cos/sin tables equal transformers 5.25's for every rope_type
//! (`fixtures/rope/rope_tables.json`, made by `fixtures/rope/make_rope_fixture.py`), and
//! dynamic NTK scaling follows `dynamic_rope_update` across calls.

use rlhf_ops::rope::{Rope, RopeConfig, RopeScaling};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/rope/rope_tables.json");
    let text = std::fs::read_to_string(path).expect("fixtures/rope/rope_tables.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// The v5 `rope_parameters` dict as a [`RopeScaling`] (what a config parser does).
fn scaling(p: &Value) -> RopeScaling {
    let f = |k: &str| p.get(k).and_then(Value::as_f64);
    let u = |k: &str| p.get(k).and_then(Value::as_u64).map(|v| v as usize);
    match p["rope_type"].as_str().expect("rope_type") {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: f("factor").unwrap(),
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: f("factor").unwrap(),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor").unwrap(),
            low_freq_factor: f("low_freq_factor").unwrap(),
            high_freq_factor: f("high_freq_factor").unwrap(),
            original_max_position_embeddings: u("original_max_position_embeddings").unwrap(),
        },
        "yarn" => RopeScaling::Yarn {
            factor: f("factor"),
            original_max_position_embeddings: u("original_max_position_embeddings").unwrap(),
            beta_fast: f("beta_fast"),
            beta_slow: f("beta_slow"),
            mscale: f("mscale"),
            mscale_all_dim: f("mscale_all_dim"),
            attention_factor: f("attention_factor"),
            truncate: p.get("truncate").and_then(Value::as_bool),
        },
        other => panic!("rope_type {other} not in the fixture's set"),
    }
}

fn config(case: &Value, params: &Value) -> RopeConfig {
    RopeConfig {
        head_dim: case["head_dim"].as_u64().unwrap() as usize,
        rope_theta: params["rope_theta"].as_f64().unwrap(),
        max_position_embeddings: case["max_position_embeddings"].as_u64().unwrap() as usize,
        scaling: scaling(params),
    }
}

/// Element-wise `|a − b| ≤ rel·|b| + abs`.
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs() + abs,
            "{what}[{i}]: {g} vs transformers {w}"
        );
    }
}

fn positions(case: &Value) -> Vec<u32> {
    case["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect()
}

/// inv_freq within 2 ulp (torch's f32 `pow` and ours may round differently); cos/sin within
/// 2e-6 absolute (the same f32 angle `pos · inv_freq`, each side rounding cos to within an
/// ulp — an inv_freq an ulp apart moves the angle of position 131071 by up to ~1e-2 rad, so
/// the tables are compared from transformers' own inv_freq too).
#[test]
fn frequencies_and_tables_equal_transformers_for_every_rope_type() {
    let fx = fixture();
    let cases = fx["static"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = config(case, &case["resolved_rope_parameters"]);
        let freqs = cfg.frequencies().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_close(
            &format!("{name} inv_freq"),
            &freqs.inv_freq,
            &floats(&case["inv_freq"]),
            2.5e-7,
            0.0,
        );
        let want_scale = case["attention_scaling"].as_f64().unwrap() as f32;
        assert!(
            (freqs.attention_scaling - want_scale).abs() <= 1e-7,
            "{name} attention_scaling {} vs {want_scale}",
            freqs.attention_scaling
        );
        // Tables from transformers' own frequencies: the table arithmetic alone.
        let theirs = rlhf_ops::rope::RopeFrequencies {
            inv_freq: floats(&case["inv_freq"]),
            attention_scaling: want_scale,
        };
        let pos = positions(case);
        let (cos, sin) = theirs.tables(&pos);
        assert_close(&format!("{name} cos"), &cos, &floats(&case["cos"]), 0.0, 2e-6);
        assert_close(&format!("{name} sin"), &sin, &floats(&case["sin"]), 0.0, 2e-6);
        // And end to end, where positions are small enough for an ulp of inv_freq not to
        // matter (|Δangle| ≤ pos · 2 ulp(inv_freq)).
        let (cos, sin) = freqs.tables(&pos);
        let max_pos = *pos.iter().max().unwrap() as f32;
        let tol = 2e-6 + max_pos * 2.5e-7;
        assert_close(&format!("{name} cos (ours)"), &cos, &floats(&case["cos"]), 0.0, tol);
        assert_close(&format!("{name} sin (ours)"), &sin, &floats(&case["sin"]), 0.0, tol);
    }
}

#[test]
fn dynamic_ntk_follows_transformers_across_calls() {
    let fx = fixture();
    let dy = &fx["dynamic"];
    let mut rope = Rope::new(config(dy, &dy["rope_parameters"])).unwrap();
    for call in dy["calls"].as_array().unwrap() {
        let seq_len = call["seq_len"].as_u64().unwrap() as usize;
        rope.update(seq_len).unwrap();
        let f = rope.frequencies();
        assert_close(
            &format!("dynamic after {seq_len}: inv_freq"),
            &f.inv_freq,
            &floats(&call["inv_freq"]),
            2.5e-7,
            0.0,
        );
        let (cos, sin) = f.tables(&positions(call));
        assert_close(
            &format!("dynamic {seq_len} cos"),
            &cos,
            &floats(&call["cos"]),
            0.0,
            1e-5,
        );
        assert_close(
            &format!("dynamic {seq_len} sin"),
            &sin,
            &floats(&call["sin"]),
            0.0,
            1e-5,
        );
    }
}

#[test]
fn dynamic_equals_default_up_to_max_position_embeddings() {
    let cfg = |scaling| RopeConfig {
        head_dim: 64,
        rope_theta: 10_000.0,
        max_position_embeddings: 128,
        scaling,
    };
    let dynamic = cfg(RopeScaling::Dynamic { factor: 4.0 });
    let default = cfg(RopeScaling::Default).frequencies().unwrap();
    assert_eq!(dynamic.frequencies().unwrap(), default);
    assert_eq!(dynamic.frequencies_at(Some(128)).unwrap(), default);
    assert_ne!(dynamic.frequencies_at(Some(129)).unwrap(), default);
}

#[test]
fn bad_rope_parameters_are_errors_that_name_the_type() {
    let base = RopeConfig {
        head_dim: 16,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        scaling: RopeScaling::Default,
    };
    let odd = RopeConfig {
        head_dim: 15,
        ..base.clone()
    };
    assert!(odd.frequencies().unwrap_err().to_string().contains("head_dim 15"));
    let bad = RopeConfig {
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 64,
        },
        ..base.clone()
    };
    let err = bad.frequencies().unwrap_err().to_string();
    assert!(err.contains("llama3") && err.contains("hint"), "{err}");
    let zero = RopeConfig {
        scaling: RopeScaling::Linear { factor: 0.0 },
        ..base
    };
    assert!(zero.frequencies().unwrap_err().to_string().contains("linear"));
}

#[test]
fn table_rows_are_per_token_and_repeat_each_half() {
    let cfg = RopeConfig {
        head_dim: 8,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        scaling: RopeScaling::Default,
    };
    let f = cfg.frequencies().unwrap();
    // Left-padded rows keep their own positions: the same position gives the same row.
    let (cos, sin) = f.tables(&[1, 0, 0, 1, 2, 0, 1, 2]);
    for (a, b) in [(0, 3), (1, 2), (4, 7)] {
        assert_eq!(cos[a * 8..a * 8 + 8], cos[b * 8..b * 8 + 8]);
        assert_eq!(sin[a * 8..a * 8 + 8], sin[b * 8..b * 8 + 8]);
    }
    for r in 0..8 {
        assert_eq!(cos[r * 8..r * 8 + 4], cos[r * 8 + 4..r * 8 + 8]);
        assert_eq!(sin[r * 8..r * 8 + 4], sin[r * 8 + 4..r * 8 + 8]);
    }
    // Position 0: cos 1, sin 0.
    assert!(cos[8..16].iter().all(|&c| c == 1.0) && sin[8..16].iter().all(|&s| s == 0.0));
}
