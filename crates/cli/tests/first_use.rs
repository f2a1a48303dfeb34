//! What a new user meets first, command by command: snapshots that compare
//! equal, the normalisation a model records, one meaning of `--limit`,
//! degenerate arguments refused before any work, outputs checked first and
//! named by default, freezing refused with the fix, data checked against
//! the model, and training that stops cleanly and resumes only what it
//! should.

mod common;

use common::*;
use ndarray::{Array1, Array4};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mnist() -> String {
    s(&root().join("testdata/data/mnist64.npz"))
}

fn s(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

#[track_caller]
fn ok(o: &Output) {
    assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
}

/// Exit 2 with one `qgraph: error:` line containing each of `want`, no panic.
#[track_caller]
fn refused(o: &Output, want: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    for w in want {
        assert!(e.contains(w), "expected '{w}' in: {e}");
    }
}

/// The files of a folder, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A model that averages its 1x4x4 input: output = the sample's mean.
const MEAN_MODEL: &str = r#"
ir_version 8
opset "" 13
graph g {
  input %x: f32[N,1,4,4]
  output %y: f32[N,1]
  gap: %p = GlobalAveragePool(%x)
  flat: %y = Flatten(%p)
}
"#;

/// 64 samples for MEAN_MODEL, sample i filled with i / 64: a file sorted
/// the way class-sorted data sets are.
fn ramp(dir: &Path) -> (String, String) {
    let model = dir.join("mean.qgt");
    std::fs::write(&model, MEAN_MODEL).unwrap();
    let data = dir.join("ramp.npz");
    let x = Array4::from_shape_fn((64, 1, 4, 4), |(i, _, _, _)| i as f32 / 64.0);
    let y = Array1::from_shape_fn(64, |i| (i / 32) as i64);
    let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&data).unwrap());
    w.add_array("x", &x).unwrap();
    w.add_array("y", &y).unwrap();
    w.finish().unwrap();
    (s(&model), s(&data))
}

/// `qgraph insert` of LeNet-5 on the bundled digits (int8 unless `extra`
/// says otherwise) into `dir`.
fn insert_lenet(dir: &Path, name: &str, extra: &[&str]) -> String {
    let q = s(&dir.join(name));
    let mut args = vec!["insert"];
    let (l, m) = (lenet(), mnist());
    args.extend([l.as_str(), "--calib", m.as_str(), "-o", q.as_str()]);
    args.extend(extra);
    ok(&qgraph(&args));
    q
}

#[test]
fn version_and_help_say_what_a_first_run_looks_like() {
    let o = qgraph(&["--version"]);
    ok(&o);
    assert!(stdout(&o).starts_with("qgraph "), "{}", stdout(&o));
    let o = qgraph(&["--help"]);
    assert!(stdout(&o).contains("A first run:"), "{}", stdout(&o));
    // Every command has help with an example.
    for cmd in [
        "show", "diff", "convert", "run", "insert", "report", "freeze", "verify", "infer", "eval",
        "train",
    ] {
        let o = qgraph(&[cmd, "--help"]);
        ok(&o);
        assert!(
            stdout(&o).contains("Examples:"),
            "{cmd} --help:\n{}",
            stdout(&o)
        );
    }
}

