//! End-to-end reliability edges of the `qgraph` binary: inputs nested too
//! deep are refused quickly in one line, and what a killed write leaves
//! behind is cleaned up by the next one.

mod common;
#[path = "../../onnx/tests/support/nested_ifs.rs"]
mod support;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use support::nested_ifs;

/// Runs `qgraph show FILE` and checks the refusal: exit 2, one line that
/// names the file and contains `want`. Returns the message.
fn refused(file: &Path, want: &str) -> String {
    let start = Instant::now();
    let o = qgraph(&["show", path_str(file)]);
    let took = start.elapsed();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(path_str(file)),
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
    let o = qgraph(&["show", path_str(&ok)]);
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
    let o = qgraph(&["convert", &lenet(), "-o", path_str(&out)]);
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
