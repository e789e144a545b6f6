use super::*;

#[test]
fn decay_skips_biases_and_layer_norms() {
    assert!(decays("transformer.h.0.attn.c_attn.weight"));
    assert!(decays("score.weight"));
    assert!(!decays("transformer.h.0.attn.c_attn.bias"));
    assert!(!decays("transformer.h.0.ln_1.weight"));
    assert!(!decays("transformer.ln_f.weight"));
}

#[test]
fn adam_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
    // With bias correction, step 1 is p -= lr * g / (|g| + eps) ≈ lr * sign(g).
    let var = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamConfig::default());
    let grads = Grads {
        sums: vec![Some(vec![0.5, -4.0, 0.0])],
    };
    opt.step(&grads, 0.1).unwrap();
    let p = var.as_tensor().to_vec1::<f32>().unwrap();
    assert!(
        (p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6 && p[2] == 3.0,
        "{p:?}"
    );
}

#[test]
fn adamw_matches_torch_over_three_steps() {
    // torch.optim.AdamW([p], lr=0.01, weight_decay=0.1) with grads g_t = [t, -t/2]:
    let var = Var::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
    let cfg = AdamConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg);
    let (mut p, mut m, mut v) = ([0.5f64, -1.0], [0.0f64; 2], [0.0f64; 2]);
    for t in 1..=3 {
        let g = [t as f64, -(t as f64) / 2.0];
        opt.step(
            &Grads {
                sums: vec![Some(g.iter().map(|&x| x as f32).collect())],
            },
            0.01,
        )
        .unwrap();
        for i in 0..2 {
            p[i] *= 1.0 - 0.01 * 0.1;
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
            let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            p[i] -= 0.01 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
        }
    }
    let got = var.as_tensor().to_vec1::<f32>().unwrap();
    for i in 0..2 {
        assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
    }
}

#[test]
fn in_place_adam_equals_the_copying_oracle_bit_for_bit() {
    let n = 3 * CHUNK + 17;
    let init: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let cfg = AdamConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let (a, b) = (
        Var::new(init.as_slice(), &Device::Cpu).unwrap(),
        Var::new(init.as_slice(), &Device::Cpu).unwrap(),
    );
    let mut fast = AdamW::new(vec![("w".into(), a.clone())], cfg.clone());
    let mut slow = AdamW::new(vec![("w".into(), b.clone())], cfg);
    for t in 0..4 {
        let g: Vec<f32> = (0..n).map(|i| (((i + t) * 53 % 97) as f32 - 48.0) / 10.0).collect();
        let grads = Grads { sums: vec![Some(g)] };
        fast.step(&grads, 1e-2).unwrap();
        slow.step_copying(&grads, 1e-2).unwrap();
    }
    assert_eq!(
        a.as_tensor().to_vec1::<f32>().unwrap(),
        b.as_tensor().to_vec1::<f32>().unwrap()
    );
    assert_eq!(fast.slots[0].m, slow.slots[0].m);
    assert_eq!(fast.slots[0].v, slow.slots[0].v);
}

#[test]
fn device_moments_follow_the_host_update_and_round_trip() {
    let n = 2 * CHUNK + 5;
    let init: Vec<f32> = (0..n).map(|i| ((i * 29 % 89) as f32 - 44.0) / 20.0).collect();
    let cfg = AdamConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let (a, b) = (
        Var::new(init.as_slice(), &Device::Cpu).unwrap(),
        Var::new(init.as_slice(), &Device::Cpu).unwrap(),
    );
    let mut host = AdamW::new(vec![("w".into(), a.clone())], cfg.clone());
    let mut dev = AdamW::with_device_state(vec![("w".into(), b.clone())], cfg.clone());
    assert!(dev.slots[0].on_device.is_some() && dev.slots[0].m.is_empty());
    for t in 0..4 {
        let g: Vec<f32> = (0..n).map(|i| (((i + t) * 41 % 83) as f32 - 40.0) / 10.0).collect();
        let grads = Grads { sums: vec![Some(g)] };
        host.step(&grads, 1e-2).unwrap();
        dev.step(&grads, 1e-2).unwrap();
    }
    // Same formula; f64 scalars in the tensor ops against f32 in the fused loop.
    let (pa, pb) = (
        a.as_tensor().to_vec1::<f32>().unwrap(),
        b.as_tensor().to_vec1::<f32>().unwrap(),
    );
    let diff = pa.iter().zip(&pb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-6, "{diff}");
    let (sa, sb) = (host.state().unwrap(), dev.state().unwrap());
    for k in ["w.exp_avg", "w.exp_avg_sq"] {
        let (x, y) = (sa[k].to_vec1::<f32>().unwrap(), sb[k].to_vec1::<f32>().unwrap());
        let d = x
            .iter()
            .zip(&y)
            .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
            .fold(0.0f32, f32::max);
        assert!(d < 1e-6, "{k}: {d}");
    }
    let mut back = AdamW::with_device_state(vec![("w".into(), b)], cfg);
    back.load_state(&sb).unwrap();
    assert_eq!(
        back.state().unwrap()["w.exp_avg"].to_vec1::<f32>().unwrap(),
        sb["w.exp_avg"].to_vec1::<f32>().unwrap()
    );
}

#[test]
fn clipping_scales_to_max_norm_and_reports_the_norm_before() {
    let mut g = Grads {
        sums: vec![Some(vec![3.0, 4.0]), None],
    };
    let norm = g.clip(1.0);
    assert!((norm - 5.0).abs() < 1e-9);
    assert!((g.norm() - 1.0).abs() < 1e-5);
}

#[test]
fn linear_schedule_warms_up_then_decays_to_zero() {
    let s = LinearSchedule { warmup: 2, total: 6 };
    let f: Vec<f64> = (0..7).map(|k| s.factor(k)).collect();
    assert_eq!(f, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]);
}

#[test]
fn state_round_trips() {
    let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamConfig::default());
    opt.step(
        &Grads {
            sums: vec![Some(vec![0.1, 0.2])],
        },
        0.1,
    )
    .unwrap();
    let st = opt.state().unwrap();
    let mut other = AdamW::new(vec![("w".into(), var)], AdamConfig::default());
    other.load_state(&st).unwrap();
    assert_eq!(other.steps(), 1);
    assert_eq!(other.slots[0].m, opt.slots[0].m);
}
