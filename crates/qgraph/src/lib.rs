//! qgraph as a library: load a model (ONNX or the text form), inspect or
//! change it through the IR, print it, diff it, save it.
//!
//! ```no_run
//! let loaded = qgraph::load("model.onnx".as_ref())?;
//! println!("{}", qgraph::show(&loaded.model, &qgraph::text::PrintOptions::default()));
//! qgraph::save(&loaded.model, "copy.onnx".as_ref(), &qgraph::SaveOptions::default())?;
//! # Ok::<(), qgraph::Error>(())
//! ```

// README.md's Rust examples compile (and run, where not `no_run`) as this
// crate's doc tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod data;
pub mod freeze;
pub mod infer;
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

/// The one error type of the library: a message, and the file it is about
/// when there is one (`path: message` when displayed).
#[derive(Debug)]
pub struct Error {
    path: Option<PathBuf>,
    message: String,
}

impl Error {
    /// An error about the file at `path`.
    pub fn new(path: &Path, message: impl std::fmt::Display) -> Error {
        Error {
            path: Some(path.to_path_buf()),
            message: message.to_string(),
        }
    }

    /// An error about no file in particular (a model in memory, an option).
    pub fn msg(message: impl std::fmt::Display) -> Error {
        Error {
            path: None,
            message: message.to_string(),
        }
    }

    /// The same error about the file at `path`, unless it names one already.
    pub fn in_file(self, path: &Path) -> Error {
        match self.path {
            Some(_) => self,
            None => Error {
                path: Some(path.to_path_buf()),
                message: self.message,
            },
        }
    }

    /// The file the error is about, when there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The message, without the file.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Error {
        Error::msg(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Error {
        Error::msg(message)
    }
}

/// The value of `key` in a model's metadata (`metadata_props`), where
/// qgraph records what later commands need (scheme, placement,
/// normalisation, training state).
pub(crate) fn meta_value<'m>(model: &'m ir::Model, key: &str) -> Option<&'m str> {
    model
        .meta
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Sets `key` in a model's metadata, replacing any value it had.
pub(crate) fn set_meta_value(model: &mut ir::Model, key: &str, value: String) {
    model.meta.retain(|(k, _)| k != key);
    model.meta.push((key.to_string(), value));
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
    let driver = passes::Driver::from_pipeline(pipeline).map_err(Error::msg)?;
    driver.run(model).map_err(Error::msg)
}
