//! The evaluator against ONNX Runtime, measured in one run: latency at
//! batch 1 and time per batch of 32, 2 threads each, in short blocks of runs
//! that alternate between the two (3 runs at batch 1, 1 at batch 32), so
//! that a slow spell of a shared machine falls on both sides of a block; the
//! ratio is the median over blocks of each block's fastest runs' ratio.
//! ONNX Runtime runs in one child process per model and batch,
//! tools/ort_time.py in its `serve` mode (needs `pip install onnxruntime
//! onnx numpy`).
//!
//!   cargo bench -p qgraph --bench eval_speed [-- BLOCKS]
//!   QGRAPH_BENCH_MODELS=a.onnx,b.onnx QGRAPH_BENCH_BATCHES=1 cargo bench -p qgraph --bench eval_speed

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

/// ONNX Runtime in a child process that times blocks of runs on request.
struct OrtServer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl OrtServer {
    /// None when Python, ONNX Runtime or the model cannot be loaded.
    fn start(root: &Path, model: &Path, batch: usize) -> Option<OrtServer> {
        let mut child = Command::new("python3")
            .arg(root.join("tools/ort_time.py"))
            .arg(model)
            .args([batch.to_string(), "2".into(), "serve".into()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take()?);
        let mut line = String::new();
        stdout.read_line(&mut line).ok()?;
        let server = OrtServer {
            child,
            stdin,
            stdout,
        };
        (line.trim() == "ready").then_some(server)
    }

    /// The seconds of `count` runs, one after another.
    fn runs(&mut self, count: usize) -> Option<Vec<f64>> {
        let stdin = self.stdin.as_mut()?;
        writeln!(stdin, "{count}").ok()?;
        stdin.flush().ok()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).ok()?;
        let times: Vec<f64> = line
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(|t| t.trim().parse().ok())
            .collect::<Option<_>>()?;
        (times.len() == count).then_some(times)
    }
}

impl Drop for OrtServer {
    fn drop(&mut self) {
        // Closing its input ends the server's loop.
        self.stdin.take();
        let _ = self.child.wait();
    }
}

fn fastest(times: &[f64]) -> f64 {
    times.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The value at quantile `q` (0 to 1) of `values`, nearest rank.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    // Blocks per model and batch (QGRAPH_BENCH_BLOCKS, or the argument).
    let blocks: usize = args
        .first()
        .cloned()
        .or_else(|| std::env::var("QGRAPH_BENCH_BLOCKS").ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(25)
        .max(1);
    // QGRAPH_BENCH_PAUSE_MS: the pause before each block (50 ms).
    let pause = std::time::Duration::from_millis(
        std::env::var("QGRAPH_BENCH_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50),
    );
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
    // Medians show the typical run; each side's fastest run shows what the
    // code does when nothing else is running; the blocks' ratios compare the
    // two under the same load.
    println!(
        "| model | batch | qgraph ms | ONNX Runtime ms | qgraph / ORT (median of blocks; quartiles) | fastest runs: qgraph ms, ORT ms, ratio |"
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
            let block = if batch == 1 { 3 } else { 1 };
            for _ in 0..2 {
                ev.run(x.clone()).expect("run");
            }
            let ours_block = || -> Vec<f64> {
                (0..block)
                    .map(|_| {
                        // The input is copied outside the timing, as ONNX
                        // Runtime reads its input in place.
                        let input = x.clone();
                        let t = Instant::now();
                        ev.run(input).expect("run");
                        t.elapsed().as_secs_f64()
                    })
                    .collect()
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
            let mut ort = OrtServer::start(&root, &path, batch);
            let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..blocks {
                // Each side's block starts after a pause: ONNX Runtime's
                // workers spin for a while after its runs, and would take
                // the cores from the first of ours.
                std::thread::sleep(pause);
                let our_block = ours_block();
                std::thread::sleep(pause);
                if let Some(their_block) = ort.as_mut().and_then(|o| o.runs(block)) {
                    ratios.push(fastest(&our_block) / fastest(&their_block));
                    theirs.extend(their_block);
                } else {
                    ort = None;
                }
                ours.extend(our_block);
            }
            if ratios.len() == blocks {
                println!(
                    "| {name} | {batch} | {:.2} | {:.2} | {:.2} ({:.2} to {:.2}) | {:.2}, {:.2}, {:.2} |",
                    quantile(&ours, 0.5) * 1e3,
                    quantile(&theirs, 0.5) * 1e3,
                    quantile(&ratios, 0.5),
                    quantile(&ratios, 0.25),
                    quantile(&ratios, 0.75),
                    fastest(&ours) * 1e3,
                    fastest(&theirs) * 1e3,
                    fastest(&ours) / fastest(&theirs)
                );
            } else {
                println!(
                    "| {name} | {batch} | {:.2} | (ONNX Runtime unavailable) | | |",
                    quantile(&ours, 0.5) * 1e3
                );
            }
        }
    }
}
