//! The `qgraph` command. Exit codes: 0 ok, 1 differences found (`diff`),
//! 2 bad input or usage.

use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qgraph",
    version,
    about = "Quantize ONNX models: insert, calibrate, train and freeze Q/DQ graphs",
    after_help = "Exit codes: 0 success, 1 differences found (diff), 2 bad input or usage.\n\n\
                  Examples:\n  qgraph show model.onnx\n  qgraph convert model.onnx -o model.qgt\n  qgraph diff float.onnx quantized.onnx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model in qgraph's text form.
    #[command(
        after_help = "Tensors with more than 16 elements are shown by type, shape and a content digest \
                      (<blake3:...>) unless --all-data is given.\n\n\
                      Examples:\n  qgraph show model.onnx\n  qgraph show model.onnx | less\n  \
                      qgraph show --all-data model.onnx -o model.qgt"
    )]
    Show {
        /// The model: .onnx, or the text form (.qgt).
        model: PathBuf,
        /// Print every tensor's values.
        #[arg(long)]
        all_data: bool,
        /// Write the text to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Show what changed between two models; exit 1 when they differ.
    #[command(
        after_help = "Nodes are matched by name (unnamed ones by their first output); initializers by \
                      name, with the largest absolute difference of their values.\n\n\
                      Examples:\n  qgraph diff float.onnx quantized.onnx\n  \
                      qgraph diff expected.qgt actual.onnx || echo \"the models differ\""
    )]
    Diff {
        /// The model before (.onnx or .qgt).
        a: PathBuf,
        /// The model after (.onnx or .qgt).
        b: PathBuf,
    },
    /// Read, verify and write a model (ONNX or the text form, by extension).
    #[command(
        after_help = "The output is written to a temporary file and renamed into place, so it is \
                      never half-written. Writing is deterministic: the same input gives the same bytes.\n\n\
                      Examples:\n  qgraph convert model.onnx -o checked.onnx\n  \
                      qgraph convert model.onnx -o model.qgt --all-data\n  \
                      qgraph convert fixture.qgt -o fixture.onnx\n  \
                      qgraph convert big.onnx -o out.onnx --external-data always"
    )]
    Convert {
        /// The model to read (.onnx or .qgt).
        input: PathBuf,
        /// Where to write: .onnx, or .qgt for the text form.
        #[arg(short, long)]
        output: PathBuf,
        /// Where tensor data goes in an ONNX output: inline unless the model
        /// passes protobuf's 2 GiB limit (auto), always in `<output>.data`, or never.
        #[arg(long, value_enum, default_value_t = ExternalArg::Auto)]
        external_data: ExternalArg,
        /// For a text output: print every tensor's values.
        #[arg(long)]
        all_data: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExternalArg {
    Auto,
    Always,
    Never,
}

/// A failure to report: exit 2 with the message.
struct Failure(String);

impl From<qgraph::Error> for Failure {
    fn from(e: qgraph::Error) -> Failure {
        Failure(e.to_string())
    }
}

fn load(path: &Path) -> Result<qgraph::Loaded, Failure> {
    let loaded = qgraph::load(path)?;
    for w in &loaded.warnings {
        eprintln!("qgraph: warning: {}: {w}", path.display());
    }
    Ok(loaded)
}

/// Writes to standard output; a closed pipe (`qgraph show m.onnx | head`)
/// ends the program quietly rather than with an error.
fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure(format!("cannot write to standard output: {e}"))),
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Show {
            model,
            all_data,
            output,
        } => {
            let loaded = load(&model)?;
            let opts = if all_data {
                qgraph::text::PrintOptions::with_all_data()
            } else {
                qgraph::text::PrintOptions::default()
            };
            let text = qgraph::show(&loaded.model, &opts);
            match output {
                Some(path) => qgraph::onnx::write_atomic(&path, text.as_bytes())
                    .map_err(|e| Failure(format!("{}: {e}", path.display())))?,
                None => emit(&text)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b } => {
            let (ma, mb) = (load(&a)?, load(&b)?);
            let d = qgraph::diff::diff_models(&ma.model, &mb.model);
            if d.is_empty() {
                emit("no differences\n")?;
                Ok(ExitCode::SUCCESS)
            } else {
                emit(&d.render(&a.display().to_string(), &b.display().to_string()))?;
                Ok(ExitCode::from(1))
            }
        }
        Command::Convert {
            input,
            output,
            external_data,
            all_data,
        } => {
            let loaded = load(&input)?;
            let external_data = match external_data {
                ExternalArg::Auto => qgraph::onnx::ExternalData::Auto,
                ExternalArg::Always => qgraph::onnx::ExternalData::Always,
                ExternalArg::Never => qgraph::onnx::ExternalData::Never,
            };
            let opts = qgraph::SaveOptions {
                external_data,
                all_data,
            };
            qgraph::save(&loaded.model, &output, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("qgraph: error: {message}");
            ExitCode::from(2)
        }
    }
}
