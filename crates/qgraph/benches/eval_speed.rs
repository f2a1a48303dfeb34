//! The evaluator against ONNX Runtime, measured in one run: latency at
//! batch 1 and time per batch of 32, 2 threads each, in short blocks of runs
//! that alternate between the two (3 runs at batch 1, 1 at batch 32), so
//! that a slow spell of a shared machine falls on both sides of a block; the
//! ratio is the median over blocks of each block's fastest runs' ratio.
//! ONNX Runtime runs in one child process per model and batch,
//! tools/ort_time.py in its `serve` mode (needs `pip install onnxruntime
//! onnx numpy`).
//!
//! A second table times a transformer encoder (MiniLM-L6, int64 token
//! inputs) at batch 1 and 32 and sequence 64 and 128, on real sentences, and
//! profiles both runtimes' operators at each size (see `transformer`).
//!
//!   cargo bench -p qgraph --bench eval_speed [-- BLOCKS]
//!   QGRAPH_BENCH_MODELS=a.onnx,b.onnx QGRAPH_BENCH_BATCHES=1 cargo bench -p qgraph --bench eval_speed
//!   QGRAPH_BENCH_SUITE=transformer cargo bench -p qgraph --bench eval_speed   (or cnn; both by default)

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, NpzWriter};
use qgraph::eval::Evaluator;
use qgraph::ir::Tensor;
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
    /// None when Python, ONNX Runtime or the model cannot be loaded. With
    /// `feeds` (an .npz, one array per input by name) ONNX Runtime runs on
    /// those; without, on its own seeded random f32 input of batch `batch`.
    fn start(root: &Path, model: &Path, batch: usize, feeds: Option<&Path>) -> Option<OrtServer> {
        let mut command = Command::new("python3");
        command
            .arg(root.join("tools/ort_time.py"))
            .arg(model)
            .args([batch.to_string(), "2".into(), "serve".into()]);
        if let Some(feeds) = feeds {
            command.arg("--inputs").arg(feeds);
        }
        let mut child = command
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

/// What the bench reads from its environment.
struct Settings {
    /// Blocks per model and size.
    blocks: usize,
    /// The pause before each side's block.
    pause: std::time::Duration,
    /// qgraph's worker threads (ONNX Runtime keeps 2).
    threads: usize,
    root: PathBuf,
}

/// One size's comparison: all runs' seconds of each side, and each block's
/// ratio of the two sides' fastest runs (empty without ONNX Runtime).
struct Compared {
    ours: Vec<f64>,
    theirs: Vec<f64>,
    ratios: Vec<f64>,
}

/// Times `ev` on `x` against ONNX Runtime (started with `ort`), in
/// alternating blocks of `block` runs each.
fn compare(
    settings: &Settings,
    ev: &Evaluator,
    x: &[Tensor],
    block: usize,
    mut ort: Option<OrtServer>,
) -> Compared {
    for _ in 0..2 {
        ev.run(x.to_vec()).expect("run");
    }
    let ours_block = || -> Vec<f64> {
        (0..block)
            .map(|_| {
                // The input is copied outside the timing, as ONNX
                // Runtime reads its input in place.
                let input = x.to_vec();
                let t = Instant::now();
                ev.run(input).expect("run");
                t.elapsed().as_secs_f64()
            })
            .collect()
    };
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..settings.blocks {
        // Each side's block starts after a pause: ONNX Runtime's
        // workers spin for a while after its runs, and would take
        // the cores from the first of ours.
        std::thread::sleep(settings.pause);
        let our_block = ours_block();
        std::thread::sleep(settings.pause);
        if let Some(their_block) = ort.as_mut().and_then(|o| o.runs(block)) {
            ratios.push(fastest(&our_block) / fastest(&their_block));
            theirs.extend(their_block);
        } else {
            ort = None;
        }
        ours.extend(our_block);
    }
    if ratios.len() != settings.blocks {
        ratios.clear();
    }
    Compared {
        ours,
        theirs,
        ratios,
    }
}

impl Compared {
    /// The table's columns after the size's own: medians, the blocks'
    /// ratio with its quartiles, and the fastest runs.
    fn columns(&self) -> String {
        if self.ratios.is_empty() {
            return format!(
                "{:.2} | (ONNX Runtime unavailable) | | |",
                quantile(&self.ours, 0.5) * 1e3
            );
        }
        format!(
            "{:.2} | {:.2} | {:.2} ({:.2} to {:.2}) | {:.2}, {:.2}, {:.2} |",
            quantile(&self.ours, 0.5) * 1e3,
            quantile(&self.theirs, 0.5) * 1e3,
            quantile(&self.ratios, 0.5),
            quantile(&self.ratios, 0.25),
            quantile(&self.ratios, 0.75),
            fastest(&self.ours) * 1e3,
            fastest(&self.theirs) * 1e3,
            fastest(&self.ours) / fastest(&self.theirs)
        )
    }
}

/// Per operator (or per node with QGRAPH_PROFILE_NODES=1), each row's
/// fastest of `runs` profiled runs, slowest first.
fn profile(ev: &Evaluator, x: &[Tensor], runs: usize) -> Vec<(String, usize, f64)> {
    let by_node = std::env::var("QGRAPH_PROFILE_NODES").is_ok_and(|v| v == "1");
    let mut total: Vec<(String, usize, f64)> = Vec::new();
    for _ in 0..runs.max(1) {
        let rows = if by_node {
            ev.profile_nodes(x.to_vec())
        } else {
            ev.profile(x.to_vec())
        };
        for (op, n, t) in rows.expect("profile") {
            match total.iter_mut().find(|r| r.0 == op) {
                Some(r) => r.2 = r.2.min(t),
                None => total.push((op, n, t)),
            }
        }
    }
    total.sort_by(|a, b| b.2.total_cmp(&a.2));
    total
}

fn evaluator<'m>(settings: &Settings, model: &'m qgraph::ir::Model) -> Evaluator<'m> {
    Evaluator::with_options(
        model,
        qgraph::eval::Options {
            threads: settings.threads,
            whole_batches: std::env::var("QGRAPH_BENCH_WHOLE_BATCHES").is_ok_and(|v| v == "1"),
        },
    )
    .expect("prepare")
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let settings = Settings {
        // Blocks per model and batch (QGRAPH_BENCH_BLOCKS, or the argument).
        blocks: args
            .first()
            .cloned()
            .or_else(|| std::env::var("QGRAPH_BENCH_BLOCKS").ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(25)
            .max(1),
        // QGRAPH_BENCH_PAUSE_MS: the pause before each block (50 ms).
        pause: std::time::Duration::from_millis(
            std::env::var("QGRAPH_BENCH_PAUSE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(50),
        ),
        // QGRAPH_BENCH_THREADS: qgraph's threads (2), to see how a kernel
        // scales; ONNX Runtime keeps 2.
        threads: std::env::var("QGRAPH_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
        root: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
    };
    // QGRAPH_BENCH_SUITE: cnn, transformer, or both (the default).
    let suite = std::env::var("QGRAPH_BENCH_SUITE").unwrap_or_default();
    if suite != "transformer" {
        cnn(&settings);
    }
    if suite != "cnn" {
        transformer(&settings);
    }
}

/// Image models on synthetic f32 input, batch 1 and 32.
fn cnn(settings: &Settings) {
    let root = &settings.root;
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
        let ev = evaluator(settings, &model);
        for &batch in &batches {
            let x = ev.example_inputs(batch).expect("inputs");
            // QGRAPH_PROFILE=N: each row's fastest of N runs (1 for any
            // other value), steadier than the mean on a shared machine;
            // QGRAPH_PROFILE_NODES=1: a row per node rather than per kind.
            if let Ok(runs) = std::env::var("QGRAPH_PROFILE") {
                for (op, n, t) in profile(&ev, &x, runs.parse().unwrap_or(1)) {
                    eprintln!(
                        "  {name} batch {batch}: {op:<20} x{n:<3} {:>8.3} ms",
                        t * 1e3
                    );
                }
            }
            let ort = OrtServer::start(root, &path, batch, None);
            let block = if batch == 1 { 3 } else { 1 };
            let row = compare(settings, &ev, &x, block, ort);
            println!("| {name} | {batch} | {}", row.columns());
        }
    }
}

/// The token arrays of a sentence set, by input name: `[sentences, length]`
/// int64 each.
fn read_tokens(path: &Path) -> Vec<(String, ArrayD<i64>)> {
    let file = std::fs::File::open(path).expect("open the sentences");
    let mut npz = NpzReader::new(file).expect("an .npz file");
    let names = npz.names().expect("entry names");
    names
        .into_iter()
        .map(|name| {
            let a = npz
                .by_name::<OwnedRepr<i64>, IxDyn>(&name)
                .expect("int64 token arrays");
            assert_eq!(a.ndim(), 2, "{name}: [sentences, length] expected");
            (name.trim_end_matches(".npy").to_string(), a)
        })
        .collect()
}

/// The inputs for `batch` sentences of `seq` tokens: row `r` is sentence
/// `r` (cycling through the set); a longer sequence than the set's is
/// padded as the tokenizer pads (id 0, mask 0, type 0), a shorter one cut.
/// Still valid either way: ids from the vocabulary, a mask of 1s and 0s.
fn token_inputs(
    tokens: &[(String, ArrayD<i64>)],
    names: &[String],
    batch: usize,
    seq: usize,
) -> Vec<(String, ArrayD<i64>)> {
    names
        .iter()
        .map(|name| {
            let Some((_, a)) = tokens.iter().find(|(n, _)| n == name) else {
                panic!("the sentences have no array '{name}'")
            };
            let (count, len) = (a.shape()[0], a.shape()[1]);
            let x = ArrayD::from_shape_fn(IxDyn(&[batch, seq]), |i| {
                if i[1] < len {
                    a[[i[0] % count, i[1]]]
                } else {
                    0
                }
            });
            (name.clone(), x)
        })
        .collect()
}

/// A transformer encoder on real token inputs, both runtimes on the very
/// same feeds (written to an .npz that ONNX Runtime reads): batch 1 and 32
/// by sequence 64 and 128, then both runtimes' per-operator profiles at
/// each size. QGRAPH_BENCH_TRANSFORMER and QGRAPH_BENCH_TOKENS replace
/// the model and the sentences; QGRAPH_BENCH_SIZES (as 1x64,32x128) the
/// sizes; QGRAPH_PROFILE=N the profile's runs (3), 0 for none.
fn transformer(settings: &Settings) {
    let root = &settings.root;
    let shared = root.join("../shared");
    let path = std::env::var("QGRAPH_BENCH_TRANSFORMER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shared.join("models/minilm_l6.onnx"));
    let tokens_path = std::env::var("QGRAPH_BENCH_TOKENS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shared.join("data/minilm_sentences128.npz"));
    for p in [&path, &tokens_path] {
        if !p.exists() {
            eprintln!("SKIPPED the transformer: {} is absent", p.display());
            return;
        }
    }
    let sizes: Vec<(usize, usize)> = match std::env::var("QGRAPH_BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .filter_map(|s| {
                let (b, q) = s.trim().split_once('x')?;
                Some((b.parse().ok()?, q.parse().ok()?))
            })
            .collect(),
        Err(_) => vec![(1, 64), (1, 128), (32, 64), (32, 128)],
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let model = qgraph::load(&path).expect("load").model;
    let ev = evaluator(settings, &model);
    let names: Vec<String> = ev
        .required_inputs()
        .iter()
        .map(|&v| model.graph.value(v).name().to_string())
        .collect();
    let tokens = read_tokens(&tokens_path);
    let feeds_dir = tempfile::tempdir().expect("a temporary directory");
    let mut rows = Vec::new();
    for &(batch, seq) in &sizes {
        let feed = token_inputs(&tokens, &names, batch, seq);
        let feeds = feeds_dir.path().join(format!("feeds_{batch}x{seq}.npz"));
        assert!(
            write_feeds(&feeds, &feed),
            "cannot write {}",
            feeds.display()
        );
        let x: Vec<Tensor> = feed.into_iter().map(|(_, a)| Tensor::I64(a)).collect();
        let ort = OrtServer::start(root, &path, batch, Some(&feeds));
        // Batch 1 takes milliseconds: 3 runs a block, as for the images.
        let block = if batch * seq <= 128 { 3 } else { 1 };
        rows.push((batch, seq, compare(settings, &ev, &x, block, ort)));
    }
    println!();
    println!(
        "| model | batch | seq | qgraph ms | ONNX Runtime ms | qgraph / ORT (median of blocks; quartiles) | fastest runs: qgraph ms, ORT ms, ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (batch, seq, row) in &rows {
        println!("| {name} | {batch} | {seq} | {}", row.columns());
    }
    let runs: usize = std::env::var("QGRAPH_PROFILE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    if runs == 0 {
        return;
    }
    // Every size: at batch 1 the products are small and each node's fixed
    // cost weighs more, so an operator's ratio there can differ.
    for &(batch, seq) in &sizes {
        let x: Vec<Tensor> = token_inputs(&tokens, &names, batch, seq)
            .into_iter()
            .map(|(_, a)| Tensor::I64(a))
            .collect();
        let ours = profile(&ev, &x, runs);
        let feeds = feeds_dir.path().join("feeds_profile.npz");
        let theirs = write_feeds(&feeds, &token_inputs(&tokens, &names, batch, seq))
            .then(|| ort_profile(root, &path, batch, &feeds, runs))
            .flatten()
            .unwrap_or_default();
        print_profiles(&name, batch, seq, runs, &ours, &theirs);
    }
}

/// Writes `feed` as an .npz, one array per input; false when it cannot.
fn write_feeds(path: &Path, feed: &[(String, ArrayD<i64>)]) -> bool {
    let Ok(file) = std::fs::File::create(path) else {
        return false;
    };
    let mut npz = NpzWriter::new(file);
    feed.iter()
        .all(|(n, a)| npz.add_array(n.as_str(), a).is_ok())
        && npz.finish().is_ok()
}

/// ONNX Runtime's own profile of its optimized graph: per operator type,
/// nodes and each type's fastest run's seconds (None when it cannot run).
fn ort_profile(
    root: &Path,
    model: &Path,
    batch: usize,
    feeds: &Path,
    runs: usize,
) -> Option<Vec<(String, usize, f64)>> {
    let out = Command::new("python3")
        .arg(root.join("tools/ort_time.py"))
        .arg(model)
        .args([
            batch.to_string(),
            "2".into(),
            "profile".into(),
            runs.to_string(),
        ])
        .arg("--inputs")
        .arg(feeds)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut rows: Vec<(String, usize, f64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            Some((
                parts.next()?.to_string(),
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
            ))
        })
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    Some(rows)
}

/// qgraph's profile beside ONNX Runtime's, then the operators the two
/// name differently: qgraph's MatMul rows against ONNX Runtime's MatMul
/// and FusedMatMul (Q K^T with its transpose and scale), qgraph's Erf
/// against BiasGelu (which also does the bias Add, the Div, Add and two
/// Muls of GELU).
fn print_profiles(
    name: &str,
    batch: usize,
    seq: usize,
    runs: usize,
    ours: &[(String, usize, f64)],
    theirs: &[(String, usize, f64)],
) {
    let ms = |rows: &[(String, usize, f64)], pick: &dyn Fn(&str) -> bool| -> f64 {
        rows.iter().filter(|r| pick(&r.0)).map(|r| r.2).sum::<f64>() * 1e3
    };
    let all = |_: &str| true;
    let (our_total, their_total) = (ms(ours, &all), ms(theirs, &all));
    println!();
    println!(
        "Time per operator, {name} batch {batch} seq {seq} (each row's fastest of {runs} runs; ONNX Runtime's rows are its optimized graph's, by its profiler):"
    );
    println!();
    println!("| operator | qgraph nodes | qgraph ms | share | ORT nodes | ORT ms | qgraph / ORT |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut names: Vec<&str> = ours.iter().map(|r| r.0.as_str()).collect();
    names.extend(
        theirs
            .iter()
            .map(|r| r.0.as_str())
            .filter(|n| !ours.iter().any(|r| r.0 == *n)),
    );
    for op in names {
        let find = |rows: &[(String, usize, f64)]| rows.iter().find(|r| r.0 == op).cloned();
        let cell = |row: &Option<(String, usize, f64)>| match row {
            Some((_, n, t)) => (n.to_string(), format!("{:.2}", t * 1e3)),
            None => (String::new(), String::new()),
        };
        let (o, t) = (find(ours), find(theirs));
        let share = o
            .as_ref()
            .map(|r| format!("{:.1}%", 100.0 * r.2 * 1e3 / our_total.max(1e-9)))
            .unwrap_or_default();
        let ratio = match (&o, &t) {
            (Some(a), Some(b)) if b.2 > 0.0 => format!("{:.2}", a.2 / b.2),
            _ => String::new(),
        };
        let ((on, ot), (tn, tt)) = (cell(&o), cell(&t));
        println!("| {op} | {on} | {ot} | {share} | {tn} | {tt} | {ratio} |");
    }
    println!(
        "| (all) | | {our_total:.2} | | | {their_total:.2} | {:.2} |",
        our_total / their_total.max(1e-9)
    );
    if theirs.is_empty() {
        println!("(ONNX Runtime's profile unavailable)");
        return;
    }
    println!();
    println!("| the issue's operators | qgraph ms | ORT ms | qgraph / ORT |");
    println!("|---|---:|---:|---:|");
    let groups: [(&str, &dyn Fn(&str) -> bool, &dyn Fn(&str) -> bool); 4] = [
        (
            "MatMul (ORT: MatMul + FusedMatMul)",
            &|op| op.starts_with("MatMul"),
            &|op| op == "MatMul" || op == "FusedMatMul",
        ),
        ("Softmax", &|op| op == "Softmax", &|op| op == "Softmax"),
        (
            "LayerNormalization",
            &|op| op == "LayerNormalization",
            &|op| op == "LayerNormalization",
        ),
        (
            "Erf (ORT: BiasGelu, the whole GELU with its bias)",
            &|op| op == "Erf",
            &|op| op == "BiasGelu",
        ),
    ];
    for (label, our_pick, their_pick) in groups {
        let (a, b) = (ms(ours, our_pick), ms(theirs, their_pick));
        println!("| {label} | {a:.2} | {b:.2} | {:.2} |", a / b.max(1e-9));
    }
}
