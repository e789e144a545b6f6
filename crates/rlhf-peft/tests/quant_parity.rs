//! Parity with bitsandbytes 0.50.2 on CPU: `fixtures/lora/int8_reference.json`, written by the
//! generator described in `fixtures/lora/README.md` part (c) (`int8_vectorwise_quant`,
//! `Linear8bitLt`, `quantize_4bit`, `Linear4bit`; torch 2.15, float32, seeded).

use candle_core::{Device, Tensor};
use rlhf_peft::int8::{quantize_activations, Int8Linear, Int8Weight};
use rlhf_peft::nf4::{dynamic_map_signed, Nf4Absmax, Nf4Linear, Nf4Weight, NF4_CODE};
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/lora/int8_reference.json");

fn fixture() -> Value {
    let text = std::fs::read_to_string(FIXTURE).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// `v[path]`, with `path` split at '/'.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('/').fold(v, |v, k| &v[k])
}

/// A (nested) list of numbers, flattened row-major; floats are f32 values stored as doubles.
fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number") as f32],
        other => panic!("not a number list: {other}"),
    }
}

fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(a) => a.iter().flat_map(ints).collect(),
        Value::Number(n) => vec![n.as_i64().expect("integer")],
        Value::Null => vec![],
        other => panic!("not an integer list: {other}"),
    }
}