#[test]
fn a_snapshot_of_an_unchanged_model_diffs_as_equal() {
    let dir = tempfile::tempdir().unwrap();
    let snap = s(&dir.path().join("snap.qgt"));
    ok(&qgraph(&["show", &lenet(), "-o", &snap]));
    assert!(std::fs::read_to_string(&snap).unwrap().contains("blake3"));
    for (a, b) in [(&snap, &lenet()), (&lenet(), &snap)] {
        let o = qgraph(&["diff", a, b]);
        assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
        assert_eq!(stdout(&o), "no differences\n");
    }
    // A real change still shows, as a change of digests.
    let q = insert_lenet(dir.path(), "q.onnx", &[]);
    let qsnap = s(&dir.path().join("q.qgt"));
    ok(&qgraph(&["show", &q, "-o", &qsnap]));
    let o = qgraph(&["diff", &snap, &qsnap]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn snapshots_of_every_shared_model_diff_as_equal() {
    let models = root().join("../shared/models");
    if !models.is_dir() {
        eprintln!("SKIPPED: ../shared/models is absent (a user's clone has none)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in files(&models).iter().filter(|f| f.ends_with(".onnx")) {
        let model = s(&models.join(name));
        let snap = s(&dir.path().join(format!("{name}.qgt")));
        ok(&qgraph(&["show", &model, "-o", &snap]));
        let o = qgraph(&["diff", &snap, &model]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{name}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}

#[test]
fn insert_records_the_normalisation_and_later_commands_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = insert_lenet(dir.path(), "q.onnx", &["--norm", "tf"]);
    let shown = stdout(&qgraph(&["show", &q]));
    assert!(shown.contains("meta \"qgraph.norm\" = \"tf\""), "{shown}");
    assert!(
        shown.contains("meta \"qgraph.placement\" = \"tensorrt\""),
        "{shown}"
    );
    let recorded = qgraph(&["eval", &q, "--data", &mnist(), "--no-labels"]);
    ok(&recorded);
    assert!(
        stdout(&recorded).contains("norm tf"),
        "{}",
        stdout(&recorded)
    );
    let explicit = qgraph(&[
        "eval",
        &q,
        "--data",
        &mnist(),
        "--no-labels",
        "--norm",
        "tf",
    ]);
    assert_eq!(stdout(&recorded), stdout(&explicit));
    assert!(
        !stderr(&explicit).contains("warning"),
        "{}",
        stderr(&explicit)
    );
    // A flag that contradicts the record wins, with a warning.
    let other = qgraph(&[
        "eval",
        &q,
        "--data",
        &mnist(),
        "--no-labels",
        "--norm",
        "none",
    ]);
    ok(&other);
    assert!(stdout(&other).contains("norm none"), "{}", stdout(&other));
    assert!(
        stderr(&other).contains("warning: --norm none contradicts the normalisation")
            && stderr(&other).contains("(tf)"),
        "{}",
        stderr(&other)
    );
    assert_ne!(stdout(&recorded), stdout(&other));
    // verify and report use it too (no warning, and the run succeeds).
    let frozen = s(&dir.path().join("q.trt.onnx"));
    ok(&qgraph(&["freeze", &q, "-o", &frozen]));
    for args in [
        vec!["verify", &q, &frozen, "--data", &mnist(), "--limit", "8"],
        vec!["report", &lenet(), &q, "--data", &mnist(), "--limit", "8"],
    ] {
        let o = qgraph(&args);
        ok(&o);
        assert!(!stderr(&o).contains("warning"), "{args:?}: {}", stderr(&o));
    }
    // A frozen model keeps the record, and training uses it and passes it on.
    assert!(stdout(&qgraph(&["show", &frozen])).contains("\"qgraph.norm\" = \"tf\""));
    let trained = s(&dir.path().join("q.trained.onnx"));
    let o = qgraph(&[
        "train",
        &q,
        "--data",
        &mnist(),
        "--lr",
        "0.001",
        "-o",
        &trained,
    ]);
    ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert!(stdout(&qgraph(&["show", &trained])).contains("\"qgraph.norm\" = \"tf\""));
}

#[test]
fn limit_spreads_over_the_file_in_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = ramp(dir.path());
    // Samples 0, 16, 32 and 48 of 64: mean (0 + 16 + 32 + 48) / 4 / 64.
    // The first four would give 0.0234.
    let o = qgraph(&[
        "eval",
        &model,
        "--data",
        &data,
        "--no-labels",
        "--limit",
        "4",
    ]);
    ok(&o);
    assert!(stdout(&o).contains("4 of 64 samples"), "{}", stdout(&o));
    assert!(stdout(&o).contains("mean 0.3750"), "{}", stdout(&o));
    // The labels of the spread samples are two classes, not one.
    let o = qgraph(&["eval", &model, "--data", &data, "--limit", "4"]);
    ok(&o);
    assert!(
        stdout(&o).contains("accuracy   0.5000 (2/4)"),
        "{}",
        stdout(&o)
    );
    // insert's old --calib-count is the same flag.
    let q = s(&dir.path().join("q.onnx"));
    for flag in ["--limit", "--calib-count"] {
        let o = qgraph(&[
            "insert",
            &lenet(),
            "--calib",
            &mnist(),
            flag,
            "16",
            "-o",
            &q,
        ]);
        ok(&o);
        assert!(stderr(&o).contains("over 16 samples"), "{}", stderr(&o));
    }
}

#[test]
fn degenerate_arguments_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let q = insert_lenet(dir.path(), "q.onnx", &[]);
    let target = s(&dir.path().join("never.onnx"));
    let (l, m) = (lenet(), mnist());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["insert", &l, "--calib", &m, "--calib-count", "0"],
            "--calib-count",
        ),
        (vec!["insert", &l, "--calib", &m, "--limit", "0"], "--limit"),
        (vec!["insert", &l, "--calib", &m, "--batch", "0"], "--batch"),
        (vec!["insert", &l, "--limit", "8"], "--limit needs --calib"),
        (
            vec!["insert", &l, "--calib", &m, "--percentile", "-3"],
            "--percentile must be in",
        ),
        (vec!["train", &q, "--data", &m, "--epochs", "0"], "--epochs"),
        (vec!["train", &q, "--data", &m, "--batch", "0"], "--batch"),
        (
            vec!["train", &q, "--data", &m, "--lr", "-0.1"],
            "--lr: -0.1 is not a positive rate",
        ),
        (
            vec!["train", &q, "--data", &m, "--lr", "0"],
            "--lr: 0 is not a positive rate",
        ),
        (
            vec!["train", &q, "--data", &m, "--momentum", "1.5"],
            "--momentum",
        ),
        (
            vec!["train", &q, "--data", &m, "--temperature", "0"],
            "--temperature",
        ),
        (
            vec!["train", &q, "--data", &m, "--checkpoint-every", "0"],
            "--checkpoint-every",
        ),
        (vec!["eval", &q, "--data", &m, "--limit", "0"], "--limit"),
        (vec!["eval", &q, "--data", &m, "--batch", "0"], "--batch"),
        (
            vec!["verify", &q, &q, "--data", &m, "--limit", "0"],
            "--limit",
        ),
        (
            vec!["report", &l, &q, "--data", &m, "--batch", "0"],
            "--batch",
        ),
        (
            vec![
                "run",
                "--passes",
                "dce",
                &l,
                "-o",
                &target,
                "--fixpoint",
                "0",
            ],
            "--fixpoint",
        ),
    ];
    for (mut args, want) in cases {
        if !args.contains(&"-o") && matches!(args[0], "insert" | "train") {
            args.extend(["-o", &target]);
        }
        let started = Instant::now();
        let o = qgraph(&args);
        refused(&o, &[want]);
        assert!(!Path::new(&target).exists(), "{args:?} wrote its output");
        assert!(!stderr(&o).contains("epoch 1"), "{args:?}: {}", stderr(&o));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} worked first"
        );
    }
}

