//! The evaluator against ONNX Runtime, measured in one run: latency at
//! batch 1 and time per batch of 32, 2 threads each, medians of repeated
//! runs, in rounds that alternate between the two, and each side's fastest
//! run over all rounds. ONNX Runtime is timed
//! by tools/ort_time.py (needs `pip install onnxruntime onnx numpy`).
//!
//!   cargo bench -p qgraph --bench eval_speed [-- REPEATS]
//!   QGRAPH_BENCH_MODELS=a.onnx,b.onnx QGRAPH_BENCH_BATCHES=1 cargo bench -p qgraph --bench eval_speed

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// A runtime's times for one model and batch: the median and the fastest
/// of the repeated runs, in seconds.
#[derive(Clone, Copy)]
struct Times {
    median: f64,
    fastest: f64,
}

fn ort_times(root: &Path, model: &Path, batch: usize, repeats: usize) -> Option<Times> {
    let out = Command::new("python3")
        .arg(root.join("tools/ort_time.py"))
        .arg(model)
        .args([batch.to_string(), "2".into(), repeats.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<f64> {
        let v = text.split(&format!("\"{name}\": ")).nth(1)?;
        v.split([',', '}']).next()?.trim().parse().ok()
    };
    Some(Times {
        median: field("median_s")?,
        fastest: field("min_s")?,
    })
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let repeats: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(11);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // QGRAPH_BENCH_MODELS (paths, comma separated) replaces the two shared
    // models, for timing single layers.
    let models: Vec<PathBuf> = match std::env::var("QGRAPH_BENCH_MODELS") {
        Ok(list) => list.split(',').map(PathBuf::from).collect(),
        Err(_) => ["mobilenetv2_bn.onnx", "efficientnet_lite0_bn.onnx"]
            .iter()
            .map(|m| root.join("../shared/models").join(m))
            .collect(),
    };
    // QGRAPH_BENCH_BATCHES (comma separated) replaces batches 1 and 32.
    let batches: Vec<usize> = match std::env::var("QGRAPH_BENCH_BATCHES") {
        Ok(list) => list
            .split(',')
            .filter_map(|b| b.trim().parse().ok())
            .collect(),
        Err(_) => vec![1, 32],
    };
    // QGRAPH_BENCH_ROUNDS: alternating rounds of the two runtimes (3).
    let rounds: usize = std::env::var("QGRAPH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    // Medians show the typical run; on a shared machine whose neighbours
    // come and go, each side's fastest run over all rounds shows what the
    // code does when nothing else is running, the steadier comparison.
    println!(
        "| model | batch | qgraph ms | ONNX Runtime ms | qgraph / ORT (median; each round) | fastest runs: qgraph ms, ORT ms, ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for path in models {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !path.exists() {
            eprintln!("SKIPPED: {} is absent", path.display());
            continue;
        }
        let model = qgraph::load(&path).expect("load").model;
        // QGRAPH_BENCH_THREADS: qgraph's threads (2), to see how a kernel
        // scales; ONNX Runtime keeps 2.
        let threads: usize = std::env::var("QGRAPH_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let ev = qgraph::eval::Evaluator::with_options(
            &model,
            qgraph::eval::Options {
                threads,
                whole_batches: std::env::var("QGRAPH_BENCH_WHOLE_BATCHES").is_ok_and(|v| v == "1"),
            },
        )
        .expect("prepare");
        for &batch in &batches {
            let x = ev.example_inputs(batch).expect("inputs");
            let reps = if batch == 1 { repeats * 3 } else { repeats };
            for _ in 0..2 {
                ev.run(x.clone()).expect("run");
            }
            let ours_once = || {
                let mut times: Vec<f64> = (0..reps)
                    .map(|_| {
                        // The input is copied outside the timing, as ONNX
                        // Runtime reads its input in place.
                        let input = x.clone();
                        let t = Instant::now();
                        ev.run(input).expect("run");
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                Times {
                    median: times[times.len() / 2],
                    fastest: times[0],
                }
            };
            // QGRAPH_PROFILE=N: each row's fastest of N runs (1 for any
            // other value), steadier than the mean on a shared machine;
            // QGRAPH_PROFILE_NODES=1: a row per node rather than per kind.
            if let Ok(runs) = std::env::var("QGRAPH_PROFILE") {
                let runs: usize = runs.parse().unwrap_or(1).max(1);
                let by_node = std::env::var("QGRAPH_PROFILE_NODES").is_ok_and(|v| v == "1");
                let mut total: Vec<(String, usize, f64)> = Vec::new();
                for _ in 0..runs {
                    let rows = if by_node {
                        ev.profile_nodes(x.clone())
                    } else {
                        ev.profile(x.clone())
                    };
                    for (op, n, t) in rows.expect("profile") {
                        match total.iter_mut().find(|r| r.0 == op) {
                            Some(r) => r.2 = r.2.min(t),
                            None => total.push((op, n, t)),
                        }
                    }
                }
                total.sort_by(|a, b| b.2.total_cmp(&a.2));
                for (op, n, t) in total {
                    eprintln!(
                        "  {name} batch {batch}: {op:<20} x{n:<3} {:>8.3} ms",
                        t * 1e3
                    );
                }
            }
            // Rounds alternate between the two, so that a slow spell of a
            // shared machine weighs on both; the ratio is the median of the
            // rounds' ratios.
            let mut rows = Vec::new();
            for _ in 0..rounds {
                let ours = ours_once();
                let theirs = ort_times(&root, &path, batch, reps);
                rows.push((ours, theirs));
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let ours = median(rows.iter().map(|r| r.0.median).collect());
            // The rounds where ONNX Runtime was timed too: (qgraph, ONNX Runtime).
            let timed: Vec<(Times, Times)> =
                rows.iter().filter_map(|&(o, t)| Some((o, t?))).collect();
            if timed.len() == rows.len() {
                let ratios: Vec<f64> = timed.iter().map(|(o, t)| o.median / t.median).collect();
                let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
                let our_best = timed
                    .iter()
                    .map(|r| r.0.fastest)
                    .fold(f64::INFINITY, f64::min);
                let their_best = timed
                    .iter()
                    .map(|r| r.1.fastest)
                    .fold(f64::INFINITY, f64::min);
                println!(
                    "| {name} | {batch} | {:.2} | {:.2} | {:.2} ({}) | {:.2}, {:.2}, {:.2} |",
                    ours * 1e3,
                    median(timed.iter().map(|r| r.1.median).collect()) * 1e3,
                    median(ratios),
                    each.join(", "),
                    our_best * 1e3,
                    their_best * 1e3,
                    our_best / their_best
                );
            } else {
                println!(
                    "| {name} | {batch} | {:.2} | (ONNX Runtime unavailable) | | |",
                    ours * 1e3
                );
            }
        }
    }
}
