//! End-to-end reliability edges of the `qgraph` binary: inputs nested too
//! deep are refused quickly in one line, and what a killed write leaves
//! behind is cleaned up by the next one.

use qgraph::ir::{AttrValue, DataType, Graph, Model, NewNode, TensorType, ValueType};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgraph"))
        .args(args)
        .output()
        .expect("the qgraph binary runs")
}

fn text(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lenet() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/models/lenet5_mnist_clntrained.onnx")
}

/// Runs `qgraph show FILE` and checks the refusal: exit 2, one line that
/// names the file and contains `want`. Returns the message.
fn refused(file: &Path, want: &str) -> String {
    let start = Instant::now();
    let o = run(&["show", text(file)]);
    let took = start.elapsed();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(text(file)),
        "the message names the file: {err}"
    );
    assert!(err.contains(want), "expected '{want}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    err
}

#[test]
fn text_nested_200000_deep_is_refused_quickly_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, open) in [("brackets.qgt", "["), ("parens.qgt", "(")] {
        let file = dir.path().join(name);
        std::fs::write(
            &file,
            format!("ir_version 8\nopset \"\" 13\n{}", open.repeat(200_000)),
        )
        .unwrap();
        let err = refused(
            &file,
            "line 3, column 401: brackets nested deeper than 400 levels",
        );
        assert!(err.len() < 200, "{err}");
    }
}

/// A model whose `If` nodes nest `depth` deep: each then-branch holds the
/// next `If`, the innermost an `Identity`, as every else-branch does.
fn nested_ifs(depth: usize) -> Model {
    fn identity(name: String) -> Graph {
        let mut g = Graph::new(name.clone());
        let c = g.add_captured("c").unwrap();
        let out = g.add_value(format!("{name}_out"), None).unwrap();
        g.add_node(NewNode::new("Identity").inputs([c]).outputs([out]))
            .unwrap();
        g.set_outputs(vec![out]).unwrap();
        g
    }
    fn at_level(level: usize, depth: usize) -> Graph {
        if level == depth {
            return identity(format!("then{level}"));
        }
        let mut g = Graph::new(format!("then{level}"));
        let c = if level == 0 {
            let bool_scalar = TensorType::new(DataType::Bool, vec![]);
            g.add_input("c", Some(ValueType::Tensor(bool_scalar)))
                .unwrap()
        } else {
            g.add_captured("c").unwrap()
        };
        let out = g.add_value(format!("y{level}"), None).unwrap();
        let then = at_level(level + 1, depth);
        let otherwise = identity(format!("else{}", level + 1));
        g.add_node(
            NewNode::new("If")
                .inputs([c])
                .outputs([out])
                .attr("then_branch", AttrValue::Graph(Box::new(then)))
                .attr("else_branch", AttrValue::Graph(Box::new(otherwise))),
        )
        .unwrap();
        g.set_outputs(vec![out]).unwrap();
        g
    }
    Model::new(at_level(0, depth), 17)
}

#[test]
fn ifs_nested_33_deep_are_refused_in_one_short_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deep_ifs.onnx");
    let bytes = qgraph::onnx::encode_model(&nested_ifs(33)).unwrap();
    std::fs::write(&file, bytes).unwrap();
    let err = refused(&file, "subgraphs nested more than 32 levels deep");
    assert!(err.contains("recursion limit"), "{err}");
    assert!(
        err.trim_end().len() < 300,
        "{} characters: {err}",
        err.len()
    );
    // One level less reads.
    let ok = dir.path().join("ifs_32.onnx");
    std::fs::write(&ok, qgraph::onnx::encode_model(&nested_ifs(32)).unwrap()).unwrap();
    let o = run(&["show", text(&ok)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

fn temporary(path: &Path, age: Duration) {
    std::fs::write(path, b"half a model").unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

#[test]
fn a_write_removes_temporary_files_that_killed_writes_left() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join(".qgraph-Stale0123456789a.tmp");
    let fresh = dir.path().join(".qgraph-Fresh9876543210a.tmp");
    let not_ours = dir.path().join(".qgraph-notes.tmp");
    temporary(&stale, Duration::from_secs(3 * 3600));
    temporary(&fresh, Duration::from_secs(5));
    temporary(&not_ours, Duration::from_secs(3 * 3600));
    let out = dir.path().join("out.onnx");
    let o = run(&["convert", text(&lenet()), "-o", text(&out)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(out.exists());
    assert!(
        !stale.exists(),
        "a temporary file over an hour old is removed"
    );
    assert!(fresh.exists(), "a recent one may be a write in progress");
    assert!(
        not_ours.exists(),
        "a file not named as ours is never touched"
    );
}
