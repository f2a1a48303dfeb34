//! `qgraph eval`: a model on a data set.

use crate::common::{
    emit, load, load_data, sample_bar, BatchArgs, DataArgs, LimitArgs, NormArgs, Outcome,
};
use std::path::PathBuf;
use std::process::ExitCode;

/// Run a model on a data set: accuracy, top-1 agreement and output SQNR
/// against a reference model.
#[derive(clap::Args)]
#[command(
    after_help = "The data set is an .npz file with samples (N first; uint8 or float32) and, \
                  optionally, int64 labels. The model's first output is read as class scores. \
                  Without labels or --ref, eval prints statistics of that output.\n\n\
                  Examples:\n  qgraph eval lenet.onnx --data mnist.npz\n  \
                  qgraph eval quant.onnx --data photos.npz --key x_u8 --ref float.onnx --limit 100"
)]
pub struct Args {
    /// The model to run (.onnx or .qgt).
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// The array of labels (default: y when present).
    #[arg(long, conflicts_with = "no_labels")]
    labels: Option<String>,
    /// Ignore labels even if the file has them.
    #[arg(long)]
    no_labels: bool,
    #[command(flatten)]
    norm: NormArgs,
    /// A reference model (usually the float one) to compare with.
    #[arg(long = "ref", value_name = "MODEL")]
    reference: Option<PathBuf>,
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    limit: LimitArgs,
}

pub fn run(args: Args) -> Outcome {
    let loaded = load(&args.model)?;
    let reference = args
        .reference
        .as_ref()
        .map(|r| load(r).map(|l| (r, l)))
        .transpose()?;
    let labels = if args.no_labels {
        Some("")
    } else {
        args.labels.as_deref()
    };
    let ds = load_data(&args.data, labels, (&args.model, &loaded.model))?;
    let mut recorded = vec![(args.model.as_path(), &loaded.model)];
    if let Some((r, l)) = &reference {
        recorded.push((r.as_path(), &l.model));
    }
    let norm = args.norm.resolve(&recorded)?;
    let indices = args.limit.indices(ds.len());
    let bar = sample_bar(indices.len(), "");
    let m = qgraph::data::measure(
        &loaded.model,
        reference.as_ref().map(|(_, l)| &l.model),
        &ds,
        norm,
        args.batch.batch,
        &indices,
        |done| bar.set_position(done as u64),
    )
    .map_err(|e| e.in_file(&args.model))?;
    bar.finish_and_clear();
    let mut text = format!(
        "model      {}\ndata       {}: '{}', {} of {} samples, norm {}\n",
        args.model.display(),
        args.data.data.display(),
        ds.key,
        m.samples,
        ds.len(),
        norm.name()
    );
    if let Some(c) = m.correct {
        text += &format!(
            "accuracy   {:.4} ({c}/{})\n",
            c as f64 / m.samples as f64,
            m.samples
        );
    }
    if let (Some(a), Some((r, _))) = (m.agree, &reference) {
        text += &format!(
            "agreement  {:.4} ({a}/{}) top-1 with {}\n",
            a as f64 / m.samples as f64,
            m.samples,
            r.display()
        );
    }
    if let Some(db) = m.sqnr_db {
        text += &format!("sqnr       {db:.2} dB\n");
    }
    if m.correct.is_none() && reference.is_none() {
        let o = &m.output;
        let (top, times) = o
            .top1_counts
            .iter()
            .enumerate()
            .max_by_key(|&(c, n)| (n, std::cmp::Reverse(c)))
            .map_or((0, 0), |(c, &n)| (c, n));
        let distinct = o.top1_counts.iter().filter(|&&n| n > 0).count();
        text += &format!(
            "output     min {:.4}, max {:.4}, mean {:.4}, std {:.4} over {} values\n\
             top-1      {distinct} distinct classes; most often {top} ({times} of {} samples)\n\
             note       no labels and no --ref, so no accuracy: give --labels, or --ref MODEL \
             to compare with\n",
            o.min, o.max, o.mean, o.std, o.elements, m.samples
        );
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}