#[test]
fn output_locations_are_checked_before_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let q = insert_lenet(dir.path(), "q.onnx", &[]);
    let missing = s(&dir.path().join("no/such/folder/out.onnx"));
    let folder = s(dir.path());
    let (l, m) = (lenet(), mnist());
    for args in [
        vec!["insert", &l, "--calib", &m, "-o", &missing],
        vec!["train", &q, "--data", &m, "-o", &missing],
        vec!["freeze", &q, "-o", &missing],
        vec!["convert", &l, "-o", &missing],
        vec!["show", &l, "-o", &missing],
        vec!["infer", &l, "--inputs", &m, "-o", &missing],
        vec!["run", "--passes", "dce", &l, "-o", &missing],
        vec!["report", &l, &q, "--data", &m, "--svg", &missing],
    ] {
        let o = qgraph(&args);
        refused(&o, &[&format!("{missing}: the folder"), "does not exist"]);
        assert!(!stderr(&o).contains("calibrating") && !stderr(&o).contains("epoch"));
    }
    // A folder that takes no new files (even for root: /proc).
    let o = qgraph(&["insert", &l, "--calib", &m, "-o", "/proc/q.onnx"]);
    refused(&o, &["/proc/q.onnx: cannot write in /proc"]);
    // A folder where a file should go, and a checkpoint in a missing folder.
    let o = qgraph(&["insert", &l, "--calib", &m, "-o", &folder]);
    refused(&o, &["is a folder"]);
    let o = qgraph(&["train", &q, "--data", &m, "--checkpoint", &missing]);
    refused(&o, &[&missing]);
}

