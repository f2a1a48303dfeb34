//! What the commands share: the argument groups every command spells the
//! same way (data, normalisation, limit, batch), failures, loading,
//! output checks and progress bars.

use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A failure to report: exit 2 with the message.
pub struct Failure(pub String);

impl From<qgraph::Error> for Failure {
    fn from(e: qgraph::Error) -> Failure {
        Failure(e.to_string())
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure(message)
    }
}

pub type Outcome = Result<std::process::ExitCode, Failure>;

/// The data set a command runs on.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// The data set (.npz: samples N first, uint8 or float32; int64 labels).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The array of samples (default: x, else x_u8).
    #[arg(long)]
    pub key: Option<String>,
}

/// How many samples a command uses.
#[derive(Args, Clone, Copy)]
pub struct LimitArgs {
    /// Use N samples spread evenly over the data (default: all). The same
    /// N give the same samples every time.
    #[arg(long, value_name = "N", value_parser = positive)]
    pub limit: Option<usize>,
}

impl LimitArgs {
    pub fn indices(&self, len: usize) -> Vec<usize> {
        qgraph::data::spread_samples(len, self.limit.unwrap_or(usize::MAX))
    }
}

/// Samples per batch.
#[derive(Args, Clone, Copy)]
pub struct BatchArgs {
    /// Samples per batch.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = positive)]
    pub batch: usize,
}

/// The input normalisation.
#[derive(Args, Clone, Copy)]
pub struct NormArgs {
    /// Input normalisation (default: the one `qgraph insert` recorded in the
    /// model, else none).
    #[arg(long, value_enum)]
    pub norm: Option<NormArg>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum NormArg {
    /// Per-channel ImageNet mean/std after scaling uint8 to [0, 1].
    Imagenet,
    /// (x_u8 - 127) / 128, as TensorFlow models expect.
    Tf,
    /// uint8 scaled to [0, 1]; float data as stored.
    None,
}

impl From<NormArg> for qgraph::data::Norm {
    fn from(n: NormArg) -> Self {
        match n {
            NormArg::Imagenet => qgraph::data::Norm::Imagenet,
            NormArg::Tf => qgraph::data::Norm::Tf,
            NormArg::None => qgraph::data::Norm::None,
        }
    }
}

impl NormArgs {
    /// The normalisation to use: the flag, else the first one recorded in
    /// `models`, else none. A flag that contradicts a recorded one is used,
    /// with a warning.
    pub fn resolve(
        &self,
        models: &[(&Path, &qgraph::ir::Model)],
    ) -> Result<qgraph::data::Norm, Failure> {
        let mut recorded = None;
        for (path, model) in models {
            if let Some(n) = qgraph::data::recorded_norm(model).map_err(|e| e.in_file(path))? {
                recorded.get_or_insert((n, *path));
            }
        }
        Ok(match (self.norm.map(qgraph::data::Norm::from), recorded) {
            (Some(flag), Some((r, path))) if flag != r => {
                eprintln!(
                    "qgraph: warning: --norm {} contradicts the normalisation {} records ({}); \
                     using {}",
                    flag.name(),
                    path.display(),
                    r.name(),
                    flag.name()
                );
                flag
            }
            (Some(flag), _) => flag,
            (None, Some((r, _))) => r,
            (None, None) => qgraph::data::Norm::None,
        })
    }
}

/// A count of at least one.
pub fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a whole number")),
    }
}

/// Reads a model, printing what the reader dropped as warnings.
pub fn load(path: &Path) -> Result<qgraph::Loaded, Failure> {
    let loaded = qgraph::load(path)?;
    for w in &loaded.warnings {
        eprintln!("qgraph: warning: {}: {w}", path.display());
    }
    Ok(loaded)
}

/// Reads a data set, and checks that its samples fit `model`'s input.
pub fn load_data(
    data: &DataArgs,
    labels: Option<&str>,
    model: (&Path, &qgraph::ir::Model),
) -> Result<qgraph::data::Dataset, Failure> {
    let ds = qgraph::data::Dataset::load_npz(&data.data, data.key.as_deref(), labels)?;
    check_fits(&ds, &data.data, model)?;
    Ok(ds)
}

/// Data that does not fit a model is the data's fault: say so before any
/// work, naming both files.
pub fn check_fits(
    ds: &qgraph::data::Dataset,
    data: &Path,
    (path, model): (&Path, &qgraph::ir::Model),
) -> Result<(), Failure> {
    ds.check_fits(model).map_err(|e| {
        Failure(format!(
            "{}: does not fit the model {}: {e}",
            data.display(),
            path.display()
        ))
    })
}

/// `<input's folder>/<input's stem>.<suffix>.onnx`: where a command writes
/// when not told.
pub fn default_output(input: &Path, suffix: &str) -> PathBuf {
    let stem = input.file_stem().unwrap_or_default().to_string_lossy();
    input.with_file_name(format!("{stem}.{suffix}.onnx"))
}

/// Checks, before any work, that a file can be written at `path`: its
/// folder exists and takes new files, and it is not a folder itself.
pub fn check_writable(path: &Path) -> Result<(), Failure> {
    let fail = |why: String| Err(Failure(format!("{}: {why}", path.display())));
    if path.is_dir() {
        return fail("is a folder; give a file name".into());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return fail(format!("the folder {} does not exist", dir.display()));
    }
    match tempfile::Builder::new()
        .prefix(".qgraph-probe-")
        .tempfile_in(dir)
    {
        Ok(_) => Ok(()),
        Err(e) => fail(format!("cannot write in {}: {e}", dir.display())),
    }
}

/// Writes to standard output; a closed pipe (`qgraph show m.onnx | head`)
/// ends the program quietly rather than with an error.
pub fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure(format!("cannot write to standard output: {e}"))),
    }
}

/// A progress bar over `total` samples, its line starting with `label`.
pub fn sample_bar(total: usize, label: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label}{{bar:40}} {{pos}}/{{len}} samples  {{rate}}  eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key("rate", rate),
    )
}

/// `12.3 samples/s`, for a progress bar's `{rate}`.
pub fn rate(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{} samples/s", round_rate(state.per_sec()));
}

/// A rate to three significant digits at most: 11.0946 -> "11.1".
pub fn round_rate(per_sec: f64) -> String {
    if per_sec >= 100.0 {
        format!("{per_sec:.0}")
    } else if per_sec >= 10.0 {
        format!("{per_sec:.1}")
    } else {
        format!("{per_sec:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_outputs_sit_beside_the_input() {
        assert_eq!(
            default_output(Path::new("dir/m.onnx"), "int8"),
            Path::new("dir/m.int8.onnx")
        );
        assert_eq!(
            default_output(Path::new("m.int8.onnx"), "tensorrt"),
            Path::new("m.int8.tensorrt.onnx")
        );
    }

    #[test]
    fn rates_keep_three_digits() {
        assert_eq!(round_rate(11.0946), "11.1");
        assert_eq!(round_rate(2.345), "2.35");
        assert_eq!(round_rate(1234.4), "1234");
    }

    #[test]
    fn counts_are_positive() {
        assert!(positive("0").is_err());
        assert!(positive("-1").is_err());
        assert_eq!(positive("3"), Ok(3));
    }
}
