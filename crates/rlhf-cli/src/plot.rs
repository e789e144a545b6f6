//! `rlhf plot RUN_DIR`: line charts (PNG) of the metrics of a run directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

/// Metrics drawn when present, in this order.
const METRICS: &[&str] = &[
    "loss",
    "eval_loss",
    "accuracy",
    "eval_accuracy",
    "margin",
    "mean_token_accuracy",
    "env/reward_mean",
    "objective/kl",
    "ppo/loss/value",
    "ppo/loss/policy",
    "objective/kl_coef",
];

/// Arguments of `rlhf plot`.
#[derive(clap::Args)]
pub struct Args {
    /// A run directory with `metrics.jsonl` (SFT, reward or PPO).
    run_dir: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    for p in plot_run(&a.run_dir)? {
        println!("{}", p.display());
    }
    Ok(())
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans (Bitstream Vera licence, see assets/DejaVuSans.LICENSE).
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// Draws every known metric of `run_dir/metrics.jsonl` against `step` into
/// `run_dir/plots/<metric>.png`; returns the files written.
pub fn plot_run(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let out_dir = run_dir.join("plots");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let title = run_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("run")
        .to_string();
    let mut written = Vec::new();
    for metric in METRICS {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*metric)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        if points.is_empty() {
            continue;
        }
        let file = out_dir.join(format!("{}.png", metric.replace('/', "_")));
        line_chart(&file, &format!("{title}: {metric}"), metric, &points)
            .with_context(|| format!("drawing {}", file.display()))?;
        written.push(file);
    }
    Ok(written)
}

/// One line chart, 800×480 PNG.
pub fn line_chart(file: &Path, title: &str, y_label: &str, points: &[(f64, f64)]) -> anyhow::Result<()> {
    register_font();
    let root = BitMapBackend::new(file, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x0, x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let (y0, y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart.configure_mesh().x_desc("step").y_desc(y_label).draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), BLUE.stroke_width(2)))?;
    if points.len() <= 60 {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
    }
    root.present()?;
    Ok(())
}
