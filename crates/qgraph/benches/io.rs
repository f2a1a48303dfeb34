//! Read + verify + write of a model against the floor of copying the file,
//! measured in one run (this machine is shared: compare ratios, not times).
//!
//!   cargo bench -p qgraph --bench io [-- MODEL.onnx [REPEATS]]
//!
//! Default model: ../shared/models/efficientnet_lite0_bn.onnx.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/efficientnet_lite0_bn.onnx");
    let model = args.first().map(PathBuf::from).unwrap_or(default);
    let repeats: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(21);
    if !model.exists() {
        eprintln!("SKIPPED: {} is absent", model.display());
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let (cp_out, copy_out, qg_out) = (
        dir.path().join("cp.onnx"),
        dir.path().join("copy.onnx"),
        dir.path().join("qg.onnx"),
    );
    let opts = qgraph::onnx::WriteOptions::default();
    let run_cp = |dst: &Path| {
        let t = Instant::now();
        let ok = Command::new("cp")
            .arg(&model)
            .arg(dst)
            .status()
            .expect("cp runs")
            .success();
        assert!(ok);
        t.elapsed()
    };
    let run_copy = |dst: &Path| {
        let t = Instant::now();
        std::fs::copy(&model, dst).expect("copy");
        t.elapsed()
    };
    let run_qgraph = |dst: &Path| {
        let t0 = Instant::now();
        let loaded = qgraph::onnx::read_model(&model).expect("read + verify");
        let t1 = Instant::now();
        qgraph::onnx::write_model(&loaded.model, dst, &opts).expect("write");
        let t2 = Instant::now();
        (t1 - t0, t2 - t1, t2 - t0)
    };
    for _ in 0..3 {
        run_cp(&cp_out);
        run_copy(&copy_out);
        run_qgraph(&qg_out);
    }
    let (mut cp, mut copy, mut read, mut write, mut total) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..repeats {
        cp.push(run_cp(&cp_out));
        copy.push(run_copy(&copy_out));
        let (r, w, t) = run_qgraph(&qg_out);
        read.push(r);
        write.push(w);
        total.push(t);
    }
    let size = std::fs::metadata(&model).unwrap().len();
    let cp = median(cp);
    println!(
        "model: {} ({:.1} MB), {repeats} interleaved repeats, medians",
        model.file_name().unwrap().to_string_lossy(),
        size as f64 / 1e6
    );
    println!("| step                              |     ms | x cp |");
    println!("|-----------------------------------|-------:|-----:|");
    let row = |name: &str, d: Duration| {
        println!("| {name:<33} | {:>6.2} | {:>4.2} |", ms(d), ms(d) / ms(cp))
    };
    row("cp (process, the floor)", cp);
    row("std::fs::copy", median(copy));
    row("qgraph read + verify", median(read));
    row("qgraph write (temp file + rename)", median(write));
    let total = median(total);
    row("qgraph read + verify + write", total);
    println!(
        "\nratio read+verify+write / cp = {:.2} (goal: under 3)",
        ms(total) / ms(cp)
    );
}
