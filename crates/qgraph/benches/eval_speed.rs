//! The evaluator against ONNX Runtime, measured in one run: latency at
//! batch 1 and time per batch of 32, 2 threads each, medians of repeated
//! runs, in rounds that alternate between the two. ONNX Runtime is timed
//! by tools/ort_time.py (needs `pip install onnxruntime onnx numpy`).
//!
//!   cargo bench -p qgraph --bench eval_speed [-- REPEATS]
//!   QGRAPH_BENCH_MODELS=a.onnx,b.onnx QGRAPH_BENCH_BATCHES=1 cargo bench -p qgraph --bench eval_speed

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn ort_seconds(root: &Path, model: &Path, batch: usize, repeats: usize) -> Option<f64> {
    let out = Command::new("python3")
        .arg(root.join("tools/ort_time.py"))
        .arg(model)
        .args([batch.to_string(), "2".into(), repeats.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split("\"median_s\": ").nth(1)?;
    v.trim().trim_end_matches('}').parse().ok()
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
    println!("| model | batch | qgraph ms | ONNX Runtime ms | qgraph / ORT (median; each round) |");
    println!("|---|---:|---:|---:|---:|");
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
                times[times.len() / 2]
            };
            // QGRAPH_PROFILE=N: the mean over N runs (1 for any other value);
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
                            Some(r) => r.2 += t,
                            None => total.push((op, n, t)),
                        }
                    }
                }
                total.sort_by(|a, b| b.2.total_cmp(&a.2));
                for (op, n, t) in total {
                    eprintln!(
                        "  {name} batch {batch}: {op:<20} x{n:<3} {:>8.3} ms",
                        t * 1e3 / runs as f64
                    );
                }
            }
            // Rounds alternate between the two, so that a slow spell of a
            // shared machine weighs on both; the ratio is the median of the
            // rounds' ratios.
            let mut rows = Vec::new();
            for _ in 0..rounds {
                let ours = ours_once();
                let theirs = ort_seconds(&root, &path, batch, reps);
                rows.push((ours, theirs));
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let ours = median(rows.iter().map(|r| r.0).collect());
            if rows.iter().all(|r| r.1.is_some()) {
                let theirs = median(rows.iter().filter_map(|r| r.1).collect());
                let ratio = median(rows.iter().map(|r| r.0 / r.1.unwrap_or(1.0)).collect());
                let each: Vec<String> = rows
                    .iter()
                    .map(|r| format!("{:.2}", r.0 / r.1.unwrap_or(1.0)))
                    .collect();
                println!(
                    "| {name} | {batch} | {:.2} | {:.2} | {ratio:.2} ({}) |",
                    ours * 1e3,
                    theirs * 1e3,
                    each.join(", ")
                );
            } else {
                println!(
                    "| {name} | {batch} | {:.2} | (ONNX Runtime unavailable) | |",
                    ours * 1e3
                );
            }
        }
    }
}
