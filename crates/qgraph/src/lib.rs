//! qgraph as a library: load a model (ONNX or the text form), inspect or
//! change it through the IR, print it, diff it, save it.
//!
//! ```no_run
//! let loaded = qgraph::load("model.onnx".as_ref())?;
//! println!("{}", qgraph::show(&loaded.model, &qgraph::text::PrintOptions::default()));
//! qgraph::save(&loaded.model, "copy.onnx".as_ref(), &qgraph::SaveOptions::default())?;
//! # Ok::<(), qgraph::Error>(())
//! ```

pub mod data;
pub mod freeze;
pub mod insert;
pub mod moments;
pub mod report;
pub mod train;

use std::path::{Path, PathBuf};

pub use qgraph_diff as diff;
pub use qgraph_eval as eval;
pub use qgraph_ir as ir;
pub use qgraph_onnx as onnx;
pub use qgraph_passes as passes;
pub use qgraph_quant as quant;
pub use qgraph_text as text;
pub use qgraph_train as trainer;

/// An error about one file, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct Error {
    pub path: PathBuf,
    pub message: String,
}

impl Error {
    fn new(path: &Path, message: impl std::fmt::Display) -> Error {
        Error {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// The two file formats qgraph reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Onnx,
    /// qgraph's text form (`.qgt`).
    Text,
}

/// The format of a path: `.onnx` is ONNX, `.qgt` and `.txt` are text;
/// anything else is decided by its content when it is read, and is ONNX when
/// written.
pub fn format_of(path: &Path) -> Option<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("onnx") => Some(Format::Onnx),
        Some("qgt") | Some("txt") => Some(Format::Text),
        _ => None,
    }
}

/// Whether bytes look like the text form: UTF-8 whose first statement, after
/// blank and comment lines, is `ir_version`.
fn looks_like_text(bytes: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(&bytes[..bytes.len().min(4096)]) else {
        return false;
    };
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.starts_with("ir_version"))
}

/// A loaded model.
#[derive(Debug)]
pub struct Loaded {
    pub model: ir::Model,
    pub format: Format,
    /// What the reader dropped (things the IR does not keep).
    pub warnings: Vec<String>,
    pub used_external_data: bool,
}

/// Reads and verifies a model from an ONNX or text file.
pub fn load(path: &Path) -> Result<Loaded, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::new(path, e))?;
    let format = format_of(path).unwrap_or(if looks_like_text(&bytes) {
        Format::Text
    } else {
        Format::Onnx
    });
    match format {
        Format::Onnx => {
            let loaded = onnx::read_model(path).map_err(|e| Error::new(path, e))?;
            Ok(Loaded {
                model: loaded.model,
                format,
                warnings: loaded.warnings,
                used_external_data: loaded.used_external_data,
            })
        }
        Format::Text => {
            let src = String::from_utf8(bytes)
                .map_err(|_| Error::new(path, "the text form must be UTF-8"))?;
            let model = text::parse_model(&src).map_err(|e| Error::new(path, e))?;
            Ok(Loaded {
                model,
                format,
                warnings: Vec::new(),
                used_external_data: false,
            })
        }
    }
}

/// How to save.
#[derive(Clone, Copy, Debug, Default)]
pub struct SaveOptions {
    pub external_data: onnx::ExternalData,
    /// For the text form: print every tensor's values.
    pub all_data: bool,
}

/// Verifies and writes a model, atomically, in the format its extension
/// names (ONNX unless `.qgt`/`.txt`).
pub fn save(model: &ir::Model, path: &Path, options: &SaveOptions) -> Result<(), Error> {
    ir::verify_model(model)
        .map_err(|e| Error::new(path, format!("refusing to write an invalid model: {e}")))?;
    match format_of(path).unwrap_or(Format::Onnx) {
        Format::Onnx => {
            let opts = onnx::WriteOptions {
                external_data: options.external_data,
            };
            onnx::write_model(model, path, &opts).map_err(|e| Error::new(path, e))?;
        }
        Format::Text => {
            let print_opts = if options.all_data {
                text::PrintOptions::with_all_data()
            } else {
                text::PrintOptions::default()
            };
            let s = text::print_model(model, &print_opts);
            onnx::write_atomic(path, s.as_bytes()).map_err(|e| Error::new(path, e))?;
        }
    }
    Ok(())
}

/// The text form of a model, as `qgraph show` prints it.
pub fn show(model: &ir::Model, options: &text::PrintOptions) -> String {
    text::print_model(model, options)
}

/// Runs a pass pipeline written as a string, such as
/// `fold-constants,fold-bn,fuse-conv-bn-act,cleanup`, verifying the model
/// after every pass.
///
/// ```no_run
/// use std::path::Path;
/// let mut model = qgraph::load(Path::new("model.onnx"))?.model;
/// let report = qgraph::run_passes(&mut model, "fold-constants,fold-bn,cleanup")?;
/// println!("{} rewrites", report.rewrites);
/// qgraph::save(&model, Path::new("folded.onnx"), &qgraph::SaveOptions::default())?;
///
/// // The same pipeline built from code:
/// use qgraph::passes::{DeadCodeElimination, Driver, FoldBatchNorm, FoldConstants};
/// Driver::new()
///     .add(FoldConstants::default())
///     .add(FoldBatchNorm)
///     .add(DeadCodeElimination)
///     .run(&mut model)
///     .map_err(|e| e.to_string())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn run_passes(model: &mut ir::Model, pipeline: &str) -> Result<passes::Report, Error> {
    let driver = passes::Driver::from_pipeline(pipeline)
        .map_err(|e| Error::new(Path::new("--passes"), e))?;
    driver
        .run(model)
        .map_err(|e| Error::new(Path::new("--passes"), e.to_string()))
}
