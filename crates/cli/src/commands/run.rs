//! `qgraph run`: a pipeline of graph passes.

use crate::common::{check_writable, emit, load, Failure, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;

/// Run a pipeline of graph passes over a model.
#[derive(clap::Args)]
#[command(
    override_usage = "qgraph run --passes <PIPELINE> <INPUT> -o <OUTPUT> [OPTIONS]\n       \
                      qgraph run --list",
    after_help = "A pipeline is a comma-separated list of passes, each with optional parameters \
                  in parentheses; `cleanup` stands for `remove-noops,dce`. `--list` shows every pass. \
                  The model is verified after each pass; an error names the pass.\n\n\
                  Examples:\n  qgraph run --passes \"fold-constants,fold-bn,cleanup\" model.onnx -o folded.onnx\n  \
                  qgraph run --passes \"fold-constants(max-elements=4096),dce\" model.onnx -o out.onnx --dump-after dumps/\n  \
                  qgraph run --passes fold-bn model.onnx -o out.onnx --rewrite-limit 3   # bisect a bad rewrite\n  \
                  qgraph run --list"
)]
pub struct Args {
    /// The model to read (.onnx or .qgt).
    #[arg(required_unless_present = "list")]
    input: Option<PathBuf>,
    /// The pipeline, e.g. "fold-constants,fold-bn,cleanup".
    #[arg(long, value_name = "PIPELINE", required_unless_present = "list")]
    passes: Option<String>,
    /// Where to write the result: .onnx, or .qgt for the text form.
    #[arg(short, long, required_unless_present = "list")]
    output: Option<PathBuf>,
    /// Write the text form of the model after each pass into this
    /// folder, as NN-<pass>.qgt.
    #[arg(long, value_name = "DIR")]
    dump_after: Option<PathBuf>,
    /// Stop rewriting after this many rewrites in total (to find the
    /// rewrite that breaks a model).
    #[arg(long, value_name = "N")]
    rewrite_limit: Option<usize>,
    /// Repeat the pipeline until it changes nothing, at most N times.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = crate::common::positive)]
    fixpoint: usize,
    /// List the passes and exit.
    #[arg(long, exclusive = true)]
    list: bool,
}

/// The passes and aliases, one per line, names padded to the longest.
fn pass_list() -> String {
    let passes = qgraph::passes::registry();
    let width = passes
        .iter()
        .map(|p| p.name.len())
        .chain(qgraph::passes::ALIASES.iter().map(|(a, _)| a.len()))
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for p in passes {
        text += &format!("{:<width$}  {}\n", p.name, p.summary);
    }
    for (alias, seq) in qgraph::passes::ALIASES {
        text += &format!("{:<width$}  the same as {}\n", alias, seq.join(","));
    }
    text
}

pub fn run(args: Args) -> Outcome {
    if args.list {
        emit(&pass_list())?;
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(input), Some(passes), Some(output)) = (args.input, args.passes, args.output) else {
        return Err(Failure("run needs a model, --passes and -o".into()));
    };
    let driver = qgraph::passes::Driver::from_pipeline(&passes)
        .map_err(|e| Failure(format!("--passes: {e}")))?
        .rewrite_limit(args.rewrite_limit)
        .fixpoint(args.fixpoint);
    check_writable(&output)?;
    if let Some(dir) = &args.dump_after {
        std::fs::create_dir_all(dir).map_err(|e| Failure(format!("{}: {e}", dir.display())))?;
    }
    let mut model = load(&input)?.model;
    let before = model.graph.node_count();
    let mut step = 0;
    let mut dump_error = None;
    let report = driver
        .run_with(&mut model, |pass, m| {
            step += 1;
            let Some(dir) = &args.dump_after else { return };
            let path = dir.join(format!("{step:02}-{pass}.qgt"));
            let text = qgraph::text::print_model(m, &Default::default());
            if let Err(e) = qgraph::onnx::write_atomic(&path, text.as_bytes()) {
                dump_error.get_or_insert(format!("{}: {e}", path.display()));
            }
        })
        .map_err(|e| Failure(format!("{}: {e}", input.display())))?;
    if let Some(e) = dump_error {
        return Err(Failure(e));
    }
    qgraph::save(&model, &output, &qgraph::SaveOptions::default())?;
    let changed: Vec<&str> = report
        .runs
        .iter()
        .filter(|(_, c)| *c)
        .map(|(p, _)| *p)
        .collect();
    eprintln!(
        "qgraph: {} nodes -> {}; {} rewrites; changed by: {}{}",
        before,
        model.graph.node_count(),
        report.rewrites,
        if changed.is_empty() {
            "none".to_string()
        } else {
            changed.join(", ")
        },
        if args.fixpoint > 1 && !report.converged {
            format!(" (still changing after {} rounds)", report.rounds)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
