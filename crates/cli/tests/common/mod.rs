//! What the end-to-end tests of the `qgraph` binary share: running it, the
//! bundled model, and reading what it printed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn qgraph(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgraph"))
        .args(args)
        .output()
        .expect("the qgraph binary runs")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn lenet() -> String {
    root()
        .join("testdata/models/lenet5_mnist_clntrained.onnx")
        .display()
        .to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