#[test]
fn outputs_default_to_names_beside_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("lenet.onnx");
    std::fs::copy(lenet(), &model).unwrap();
    let o = qgraph(&[
        "insert",
        "--scheme",
        "pact-w4a4",
        &s(&model),
        "--calib",
        &mnist(),
    ]);
    ok(&o);
    assert!(stderr(&o).contains("wrote"), "{}", stderr(&o));
    let inserted = dir.path().join("lenet.pact-w4a4.onnx");
    assert!(inserted.exists(), "{:?}", files(dir.path()));
    ok(&qgraph(&["freeze", &s(&inserted)]));
    assert!(dir.path().join("lenet.pact-w4a4.tensorrt.onnx").exists());
    let o = qgraph(&["train", &s(&inserted), "--data", &mnist(), "--lr", "0.001"]);
    ok(&o);
    assert!(dir.path().join("lenet.pact-w4a4.trained.onnx").exists());
    // The checkpoint is gone once the output is written; nothing else is left.
    assert_eq!(
        files(dir.path()),
        [
            "lenet.onnx",
            "lenet.pact-w4a4.onnx",
            "lenet.pact-w4a4.tensorrt.onnx",
            "lenet.pact-w4a4.trained.onnx"
        ]
    );
}

#[test]
fn freeze_refuses_what_it_cannot_freeze_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let trt = insert_lenet(dir.path(), "trt.onnx", &[]);
    let target = dir.path().join("frozen.onnx");
    for t in ["integer", "integer-onnx"] {
        let o = qgraph(&["freeze", "--target", t, &trt, "-o", &s(&target)]);
        refused(&o, &["trt.onnx", "--placement ort"]);
        assert!(!target.exists());
    }
    let o = qgraph(&["freeze", &lenet(), "-o", &s(&target)]);
    refused(&o, &["nothing to freeze", "qgraph insert"]);
    assert!(!target.exists());
    // A model with ONNX Runtime's placement freezes to integers.
    let ort = insert_lenet(dir.path(), "ort.onnx", &["--placement", "ort"]);
    ok(&qgraph(&[
        "freeze",
        "--target",
        "integer",
        &ort,
        "-o",
        &s(&target),
    ]));
    assert!(stdout(&qgraph(&["show", &s(&target)])).contains("QLinearConv"));
    // verify explains its figures and ends with a verdict.
    let o = qgraph(&["verify", &ort, &s(&target), "--data", &mnist()]);
    ok(&o);
    assert!(stdout(&o).contains("What is normal"), "{}", stdout(&o));
    assert!(
        stdout(&o)
            .contains("verdict: the frozen model computes what the Q/DQ model does, op by op"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn data_that_does_not_fit_the_model_is_blamed_on_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = ramp(dir.path());
    let target = s(&dir.path().join("q.onnx"));
    let m = mnist();
    for args in [
        vec!["eval", &model, "--data", &m],
        vec!["insert", &model, "--calib", &m, "-o", &target],
        vec!["train", &model, "--data", &m, "-o", &target],
        vec!["report", &model, &model, "--data", &m],
    ] {
        let o = qgraph(&args);
        refused(
            &o,
            &[
                &format!("{m}: does not fit the model {model}"),
                "'x_u8' holds samples of shape [1,28,28]",
                "'x' f32[N,1,4,4] wants 4 on axis 2 where the samples have 28",
            ],
        );
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(!Path::new(&target).exists());
    }
}

#[test]
fn eval_without_labels_or_reference_says_so_and_describes_the_output() {
    let o = qgraph(&["eval", &lenet(), "--data", &mnist(), "--no-labels"]);
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains("output     min"), "{text}");
    assert!(text.contains("top-1      "), "{text}");
    assert!(text.contains("no labels and no --ref"), "{text}");
    assert!(!text.contains("NaN"), "{text}");
}

#[test]
fn run_lists_its_passes_in_columns_and_shows_its_real_usage() {
    let o = qgraph(&["run", "--list"]);
    ok(&o);
    let starts: Vec<usize> = stdout(&o)
        .lines()
        .map(|l| {
            let name = l.split_whitespace().next().unwrap();
            name.len() + l[name.len()..].len() - l[name.len()..].trim_start().len()
        })
        .collect();
    assert!(
        starts.len() > 5 && starts.iter().all(|&c| c == starts[0]),
        "{}",
        stdout(&o)
    );
    let help = stdout(&qgraph(&["run", "--help"]));
    assert!(
        help.contains("qgraph run --passes <PIPELINE> <INPUT> -o <OUTPUT>"),
        "{help}"
    );
}

