use candle_core::{Device, Tensor};
use std::time::Instant;
fn t(f: impl Fn() -> Tensor, name: &str) {
    let _ = f();
    let s = Instant::now();
    for _ in 0..5 {
        let _ = f();
    }
    let dt = s.elapsed().as_secs_f64() / 5.0;
    println!(
        "{name}: {:.2} ms, {:.0} GFLOP/s",
        dt * 1e3,
        2.0 * 128.0 * 128.0 * 50257.0 / dt / 1e9
    );
}
fn main() {
    let d = &Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (128, 128), d).unwrap();
    let w = Tensor::randn(0f32, 1.0, (50257, 128), d).unwrap();
    let g = Tensor::randn(0f32, 1.0, (128, 50257), d).unwrap();
    t(|| h.matmul(&w.t().unwrap()).unwrap(), "logits h@w^T");
    t(|| g.matmul(&w).unwrap(), "dh g@w");
    t(|| g.t().unwrap().matmul(&h).unwrap(), "dw g^T@h");
    t(|| h.t().unwrap().matmul(&g).unwrap().t().unwrap(), "dw' (h^T@g)^T");
    t(|| w.matmul(&h.t().unwrap()).unwrap(), "logits^T w@h^T");
    let gt = Tensor::randn(0f32, 1.0, (50257, 128), d).unwrap();
    t(|| gt.t().unwrap().matmul(&w).unwrap(), "dh gT^T@w");
    t(|| gt.matmul(&h).unwrap(), "dw gT@h");
    t(|| w.t().unwrap().matmul(&gt).unwrap().t().unwrap(), "dh (w^T@gT)^T");
}
