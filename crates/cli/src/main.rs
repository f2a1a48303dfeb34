//! The `qgraph` command. Exit codes: 0 ok, 1 differences found (`diff`),
//! 2 bad input or usage, 130 interrupted (`train`, after its checkpoint).
//!
//! Each command lives in `commands/`, with its arguments and its `run`;
//! the argument groups several commands share are in `common.rs`.

mod commands;
mod common;

use clap::{Parser, Subcommand};
use commands::*;
use std::process::ExitCode;

// mimalloc keeps freed pages for the next allocation: tensors of megabytes
// allocated and freed at every step otherwise go back to the system and
// cost a page fault per 4 KiB when touched again (measured on training).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3, the version the crate builds;
/// the bindings have no constant for it): how long freed memory waits
/// before it is given back to the system, in milliseconds; -1 never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory stays with the process. mimalloc gives it back after a
/// second by default; a training step of MobileNetV2 at batch 32 takes
/// longer, so every step faulted its activations in afresh and the kernel
/// zeroed each page: up to half the run's time, 5-8 samples/s against
/// 10-13 with this (four runs each, interleaved). The resident size is the
/// peak either way.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets one integer option of the allocator; called first in
    // main, before any other thread exists (mi_option_set is not thread
    // safe), with an option index inside mimalloc's table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "qgraph",
    version,
    about = "Quantize ONNX models: insert, calibrate, train and freeze Q/DQ graphs",
    after_help = "Exit codes: 0 success, 1 differences found (diff), 2 bad input or usage, \
                  130 interrupted (train, after writing its checkpoint).\n\n\
                  A first run:\n  qgraph insert --scheme int8 model.onnx --calib data.npz      \
                  # writes model.int8.onnx\n  qgraph eval model.int8.onnx --data data.npz --ref model.onnx\n  \
                  qgraph freeze --target tensorrt model.int8.onnx               # writes model.int8.tensorrt.onnx\n\n\
                  Examples:\n  qgraph show model.onnx\n  qgraph diff float.onnx quantized.onnx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Show(show::Args),
    Diff(diff::Args),
    Convert(convert::Args),
    Run(run::Args),
    Insert(insert::Args),
    Report(report::Args),
    Freeze(freeze::Args),
    Verify(verify::Args),
    Infer(infer::Args),
    Eval(eval::Args),
    Train(train::Args),
}

fn main() -> ExitCode {
    keep_freed_memory();
    let outcome = match Cli::parse().command {
        Command::Show(args) => show::run(args),
        Command::Diff(args) => diff::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Run(args) => run::run(args),
        Command::Insert(args) => insert::run(args),
        Command::Report(args) => report::run(args),
        Command::Freeze(args) => freeze::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(common::Failure(message)) => {
            eprintln!("qgraph: error: {message}");
            ExitCode::from(2)
        }
    }
}