#[test]
fn shared_flags_have_one_default_and_every_flag_has_help() {
    for cmd in ["insert", "report", "verify", "eval", "train"] {
        let help = stdout(&qgraph(&[cmd, "--help"]));
        let batch = help
            .split("--batch <N>")
            .nth(1)
            .unwrap_or_else(|| panic!("{cmd} has --batch"));
        let batch = &batch[..batch.find("\n  -").unwrap_or(batch.len())];
        assert!(batch.contains("[default: 32]"), "{cmd}: {batch}");
        let limit = help.split("--limit <N>").nth(1).unwrap();
        assert!(
            limit
                .trim_start()
                .starts_with("Use N samples spread evenly"),
            "{cmd}"
        );
    }
    let help = stdout(&qgraph(&["train", "--help"]));
    assert!(
        help.contains("--epochs <N>\n          Passes over the training data"),
        "{help}"
    );
    let help = stdout(&qgraph(&["freeze", "--help"]));
    assert!(help.contains("- always:"), "{help}");
    // No flag is left without a line of help.
    for cmd in [
        "insert", "train", "freeze", "eval", "verify", "report", "run",
    ] {
        let help = stdout(&qgraph(&[cmd, "--help"]));
        // The options end at -h, before the examples.
        let options = &help[..help.find("  -h, --help").unwrap()];
        let lines: Vec<&str> = options.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if t.starts_with("--") && !t.contains("  ") {
                let next = lines.get(i + 1).map_or("", |n| n.trim());
                assert!(
                    !next.is_empty()
                        && !next.starts_with('-')
                        && !next.starts_with("Possible values")
                        && !next.starts_with("[default"),
                    "{cmd}: '{t}' has no help"
                );
            }
        }
    }
}

/// Starts `qgraph train` on LeNet-5 with a checkpoint every step.
fn start_training(q: &str, ckpt: &str, out_path: &str, extra: &[&str]) -> std::process::Child {
    let m = mnist();
    let mut args = vec![
        "train",
        q,
        "--data",
        &m,
        "--epochs",
        "50",
        "--batch",
        "8",
        "--lr",
        "0.001",
        "--threads",
        "1",
        "--checkpoint",
        ckpt,
        "--checkpoint-every",
        "1",
        "-o",
        out_path,
    ];
    args.extend(extra);
    Command::new(env!("CARGO_BIN_EXE_qgraph"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn training_stops_cleanly_on_ctrl_c_and_resumes_only_its_own_model() {
    let dir = tempfile::tempdir().unwrap();
    let q = insert_lenet(dir.path(), "q.onnx", &[]);
    let ckpt = s(&dir.path().join("ck.onnx"));
    let trained = s(&dir.path().join("trained.onnx"));
    let child = start_training(&q, &ckpt, &trained, &[]);
    // Wait for the first checkpoint: training is under way.
    let started = Instant::now();
    while !Path::new(&ckpt).exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("interrupted in epoch") && e.contains("--resume"),
        "{e}"
    );
    assert!(e.contains(&ckpt), "{e}");
    assert!(Path::new(&ckpt).exists() && !Path::new(&trained).exists());
    // Resuming says where; a changed setting is named.
    let o = qgraph(&[
        "train",
        &q,
        "--data",
        &mnist(),
        "--epochs",
        "1",
        "--batch",
        "8",
        "--lr",
        "0.002",
        "--threads",
        "1",
        "--checkpoint",
        &ckpt,
        "--resume",
        "-o",
        &trained,
    ]);
    let e = stderr(&o);
    assert!(e.contains(&format!("resuming from {ckpt}: epoch")), "{e}");
    assert!(
        e.contains("settings changed since the checkpoint") && e.contains("--lr 0.001 -> 0.002"),
        "{e}"
    );
    // A checkpoint of another model is refused.
    let other = insert_lenet(dir.path(), "w4a8.onnx", &["--scheme", "w4a8"]);
    let ckpt2 = s(&dir.path().join("ck2.onnx"));
    let o = qgraph(&[
        "train",
        &q,
        "--data",
        &mnist(),
        "--epochs",
        "1",
        "--lr",
        "0.001",
        "--checkpoint",
        &ckpt2,
        "-o",
        &ckpt2,
    ]);
    ok(&o);
    let o = qgraph(&[
        "train",
        &other,
        "--data",
        &mnist(),
        "--epochs",
        "2",
        "--lr",
        "0.001",
        "--checkpoint",
        &ckpt2,
        "--resume",
        "-o",
        &trained,
    ]);
    refused(&o, &[&ckpt2, "checkpoint of another model"]);
}
