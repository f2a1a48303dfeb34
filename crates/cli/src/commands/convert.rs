//! `qgraph convert`: read, verify and write a model.

use crate::common::{check_writable, load, Outcome};
use clap::ValueEnum;
use std::path::PathBuf;
use std::process::ExitCode;

/// Read, verify and write a model (ONNX or the text form, by extension).
#[derive(clap::Args)]
#[command(
    after_help = "The output is written to a temporary file and renamed into place, so it is \
                  never half-written. Writing is deterministic: the same input gives the same bytes.\n\n\
                  Examples:\n  qgraph convert model.onnx -o checked.onnx\n  \
                  qgraph convert model.onnx -o model.qgt --all-data\n  \
                  qgraph convert fixture.qgt -o fixture.onnx\n  \
                  qgraph convert big.onnx -o out.onnx --external-data always"
)]
pub struct Args {
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
}

#[derive(Clone, Copy, ValueEnum)]
enum ExternalArg {
    Auto,
    Always,
    Never,
}

pub fn run(args: Args) -> Outcome {
    check_writable(&args.output)?;
    let loaded = load(&args.input)?;
    let external_data = match args.external_data {
        ExternalArg::Auto => qgraph::onnx::ExternalData::Auto,
        ExternalArg::Always => qgraph::onnx::ExternalData::Always,
        ExternalArg::Never => qgraph::onnx::ExternalData::Never,
    };
    let opts = qgraph::SaveOptions {
        external_data,
        all_data: args.all_data,
    };
    qgraph::save(&loaded.model, &args.output, &opts)?;
    Ok(ExitCode::SUCCESS)
}