fn tensor(v: &Value, rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(floats(v), (rows, cols), &Device::Cpu).expect("tensor")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

struct Inputs {
    w: Tensor,
    bias: Tensor,
    x: Tensor,
}

fn inputs(f: &Value) -> Inputs {
    Inputs {
        w: tensor(at(f, "inputs/W"), 96, 128),
        bias: Tensor::from_vec(floats(at(f, "inputs/bias")), 96, &Device::Cpu).unwrap(),
        x: tensor(at(f, "inputs/X"), 5, 128),
    }
}

#[test]
fn int8_weight_cb_scb_and_dequantized_match_bitsandbytes_exactly() {
    let f = fixture();
    let q = Int8Weight::quantize(&inputs(&f).w).unwrap();
    let cb: Vec<i64> = q.cb.iter().map(|&c| c as i64).collect();
    assert_eq!(cb, ints(at(&f, "int8_vectorwise_W/CB")));
    assert_eq!(q.scb, floats(at(&f, "int8_vectorwise_W/SCB")));
    let deq = values(&q.dequantize().unwrap());
    assert_eq!(deq, floats(at(&f, "int8_vectorwise_W/dequantized_W")));
}

#[test]
fn int8_activations_ca_sca_and_outlier_columns_match_bitsandbytes_exactly() {
    let f = fixture();
    let x = inputs(&f).x;
    for (t, key) in [(6.0, "threshold_6.0"), (0.0, "threshold_0.0")] {
        let a = quantize_activations(&x, t).unwrap();
        let r = at(&f, "int8_vectorwise_X").get(key).unwrap();
        let ca: Vec<i64> = a.ca.iter().map(|&c| c as i64).collect();
        assert_eq!(ca, ints(&r["CA"]), "CA at {key}");
        assert_eq!(a.sca, floats(&r["SCA"]), "SCA at {key}");
        let cols: Vec<i64> = a.outlier_cols.iter().map(|&c| c as i64).collect();
        assert_eq!(cols, ints(&r["outlier_cols"]), "outlier columns at {key}");
    }
    let six = quantize_activations(&x, 6.0).unwrap();
    assert_eq!(six.outlier_cols, vec![5, 100]);
}

#[test]
fn linear8bitlt_eval_output_matches_bitsandbytes_at_both_thresholds() {
    let f = fixture();
    let i = inputs(&f);
    for (t, key) in [(6.0, "threshold_6.0"), (0.0, "threshold_0.0")] {
        let lin = Int8Linear::from_dense(&i.w, Some(i.bias.clone()), t).unwrap();
        let y = values(&lin.forward_eval(&i.x).unwrap());
        let r = at(&f, "linear8bitlt").get(key).unwrap();
        let d = max_abs_diff(&y, &floats(&r["output_eval"]));
        println!("Linear8bitLt eval {key}: max |diff| {d:e}");
        assert!(d < 1e-5, "eval output at {key} differs by {d}");
    }
}

#[test]
fn linear8bitlt_train_mode_cpu_output_matches_bitsandbytes() {
    let f = fixture();
    let i = inputs(&f);
    for (t, key) in [(6.0, "threshold_6.0"), (0.0, "threshold_0.0")] {
        let lin = Int8Linear::from_dense(&i.w, Some(i.bias.clone()), t).unwrap();
        let y = values(&lin.forward(&i.x).unwrap());
        let r = at(&f, "linear8bitlt").get(key).unwrap();
        let d = max_abs_diff(&y, &floats(&r["output_train_mode_cpu"]));
        println!("Linear8bitLt train {key}: max |diff| {d:e}");
        assert!(d < 1e-5, "train-mode output at {key} differs by {d}");
    }
}

#[test]
fn int8_forward_accepts_batch_and_time_dimensions() {
    let f = fixture();
    let i = inputs(&f);
    let lin = Int8Linear::from_dense(&i.w, Some(i.bias.clone()), 6.0).unwrap();
    let x3 = Tensor::cat(&[&i.x, &i.x], 0).unwrap().reshape((2, 5, 128)).unwrap();
    for y3 in [lin.forward(&x3).unwrap(), lin.forward_eval(&x3).unwrap()] {
        assert_eq!(y3.dims(), &[2, 5, 96]);
    }
    let y2 = values(&lin.forward(&i.x).unwrap());
    let y3 = values(&lin.forward(&x3).unwrap());
    assert_eq!(&y3[..y2.len()], &y2[..]);
    assert_eq!(&y3[y2.len()..], &y2[..]);
}

#[test]
fn nf4_code_and_dynamic_map_equal_the_bitsandbytes_tables() {
    let f = fixture();
    let nf4 = "nf4/compress_statistics_false/code";
    assert_eq!(NF4_CODE.to_vec(), floats(at(&f, nf4)));
    let dynamic = "nf4/compress_statistics_true/state2/code";
    assert_eq!(dynamic_map_signed().to_vec(), floats(at(&f, dynamic)));
}

#[test]
fn nf4_packed_absmax_and_dequantized_match_bitsandbytes_exactly() {
    let f = fixture();
    let q = Nf4Weight::quantize(&inputs(&f).w, 64, false).unwrap();
    let r = at(&f, "nf4/compress_statistics_false");
    let packed: Vec<i64> = q.packed.iter().map(|&b| b as i64).collect();
    assert_eq!(packed, ints(&r["packed"]));
    let Nf4Absmax::Plain(absmax) = &q.absmax else {
        panic!("plain absmax expected")
    };
    assert_eq!(absmax, &floats(&r["absmax"]));
    assert_eq!(values(&q.dequantize().unwrap()), floats(&r["dequantized"]));
}

#[test]
fn nf4_double_quant_matches_bitsandbytes_exactly() {
    let f = fixture();
    let q = Nf4Weight::quantize(&inputs(&f).w, 64, true).unwrap();
    let r = at(&f, "nf4/compress_statistics_true");
    let packed: Vec<i64> = q.packed.iter().map(|&b| b as i64).collect();
    assert_eq!(packed, ints(&r["packed"]));
    let Nf4Absmax::Nested(n) = &q.absmax else {
        panic!("nested absmax expected")
    };
    assert_eq!(n.offset, floats(&r["offset"])[0], "offset");
    assert_eq!(n.absmax2, floats(at(r, "state2/absmax")), "state2.absmax");
    let qa: Vec<i64> = n.quantized.iter().map(|&b| b as i64).collect();
    assert_eq!(qa, ints(&r["absmax_quantized_uint8"]), "absmax_quantized_uint8");
    assert_eq!(q.absmax_values(), floats(&r["absmax_dequantized"]));
    assert_eq!(values(&q.dequantize().unwrap()), floats(&r["dequantized"]));
}

#[test]
fn linear4bit_output_matches_bitsandbytes() {
    let f = fixture();
    let i = inputs(&f);
    let lin = Nf4Linear::from_dense(&i.w, Some(i.bias.clone()), 64, false).unwrap();
    let y = values(&lin.forward(&i.x).unwrap());
    let d = max_abs_diff(&y, &floats(at(&f, "linear4bit_nf4/output")));
    println!("Linear4bit: max |diff| {d:e}");
    assert!(d < 1e-5, "Linear4bit output differs by {d}");
}

/// Timing, not parity: `cargo test -p rlhf-peft --release --test quant_parity -- --ignored
/// --nocapture`. Prints the median of 5 runs for a GPT-2 c_attn-sized product.
#[test]
#[ignore]
fn quantized_forward_speed_against_plain_f32_matmul() {
    use std::time::Instant;
    let (n, k, out) = (512, 768, 2304);
    let x = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.05, (out, k), &Device::Cpu).unwrap();
    let int8 = Int8Linear::from_dense(&w, None, 6.0).unwrap();
    let nf4 = Nf4Linear::from_dense(&w, None, 64, true).unwrap();
    let wt = w.t().unwrap();
    let time = |name: &str, f: &dyn Fn() -> Tensor| {
        f();
        let mut ms: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        println!("{name:<28} {:8.2} ms", ms[2]);
    };
    time("f32 candle x.matmul(W^T)", &|| x.matmul(&wt).unwrap());
    time("Int8Linear::forward", &|| int8.forward(&x).unwrap());
    time("Int8Linear::forward_eval", &|| int8.forward_eval(&x).unwrap());
    time("Nf4Linear::forward", &|| nf4.forward(&x).unwrap());
    let r = Tensor::randn(0f32, 1.0, (n, out), &Device::Cpu).unwrap();
    time("f32 backward dY.matmul(W)", &|| r.matmul(&w).unwrap());
    time("f32 forward+backward", &|| {
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let loss = (xv.as_tensor().matmul(&wt).unwrap() * &r).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(&xv).unwrap().clone()
    });
    time("Int8 forward+backward", &|| {
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let loss = (int8.forward(xv.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(&xv).unwrap().clone()
    });
}
