//! End-to-end tests of the `qgraph` binary: exit codes, messages, no panics,
//! no half-written output, determinism.

mod common;

use common::*;
use std::path::{Path, PathBuf};

#[test]
fn every_malformed_file_exits_2_with_its_message_and_writes_nothing() {
    let dir = root().join("testdata/malformed");
    let expected = std::fs::read_to_string(dir.join("EXPECTED.tsv")).unwrap();
    let expectations: Vec<(&str, &str)> = expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_once('\t').expect("FILE<TAB>MESSAGE"))
        .collect();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".onnx") || f.ends_with(".qgt"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "the corpus is in testdata/malformed");
    let out_dir = tempfile::tempdir().unwrap();
    for f in &files {
        let want = expectations
            .iter()
            .find(|(name, _)| name == f)
            .unwrap_or_else(|| panic!("{f} has no line in EXPECTED.tsv"))
            .1;
        let out = out_dir.path().join("out.onnx");
        let o = qgraph(&["convert", path_str(&dir.join(f)), "-o", path_str(&out)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{f}: {err}");
        assert!(
            err.contains(f.as_str()),
            "{f}: the message must name the file: {err}"
        );
        assert!(err.contains(want), "{f}: expected '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{f}: {err}");
        assert_eq!(err.lines().count(), 1, "{f}: one clear error, got: {err}");
        assert!(!out.exists(), "{f}: an output was written");
        let o = qgraph(&["show", path_str(&dir.join(f))]);
        assert_eq!(o.status.code(), Some(2), "show {f}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "temporary files were left behind: {leftovers:?}"
    );
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for cmd in ["show", "diff", "convert", "eval", "infer", "run", "train"] {
        let o = qgraph(&[cmd, "--help"]);
        assert_eq!(o.status.code(), Some(0));
        assert!(
            stdout(&o).contains("Examples:"),
            "{cmd} --help:\n{}",
            stdout(&o)
        );
    }
    let o = qgraph(&["--help"]);
    assert!(stdout(&o).contains("Exit codes"));
}

#[test]
fn usage_errors_and_missing_files_exit_2() {
    assert_eq!(qgraph(&["show"]).status.code(), Some(2));
    assert_eq!(
        qgraph(&["convert", &lenet(), "--bogus"]).status.code(),
        Some(2)
    );
    assert_eq!(qgraph(&["frobnicate"]).status.code(), Some(2));
    let o = qgraph(&["show", "/no/such/model.onnx"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/no/such/model.onnx"), "{}", stderr(&o));
}

#[test]
fn convert_is_deterministic_and_round_trips_through_the_text_form() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    assert!(qgraph(&["convert", &lenet(), "-o", path_str(&a)])
        .status
        .success());
    assert!(qgraph(&["convert", &lenet(), "-o", path_str(&b)])
        .status
        .success());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // ONNX -> text with all data -> ONNX gives the same bytes.
    let text = dir.path().join("lenet.qgt");
    assert!(
        qgraph(&["convert", &lenet(), "-o", path_str(&text), "--all-data"])
            .status
            .success()
    );
    let c = dir.path().join("c.onnx");
    let o = qgraph(&["convert", path_str(&text), "-o", path_str(&c)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
    // Text with elided weights cannot become ONNX, and says why.
    let short = dir.path().join("short.qgt");
    assert!(qgraph(&["show", &lenet(), "-o", path_str(&short)])
        .status
        .success());
    let o = qgraph(&[
        "convert",
        path_str(&short),
        "-o",
        path_str(&dir.path().join("d.onnx")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("initializer 'conv1.weight': its data was elided"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn diff_exits_0_when_equal_and_1_with_a_readable_report_when_not() {
    let o = qgraph(&["diff", &lenet(), &lenet()]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "no differences\n");

    let dir = tempfile::tempdir().unwrap();
    let text = qgraph(&["show", "--all-data", &lenet()]);
    let edited = stdout(&text)
        .replace(
            "%/relu3/Relu_output_0 = Relu(",
            "%/relu3/Relu_output_0 = LeakyRelu(",
        )
        .replace("ceil_mode = 0, dilations", "ceil_mode = 1, dilations")
        .replacen("0.034310196", "0.044310196", 1);
    let changed = dir.path().join("changed.qgt");
    std::fs::write(&changed, edited).unwrap();
    let o = qgraph(&["diff", &lenet(), path_str(&changed)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let report = stdout(&o);
    for want in [
        "~ init %linear2.bias f32[10]: 1 of 10 values differ, max abs diff 1.000e-2",
        "~ node '/maxpool1/MaxPool' (MaxPool)\n    ~ attr ceil_mode: 0 -> 1",
        "~ node '/relu3/Relu' (LeakyRelu)\n    ~ op Relu -> LeakyRelu",
        "summary: nodes 0 added, 0 removed, 3 changed; initializers 0 added, 0 removed, 1 changed",
    ] {
        assert!(report.contains(want), "missing {want:?} in:\n{report}");
    }
}

#[test]
fn external_data_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ext = dir.path().join("ext.onnx");
    let o = qgraph(&[
        "convert",
        &lenet(),
        "-o",
        path_str(&ext),
        "--external-data",
        "always",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let data = dir.path().join("ext.onnx.data");
    assert!(data.exists());
    assert!(
        std::fs::metadata(&ext).unwrap().len() < 10_000,
        "weights moved out of the model file"
    );
    let o = qgraph(&["diff", &lenet(), path_str(&ext)]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // Read back and written inline again: the same bytes as a direct conversion.
    let (inline, direct) = (
        dir.path().join("inline.onnx"),
        dir.path().join("direct.onnx"),
    );
    assert!(qgraph(&[
        "convert",
        path_str(&ext),
        "-o",
        path_str(&inline),
        "--external-data",
        "never"
    ])
    .status
    .success());
    assert!(qgraph(&["convert", &lenet(), "-o", path_str(&direct)])
        .status
        .success());
    assert_eq!(
        std::fs::read(&inline).unwrap(),
        std::fs::read(&direct).unwrap()
    );
}

fn shared_models() -> Option<Vec<PathBuf>> {
    let dir = root().join("../shared/models");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "SKIPPED: {} is absent (it exists beside the project in CI)",
            dir.display()
        );
        return None;
    };
    let mut models: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    Some(models)
}

#[test]
fn show_of_every_shared_model_is_stable_and_snapshotted() {
    let Some(models) = shared_models() else {
        return;
    };
    for m in models {
        let first = qgraph(&["show", path_str(&m)]);
        assert!(
            first.status.success(),
            "{}: {}",
            m.display(),
            stderr(&first)
        );
        let second = qgraph(&["show", path_str(&m)]);
        assert_eq!(
            first.stdout,
            second.stdout,
            "{}: two runs differ",
            m.display()
        );
        let name = m.file_stem().unwrap().to_string_lossy().into_owned();
        insta::assert_snapshot!(format!("show_{name}"), stdout(&first));
    }
}

#[test]
fn convert_of_every_shared_model_is_byte_identical_twice() {
    let Some(models) = shared_models() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for m in models {
        let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
        for out in [&a, &b] {
            let o = qgraph(&["convert", path_str(&m), "-o", path_str(out)]);
            assert!(o.status.success(), "{}: {}", m.display(), stderr(&o));
        }
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{}",
            m.display()
        );
        let o = qgraph(&["diff", path_str(&m), path_str(&a)]);
        assert_eq!(o.status.code(), Some(0), "{}: {}", m.display(), stdout(&o));
    }
}

#[test]
fn text_fixtures_convert_to_onnx_and_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = root().join("testdata/text");
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        let onnx = dir.path().join("fixture.onnx");
        let o = qgraph(&["convert", path_str(&path), "-o", path_str(&onnx)]);
        assert!(o.status.success(), "{}: {}", path.display(), stderr(&o));
        let from_text = stdout(&qgraph(&["show", "--all-data", path_str(&path)]));
        let from_onnx = stdout(&qgraph(&["show", "--all-data", path_str(&onnx)]));
        assert_eq!(from_text, from_onnx, "{}", path.display());
    }
}

#[test]
fn eval_reports_accuracy_on_mnist_and_refuses_bad_data() {
    let data = root().join("../shared/data/mnist_npm10k.npz");
    if data.exists() {
        let o = qgraph(&[
            "eval",
            &lenet(),
            "--data",
            path_str(&data),
            "--limit",
            "2000",
            "--ref",
            &lenet(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let acc: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("accuracy   "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no accuracy in:\n{out}"));
        assert!(
            acc >= 0.99,
            "LeNet-5 accuracy {acc} on 2000 MNIST digits:\n{out}"
        );
        assert!(out.contains("agreement  1.0000 (2000/2000)"), "{out}");
        assert!(out.contains("sqnr       inf dB"), "{out}");
    } else {
        eprintln!("SKIPPED: {} is absent", data.display());
    }
    let o = qgraph(&["eval", &lenet(), "--data", "/no/such/data.npz"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/no/such/data.npz"), "{}", stderr(&o));
    let o = qgraph(&["eval", &lenet(), "--data", &lenet()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not a readable .npz file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn infer_refuses_inputs_that_do_not_fit_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npz");
    // A model file is not an .npz of inputs.
    let o = qgraph(&[
        "infer",
        &lenet(),
        "--inputs",
        &lenet(),
        "-o",
        path_str(&out),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a readable .npz file"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn run_applies_a_pipeline_dumps_each_pass_and_refuses_bad_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = root().join("testdata/passes/fold-bn/conv_gemm_matmul.qgt");
    let out = dir.path().join("out.qgt");
    let dumps = dir.path().join("dumps");
    let o = qgraph(&[
        "run",
        "--passes",
        "fold-bn,fuse-conv-bn-act,cleanup",
        path_str(&fixture),
        "-o",
        path_str(&out),
        "--dump-after",
        path_str(&dumps),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("changed by: fold-bn"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains("BatchNormalization"), "{text}");
    let mut dumped: Vec<String> = std::fs::read_dir(&dumps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dumped.sort();
    assert_eq!(
        dumped,
        [
            "01-fold-bn.qgt",
            "02-fuse-conv-bn-act.qgt",
            "03-remove-noops.qgt",
            "04-dce.qgt"
        ]
    );

    // With a rewrite limit of 1, only the first BatchNormalization folds.
    let limited = dir.path().join("limited.qgt");
    let o = qgraph(&[
        "run",
        "--passes",
        "fold-bn",
        path_str(&fixture),
        "-o",
        path_str(&limited),
        "--rewrite-limit",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = std::fs::read_to_string(&limited).unwrap();
    assert_eq!(text.matches("BatchNormalization").count(), 4, "{text}");

    let bad = dir.path().join("bad.qgt");
    for (pipeline, want) in [
        (
            "fold-everything",
            "valid passes: cleanup, commute-dequantize, dce, fold-bn",
        ),
        ("fold-constants(size=3)", "unknown parameter 'size'"),
        ("dce,", "ends with ','"),
    ] {
        let o = qgraph(&[
            "run",
            "--passes",
            pipeline,
            path_str(&fixture),
            "-o",
            path_str(&bad),
        ]);
        assert_eq!(o.status.code(), Some(2), "{pipeline}");
        assert!(stderr(&o).contains(want), "{pipeline}: {}", stderr(&o));
        assert!(!bad.exists(), "{pipeline}: wrote output");
    }
    let o = qgraph(&["run", "--list"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("fold-pad"), "{}", stdout(&o));
}

#[test]
fn fusion_groups_survive_writing_and_reading_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = root().join("testdata/passes/fuse-conv-bn-act/groups.qgt");
    let onnx = dir.path().join("grouped.onnx");
    let o = qgraph(&[
        "run",
        "--passes",
        "fuse-conv-bn-act",
        path_str(&fixture),
        "-o",
        path_str(&onnx),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let shown = stdout(&qgraph(&["show", path_str(&onnx)]));
    assert_eq!(
        shown
            .matches("meta \"qgraph.fusion.group\" = \"conv2\"")
            .count(),
        3,
        "{shown}"
    );
    assert_eq!(
        shown
            .matches("meta \"qgraph.fusion.role\" = \"activation\"")
            .count(),
        2,
        "{shown}"
    );
}

#[test]
fn insert_quantizes_lenet_deterministically_and_refuses_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("testdata/data/mnist64.npz");
    let data = path_str(&data);
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    for out in [&a, &b] {
        let o = qgraph(&[
            "insert",
            "--scheme",
            "int8",
            &lenet(),
            "--calib",
            data,
            "-o",
            path_str(out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("4 weights and 4 activations quantized (minmax over 64 samples)"),
            "{}",
            stderr(&o)
        );
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let shown = stdout(&qgraph(&["show", path_str(&a)]));
    assert_eq!(shown.matches("= QuantizeLinear(").count(), 8, "{shown}");
    assert!(shown.contains("meta \"qgraph.scheme\" = \"int8\""));
    // The quantized model still classifies as the float one on these digits.
    let o = qgraph(&["eval", path_str(&a), "--data", data, "--ref", &lenet()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let agreement: f64 = stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix("agreement  "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("an agreement line");
    assert!(agreement >= 0.95, "{}", stdout(&o));
    // Sub-8-bit activations are clipped to their grid before an int8 Q/DQ;
    // the first and last weighted layers stay at 8 bits.
    let low = dir.path().join("w4a4.onnx");
    let o = qgraph(&[
        "insert",
        "--scheme",
        "w4a4",
        &lenet(),
        "--calib",
        data,
        "-o",
        path_str(&low),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = stdout(&qgraph(&["show", path_str(&low)]));
    assert_eq!(shown.matches("= Clip(").count(), 2, "{shown}");
    // Power-of-two scales are recorded in the model's metadata.
    let pow2 = dir.path().join("pow2.onnx");
    let o = qgraph(&[
        "insert",
        "--scheme",
        "int8",
        "--pow2-scales",
        &lenet(),
        "--calib",
        data,
        "-o",
        path_str(&pow2),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = stdout(&qgraph(&["show", path_str(&pow2)]));
    assert!(
        shown.contains("meta \"qgraph.scales\" = \"powers of two\""),
        "{shown}"
    );
    // Bad options and files: exit 2, a message naming them, nothing written.
    let out = dir.path().join("never.onnx");
    let model = lenet();
    for (args, want) in [
        (vec!["--scheme", "int9"], "the schemes are int8, int8-asym"),
        (
            vec!["--calib", "/nonexistent/calib.npz"],
            "/nonexistent/calib.npz",
        ),
        (
            vec!["--calib", data, "--key", "nope"],
            "no array named 'nope'",
        ),
        (vec!["--calib", data, "--norm", "imagenet"], "3 channels"),
        (
            vec!["--scheme", "lsq-w4a4", "--pow2-scales"],
            "--pow2-scales: the scheme 'lsq-w4a4' learns its scales",
        ),
    ] {
        let mut full = vec!["insert", model.as_str(), "-o", path_str(&out)];
        full.extend(args);
        let o = qgraph(&full);
        assert_eq!(o.status.code(), Some(2), "{full:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{full:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
}

#[test]
fn report_lists_every_quantized_tensor_worst_first_and_draws_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("testdata/data/mnist64.npz");
    let data = path_str(&data);
    let q = dir.path().join("q.onnx");
    let o = qgraph(&[
        "insert",
        "--scheme",
        "w4a4",
        &lenet(),
        "--calib",
        data,
        "-o",
        path_str(&q),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = dir.path().join("layers.svg");
    let o = qgraph(&[
        "report",
        &lenet(),
        path_str(&q),
        "--data",
        data,
        "--limit",
        "16",
        "--svg",
        path_str(&svg),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let rows: Vec<(&str, f64)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1], f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), 8, "{text}");
    assert_eq!(rows.iter().filter(|(k, _)| *k == "weight").count(), 4);
    assert!(
        rows.windows(2).all(|w| w[0].1 <= w[1].1),
        "worst first: {text}"
    );
    // 4-bit tensors are far noisier than 8-bit ones, but not noise alone.
    assert!(rows.iter().all(|(_, db)| *db > 5.0), "{text}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.matches("<rect").count() == 8);
    // A float model against itself has nothing quantized.
    let o = qgraph(&["report", &lenet(), &lenet(), "--data", data]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no QuantizeLinear"), "{}", stderr(&o));
}

#[test]
fn insert_applies_an_overrides_file_and_names_it_when_it_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[override]]\nop = \"Gemm\"\nexclude = true\n").unwrap();
    let out = dir.path().join("q.onnx");
    let o = qgraph(&[
        "insert",
        &lenet(),
        "--overrides",
        path_str(&rules),
        "-o",
        path_str(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // LeNet's two Gemm layers stay float: two quantized weights remain.
    assert!(
        stderr(&o).contains("2 weights and 0 activations"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&rules, "[[override]]\nop = \"Gemm\"\nexclude = \"yes\"\n").unwrap();
    let bad = dir.path().join("bad.onnx");
    let o = qgraph(&[
        "insert",
        &lenet(),
        "--overrides",
        path_str(&rules),
        "-o",
        path_str(&bad),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("rules.toml: override 1: 'exclude' has the wrong type"),
        "{}",
        stderr(&o)
    );
    assert!(!bad.exists());
}

#[test]
fn freeze_to_integers_and_verify_op_by_op_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let digits = root().join("testdata/data/mnist64.npz");
    let qdq = dir.path().join("q.onnx");
    let o = qgraph(&[
        "insert",
        "--scheme",
        "int8",
        "--placement",
        "ort",
        &lenet(),
        "--calib",
        path_str(&digits),
        "-o",
        path_str(&qdq),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let frozen = dir.path().join("int.onnx");
    let o = qgraph(&[
        "freeze",
        "--target",
        "integer",
        path_str(&qdq),
        "-o",
        path_str(&frozen),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("lower-to-integer"), "{}", stderr(&o));
    let o = qgraph(&[
        "verify",
        path_str(&qdq),
        path_str(&frozen),
        "--data",
        path_str(&digits),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("100.0000% within 1 LSB"), "{out}");
    assert!(out.contains("1.0000"), "top-1: {out}");
    // Two freezes, the same bytes.
    let again = dir.path().join("int2.onnx");
    let o = qgraph(&[
        "freeze",
        "--target",
        "integer",
        path_str(&qdq),
        "-o",
        path_str(&again),
    ]);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&frozen).unwrap(),
        std::fs::read(&again).unwrap()
    );
    // A bad target, a missing file: exit 2, nothing written.
    let bad = dir.path().join("bad.onnx");
    let o = qgraph(&[
        "freeze",
        "--target",
        "tflite",
        path_str(&qdq),
        "-o",
        path_str(&bad),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let missing = dir.path().join("missing.onnx");
    let o = qgraph(&["freeze", path_str(&missing), "-o", path_str(&bad)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("missing.onnx"), "{}", stderr(&o));
    assert!(!bad.exists());
}

#[test]
fn train_fine_tunes_a_q_dq_model_resumes_from_its_checkpoint_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("testdata/data/mnist64.npz");
    let data = path_str(&data).to_string();
    let qdq = dir.path().join("qdq.onnx");
    let o = qgraph(&[
        "insert",
        &lenet(),
        "--scheme",
        "pact-w4a8",
        "--calib",
        &data,
        "-o",
        path_str(&qdq),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trained = dir.path().join("trained.onnx");
    let args = |out: &Path, epochs: &str| -> Vec<String> {
        [
            "train",
            path_str(&qdq),
            "--data",
            &data,
            "--eval",
            &data,
            "--epochs",
            epochs,
            "--batch",
            "16",
            "--lr",
            "0.001",
            "--threads",
            "2",
            "-o",
            path_str(out),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| qgraph(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(args(&trained, "1"));
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(
        log.contains("epoch 1") && log.contains("eval accuracy"),
        "{log}"
    );
    // The checkpoint is gone once the output is written.
    assert!(!dir.path().join("trained.ckpt.onnx").exists());
    let o = qgraph(&["eval", path_str(&trained), "--data", &data]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same graph with new values: a diff shows changed initializers only.
    let o = qgraph(&["diff", path_str(&qdq), path_str(&trained)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("nodes 0 added, 0 removed, 0 changed; initializers 0 added, 0 removed"),
        "{}",
        stdout(&o)
    );
    // Deterministic: a second run writes the same bytes.
    let again = dir.path().join("again.onnx");
    assert!(run(args(&again, "1")).status.success());
    assert_eq!(
        std::fs::read(&trained).unwrap(),
        std::fs::read(&again).unwrap()
    );
    // An interrupted run's checkpoint (here: one epoch's output) resumes:
    // the second epoch alone runs.
    let resumed = dir.path().join("resumed.onnx");
    let mut a = args(&resumed, "2");
    a.extend([
        "--checkpoint".into(),
        path_str(&dir.path().join("ck.onnx")).into(),
        "--resume".into(),
    ]);
    let o = run(args(&dir.path().join("ck.onnx"), "1"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("epoch 2") && !stderr(&o).contains("epoch 1 "),
        "{}",
        stderr(&o)
    );
    // Bad input: a schedule that does not exist, no labels and no teacher.
    let o = run([
        args(&trained, "1"),
        vec!["--schedule".into(), "linear".into()],
    ]
    .concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--schedule") && stderr(&o).contains("linear"),
        "{}",
        stderr(&o)
    );
    let o = run([
        args(&trained, "1"),
        vec!["--labels".into(), "nothing".into()],
    ]
    .concat());
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("nothing"), "{}", stderr(&o));
}

/// A small Conv -> BatchNormalization -> Relu classifier on 28x28 images,
/// in the text form.
fn conv_bn_model() -> String {
    let mut state = 7u64;
    let mut next = |scale: f32| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    };
    let list = |v: Vec<f32>| {
        v.iter()
            .map(|x| format!("{x:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let w = list((0..4 * 9).map(|_| next(0.5)).collect());
    let fc = list((0..10 * 4).map(|_| next(0.5)).collect());
    format!(
        r#"ir_version 8
opset "" 13

graph conv_bn {{
  input %x: f32[N,1,28,28]
  output %y: f32[N,10]
  init %w = f32[4,1,3,3] [{w}]
  init %g = f32[4] [1.0, 0.8, 1.2, 1.0]
  init %beta = f32[4] [0.1, 0.0, -0.1, 0.2]
  init %mean = f32[4] [0.2, 0.1, 0.0, -0.1]
  init %var = f32[4] [0.5, 1.0, 2.0, 1.5]
  init %fc = f32[10,4] [{fc}]
  init %fb = f32[10] [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
  conv: %c = Conv(%x, %w) {{pads = [1, 1, 1, 1]}}
  bn: %n = BatchNormalization(%c, %g, %beta, %mean, %var)
  relu: %r = Relu(%n)
  pool: %p = GlobalAveragePool(%r)
  flat: %f = Flatten(%p)
  gemm: %y = Gemm(%f, %fc, %fb) {{transB = 1}}
}}
"#
    )
}

#[test]
fn insert_keeps_batch_normalization_for_training_to_fold() {
    let dir = tempfile::tempdir().unwrap();
    let float = dir.path().join("float.qgt");
    std::fs::write(&float, conv_bn_model()).unwrap();
    let data = root().join("testdata/data/mnist64.npz");
    let data = path_str(&data).to_string();
    let qdq = dir.path().join("qdq.onnx");
    let o = qgraph(&[
        "insert",
        path_str(&float),
        "--scheme",
        "w4a8",
        "--low-bit-ends",
        "--keep-bn",
        "--calib",
        &data,
        "-o",
        path_str(&qdq),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let show = |path: &Path| {
        let o = qgraph(&["show", path_str(path)]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let text = show(&qdq);
    assert!(text.contains("BatchNormalization"), "{text}");
    let train = |bn: &str, out: &Path| {
        qgraph(&[
            "train",
            path_str(&qdq),
            "--data",
            &data,
            "--epochs",
            "1",
            "--batch",
            "16",
            "--lr",
            "0.01",
            "--bn",
            bn,
            "--bn-freeze",
            "2",
            "--threads",
            "2",
            "-o",
            path_str(out),
        ])
    };
    // Folded while training: the output holds the folded convolution.
    let folded = dir.path().join("folded.onnx");
    let o = train("fold", &folded);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = show(&folded);
    assert!(!text.contains("BatchNormalization"), "{text}");
    assert!(text.contains("conv: %n: f32[N,4,28,28] = Conv("), "{text}");
    let o = qgraph(&["eval", path_str(&folded), "--data", &data]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Kept separate: the same graph with new values.
    let separate = dir.path().join("separate.onnx");
    let o = train("separate", &separate);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = show(&separate);
    assert!(text.contains("BatchNormalization"), "{text}");
    // A bad --bn is refused by name.
    let o = train("sideways", &separate);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--bn"), "{}", stderr(&o));
    // A text form without its data is refused by initializer.
    let elided = dir.path().join("elided.qgt");
    assert!(
        qgraph(&["convert", path_str(&qdq), "-o", path_str(&elided)])
            .status
            .success()
    );
    let o = qgraph(&[
        "train",
        path_str(&elided),
        "--data",
        &data,
        "-o",
        path_str(&separate),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("values were left out"),
        "{}",
        stderr(&o)
    );
}
