//! `qgraph insert`: place Q/DQ pairs by a scheme, calibrate the activation
//! ranges on data, and rewrite the model (the `insert-qdq` pass's code).
//!
//! Calibration streams: the evaluator hands each watched activation to its
//! observer as it is computed, batch by batch, and the observers keep only
//! their bounded state (a min-max pair or a 2048-bin histogram), never the
//! activations.

use crate::data::{Dataset, Norm};
use crate::moments::Reader;
use qgraph_eval::Evaluator;
use qgraph_ir::{Model, NodeId, Tensor, ValueId};
use qgraph_passes::{
    insert_qdq, plan_qdq, Calibrated, InsertOptions, InsertReport, Override, QdqPlan, Site,
    RANGE_KEY,
};
use qgraph_quant::observe::{AbsHistogram, MinMax};
use qgraph_quant::rounding::SecondMoment;
use qgraph_quant::{
    range_for_scale, Grid, Params, RangeInit, RangeMode, Scheme, PACT_INITIAL_ALPHA,
};
use std::collections::HashMap;

/// Per-layer overrides from TOML: a list of `[[override]]` tables, each
/// with a matcher (`name`, a regular expression searched in node names, and
/// or `op`, an op type) and what to do (`exclude = true` keeps the matched
/// nodes float; `weight-bits`, `activation-bits` from 2 to 16 set their
/// widths). Later entries win. Errors name the entry and the key.
pub fn parse_overrides(text: &str) -> Result<Vec<Override>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = Vec::new();
    for key in table.keys() {
        if key != "override" {
            return Err(format!(
                "unknown key '{key}' (the file holds [[override]] tables)"
            ));
        }
    }
    let entries = match table.get("override") {
        None => return Ok(out),
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err("'override' must be an array of tables ([[override]])".into()),
    };
    for (i, entry) in entries.iter().enumerate() {
        let at = |msg: String| format!("override {}: {msg}", i + 1);
        let toml::Value::Table(t) = entry else {
            return Err(at("not a table".into()));
        };
        let mut o = Override::default();
        for (k, v) in t {
            match (k.as_str(), v) {
                ("name", toml::Value::String(r)) => {
                    o.name = Some(
                        regex::Regex::new(r)
                            .map_err(|e| at(format!("'name' is not a regular expression: {e}")))?,
                    )
                }
                ("op", toml::Value::String(op)) => o.op = Some(op.clone()),
                ("exclude", toml::Value::Boolean(b)) => o.exclude = *b,
                ("weight-bits" | "activation-bits", toml::Value::Integer(b)) => {
                    if !(2..=16).contains(b) {
                        return Err(at(format!("'{k}' must be from 2 to 16, not {b}")));
                    }
                    if k == "weight-bits" {
                        o.weight_bits = Some(*b as u8);
                    } else {
                        o.activation_bits = Some(*b as u8);
                    }
                }
                ("name" | "op" | "exclude" | "weight-bits" | "activation-bits", v) => {
                    return Err(at(format!("'{k}' has the wrong type ({})", v.type_str())))
                }
                _ => {
                    return Err(at(format!(
                        "unknown key '{k}' (known: name, op, exclude, weight-bits, activation-bits)"
                    )))
                }
            }
        }
        if o.name.is_none() && o.op.is_none() {
            return Err(at(
                "give 'name' or 'op' (a rule without them matches every node)".into(),
            ));
        }
        out.push(o);
    }
    Ok(out)
}

/// How an activation's range is chosen from what calibration observed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// The extremes seen.
    MinMax,
    /// The |x| below which this percentage of the values lie.
    Percentile(f64),
    /// TensorRT's entropy calibration (least KL divergence).
    Entropy,
    /// The clipping threshold of least expected squared error.
    Mse,
}

impl Method {
    pub fn describe(&self) -> String {
        match self {
            Method::MinMax => "minmax".into(),
            Method::Percentile(p) => format!("percentile {p}"),
            Method::Entropy => "entropy".into(),
            Method::Mse => "mse".into(),
        }
    }
}

enum Observer {
    MinMax(MinMax),
    Histogram(AbsHistogram),
    /// LSQ: the mean |x| of the first batch, and the extremes (for the sign).
    FirstBatchMeanAbs {
        mean: Option<f64>,
        extremes: MinMax,
    },
}

/// How weights are rounded onto their grids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Each weight to its nearest grid point.
    Nearest,
    /// Each output channel's weights together, to minimise the op's output
    /// error on the calibration inputs (GPTQ's optimal brain quantizer; see
    /// `qgraph_quant::rounding`). Needs calibration data; 2-D convolutions,
    /// Gemm and MatMul with a 2-D weight.
    Gptq,
    /// `Gptq` for weights below 8 bits, `Nearest` for the others: at 8
    /// bits per channel, activation noise dominates (MobileNetV2 int8:
    /// output SQNR 19.2 dB either way, while with 16-bit activations
    /// nearest gives 28.5 dB and this 33.3 dB), and the second moments
    /// cost about a third of the calibration time.
    GptqBelow8Bits,
}

impl Rounding {
    pub fn parse(name: &str) -> Result<Rounding, String> {
        match name {
            "nearest" => Ok(Rounding::Nearest),
            "gptq" => Ok(Rounding::Gptq),
            "auto" => Ok(Rounding::GptqBelow8Bits),
            other => Err(format!(
                "unknown rounding '{other}'; the roundings are auto, nearest, gptq"
            )),
        }
    }
}

/// The calibration data: samples of a data set, normalised, in batches.
pub struct Calibration<'a> {
    pub data: &'a Dataset,
    /// The samples used, in order.
    pub samples: Vec<usize>,
    pub norm: Norm,
    pub batch: usize,
    pub method: Method,
    pub rounding: Rounding,
}

impl<'a> Calibration<'a> {
    /// Every sample of `data`, not normalised further, in batches of 32,
    /// min-max ranges, and GPTQ rounding for weights below 8 bits: what
    /// `qgraph insert --calib` does by default.
    pub fn new(data: &'a Dataset) -> Calibration<'a> {
        Calibration {
            data,
            samples: (0..data.len()).collect(),
            norm: Norm::None,
            batch: 32,
            method: Method::MinMax,
            rounding: Rounding::GptqBelow8Bits,
        }
    }
}

/// The weighted ops whose weights output-aware rounding covers, by the
/// value they read: the op, how it reads, and its moments.
type MomentWatch = HashMap<ValueId, Vec<(NodeId, Reader, Vec<SecondMoment>)>>;

fn moment_watch(model: &Model, sites: &[Site], rounding: Rounding) -> MomentWatch {
    let g = &model.graph;
    let mut watch: MomentWatch = HashMap::new();
    let covered = |s: &Site| match rounding {
        Rounding::Nearest => false,
        Rounding::Gptq => true,
        Rounding::GptqBelow8Bits => s.scheme.grid.bits < 8,
    };
    for site in sites.iter().filter(|s| s.weight && covered(s)) {
        let [(node, 1)] = site.uses[..] else { continue };
        let Some(init) = g.value(site.value).initializer() else {
            continue;
        };
        let Some(x) = g.node(node).inputs().first().copied().flatten() else {
            continue;
        };
        if let Some(reader) = Reader::of(g, node, init.tensor.shape()) {
            let moments = reader.moments();
            watch.entry(x).or_default().push((node, reader, moments));
        }
    }
    watch
}

pub use crate::data::spread_samples;

/// The sum of `values` in f64, over eight lanes the compiler keeps in
/// vector registers (a single running sum cannot be reordered into them).
fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v as f64;
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    lanes.iter().sum::<f64>() + rest
}

/// Per-channel sums (axis 1) of a tensor's values, and how many each has.
#[derive(Default)]
struct ChannelSums {
    sums: Vec<f64>,
    count: u64,
}

impl ChannelSums {
    fn observe(&mut self, shape: &[usize], values: &[f32]) {
        use rayon::prelude::*;
        let (n, c) = (
            shape.first().copied().unwrap_or(1),
            shape.get(1).copied().unwrap_or(1),
        );
        let inner: usize = shape.iter().skip(2).product::<usize>().max(1);
        if self.sums.len() != c {
            self.sums = vec![0.0; c];
        }
        // One sum per (image, channel) plane in parallel, added in plane
        // order: the same result whatever the thread count.
        let planes: Vec<f64> = values.par_chunks(inner).take(n * c).map(sum_f64).collect();
        for (i, s) in planes.iter().enumerate() {
            self.sums[i % c] += s;
        }
        self.count += (n * inner) as u64;
    }

    fn means(&self) -> Vec<f64> {
        self.sums
            .iter()
            .map(|s| s / self.count.max(1) as f64)
            .collect()
    }
}

/// The range and the channel means of each activation site's value over
/// the calibration data.
pub fn calibrate(
    model: &Model,
    sites: &[Site],
    calibration: &Calibration,
    mut progress: impl FnMut(usize),
) -> Result<Calibrated, crate::Error> {
    let ev = Evaluator::new(model).map_err(|e| e.to_string())?;
    let mut moments = moment_watch(model, sites, calibration.rounding);
    let mut watch: Vec<ValueId> = sites
        .iter()
        .filter(|s| !s.weight)
        .map(|s| s.value)
        .collect();
    let mut extra: Vec<ValueId> = moments
        .keys()
        .copied()
        .filter(|v| !watch.contains(v))
        .collect();
    extra.sort();
    watch.extend(extra);
    let mut observers: HashMap<ValueId, Observer> = watch
        .iter()
        .map(|&v| {
            let init = sites.iter().find(|s| s.value == v).map(|s| s.scheme.init);
            let o = match (init, calibration.method) {
                (Some(RangeInit::LsqMeanAbs), _) => Observer::FirstBatchMeanAbs {
                    mean: None,
                    extremes: MinMax::default(),
                },
                // PACT's alpha is the end of the calibrated range: the
                // maximum, or where --method clips (at 2 bits the maximum
                // leaves most activations below the first level).
                (Some(RangeInit::UnitRange), _) | (_, Method::MinMax) => {
                    Observer::MinMax(MinMax::default())
                }
                _ => Observer::Histogram(AbsHistogram::default()),
            };
            (v, o)
        })
        .collect();
    let mut sums: HashMap<ValueId, ChannelSums> = HashMap::new();
    let batch = calibration.batch.max(1);
    // Moments come from every stride-th calibration sample.
    let stride = calibration
        .samples
        .len()
        .div_ceil(crate::moments::MOMENT_SAMPLES)
        .max(1);
    let mut done = 0;
    for chunk in calibration.samples.chunks(batch) {
        let moment_images: Vec<usize> = (0..chunk.len())
            .filter(|i| (done + i) % stride == 0)
            .collect();
        let x = calibration.data.select(chunk, calibration.norm)?;
        let mut failure = None;
        let mut observe = |v: ValueId, t: &Tensor| {
            let Tensor::F32(a) = t else {
                failure.get_or_insert_with(|| {
                    format!(
                        "'{}' is {}, not f32: it cannot be quantized",
                        model.graph.value(v).name(),
                        t.dtype()
                    )
                });
                return;
            };
            let a = a.as_standard_layout();
            let values = a.as_slice().expect("standard layout");
            for (_, reader, m) in moments.get_mut(&v).into_iter().flatten() {
                reader.observe(a.shape(), values, &moment_images, m);
            }
            let Some(o) = observers.get_mut(&v) else {
                return;
            };
            match o {
                Observer::MinMax(m) => m.observe(values),
                Observer::Histogram(h) => h.observe(values),
                Observer::FirstBatchMeanAbs { mean, extremes } => {
                    extremes.observe(values);
                    if mean.is_none() {
                        let sum: f64 = values.iter().map(|v| v.abs() as f64).sum();
                        *mean = Some(sum / values.len().max(1) as f64);
                    }
                }
            }
            sums.entry(v).or_default().observe(a.shape(), values);
        };
        ev.run_observed(vec![x], &watch, &mut observe)
            .map_err(|e| e.to_string())?;
        if let Some(f) = failure {
            return Err(f.into());
        }
        done += chunk.len();
        progress(done);
    }
    let mut ranges = HashMap::new();
    for site in sites.iter().filter(|s| !s.weight) {
        let grid = site.scheme.grid;
        let range = match &observers[&site.value] {
            // PACT clips at 0: unless the values go below it (the network's
            // input, a residual sum), the range starts there.
            _ if site.scheme.init == RangeInit::UnitRange
                && !model.graph.value(site.value).is_graph_input() =>
            {
                (0.0, 1.0)
            }
            Observer::MinMax(m) if site.scheme.init == RangeInit::PactClip => {
                let (lo, hi) = m.range();
                (lo.min(0.0), hi)
            }
            Observer::MinMax(m) => m.range(),
            Observer::FirstBatchMeanAbs { mean, extremes } => {
                let (_, hi) = Scheme::lsq_range(grid, mean.unwrap_or(0.0));
                // Values below zero: the same reach on both sides.
                if extremes.range().0 < 0.0 {
                    (-hi, hi)
                } else {
                    (0.0, hi)
                }
            }
            Observer::Histogram(h) => {
                // Levels on the side a threshold covers: half the grid when
                // it is symmetric about zero.
                let (qmin, qmax) = (grid.qmin(), grid.qmax());
                let positive = h.extremes.min >= 0.0 && site.scheme.mode == RangeMode::Asymmetric;
                let levels = if positive {
                    (qmax - qmin) as usize
                } else {
                    qmax.max(1) as usize
                };
                match calibration.method {
                    Method::Percentile(p) => h.percentile(p),
                    Method::Entropy => h.entropy(levels + 1),
                    Method::Mse => h.mse(levels),
                    Method::MinMax => h.extremes.range(),
                }
            }
        };
        let range = if site.scheme.pow2 {
            pow2_range(
                range,
                grid,
                site.scheme.mode,
                &observers[&site.value],
                calibration.method,
            )?
        } else {
            range
        };
        ranges.insert(site.value, range);
    }
    let channel_means = sums.into_iter().map(|(v, s)| (v, s.means())).collect();
    let input_moments = moments
        .into_values()
        .flatten()
        .filter(|(_, _, m)| m.iter().all(|m| m.count > 0))
        .map(|(node, _, m)| (node, m))
        .collect();
    Ok(Calibrated {
        ranges,
        channel_means,
        input_moments,
    })
}

/// `range` moved to the nearest range with a power-of-two scale: the scale
/// just below (finer, clipping more) or just above (coarser, clipping less)
/// the one `range` needs, whichever the histogram finds the smaller expected
/// error; without a histogram, or for min-max ranges that promise to clip
/// nothing, the one above.
fn pow2_range(
    range: (f32, f32),
    grid: Grid,
    mode: RangeMode,
    observer: &Observer,
    method: Method,
) -> Result<(f32, f32), String> {
    let histogram = match observer {
        Observer::Histogram(h) if method != Method::MinMax => Some(h),
        _ => None,
    };
    let error = |p: &Params| match histogram {
        Some(h) => {
            let (lo, hi) = p.representable(grid);
            // The histogram holds |x|: one threshold for both sides.
            let threshold = if h.extremes.min >= 0.0 {
                hi
            } else {
                (hi - lo) / 2.0
            };
            h.expected_error(threshold as f64, p.scale as f64)
        }
        None => 0.0,
    };
    let p =
        Params::from_range_pow2(range.0, range.1, grid, mode, error).map_err(|e| e.to_string())?;
    Ok(range_for_scale(range.0, p.scale, grid, mode))
}

/// The passes run before placement: a deployable Q/DQ graph quantizes the
/// weights a runtime will use, so batch normalization is folded into them
/// first (as ONNX Runtime's `quant_pre_process` and TensorRT do), and
/// constant subgraphs and zero pads are folded away.
pub const PREPARE: &str =
    "infer-shapes,fold-constants,fold-bn,fold-pad,fuse-matmul-add,reduce-mean-to-pool,cleanup";

/// [`PREPARE`] without `fold-bn`: for quantization-aware training that
/// folds batch normalization itself, on batch statistics (`qgraph train`).
pub const PREPARE_KEEP_BATCH_NORM: &str =
    "infer-shapes,fold-constants,fold-pad,fuse-matmul-add,reduce-mean-to-pool,cleanup";

/// The passes `insert` runs before placing Q/DQ pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepare {
    /// None: the model is placed as it is.
    Skip,
    /// [`PREPARE`]: the deployable form.
    Deploy,
    /// [`PREPARE_KEEP_BATCH_NORM`]: batch normalization stays for training
    /// to fold.
    KeepBatchNorm,
}

/// What `insert` did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub plan: QdqPlan,
    pub report: InsertReport,
    pub calibrated: bool,
    /// How ranges were chosen, as recorded in the model's metadata.
    pub calibration: String,
}

/// Runs the `prepare` passes, places Q/DQ pairs by
/// `options`, calibrates (with `bias_correction`, the biases also absorb the
/// mean output shift of quantized weights, measured on the calibration data), on `calibration` when given,
/// and rewrites `model`. Calibrated ranges are also recorded on the values
/// (metadata `qgraph.range`), and the model's metadata names the scheme,
/// the method and the qgraph version.
pub fn insert(
    model: &mut Model,
    options: &InsertOptions,
    prepare: Prepare,
    bias_correction: bool,
    calibration: Option<&Calibration>,
    progress: impl FnMut(usize),
) -> Result<Summary, crate::Error> {
    let pipeline = match prepare {
        Prepare::Skip => None,
        Prepare::Deploy => Some(PREPARE),
        Prepare::KeepBatchNorm => Some(PREPARE_KEEP_BATCH_NORM),
    };
    if let Some(pipeline) = pipeline {
        qgraph_passes::Driver::from_pipeline(pipeline)?
            .run(model)
            .map_err(|e| e.to_string())?;
    }
    let plan = plan_qdq(model, options)?;
    let calibrated = match calibration {
        Some(c) => calibrate(model, &plan.sites, c, progress)?,
        None => Calibrated::default(),
    };
    let mut sorted: Vec<(&ValueId, &(f32, f32))> = calibrated.ranges.iter().collect();
    sorted.sort_by_key(|(v, _)| **v);
    for (&v, &(lo, hi)) in sorted {
        let meta = &mut model.graph.value_mut(v).map_err(|e| e.to_string())?.meta;
        meta.retain(|(k, _)| k != RANGE_KEY);
        meta.push((RANGE_KEY.to_string(), format!("{lo:e},{hi:e}")));
    }
    let report = insert_qdq(model, &plan, &calibrated, bias_correction)?;
    let init = match options.scheme.activations.init {
        RangeInit::Observed => String::new(),
        RangeInit::PactClip => match calibration {
            Some(c) => format!(
                "; PACT alpha from the calibrated range ({})",
                c.method.describe()
            ),
            None => format!("; PACT alpha = {PACT_INITIAL_ALPHA} (no data)"),
        },
        RangeInit::LsqMeanAbs => "; LSQ steps 2<|v|>/sqrt(Qp) (activations: first batch)".into(),
        RangeInit::UnitRange => "; DoReFa activations on [0, 1]".into(),
    };
    let method = calibration
        .map(|c| match options.scheme.activations.init {
            RangeInit::Observed => {
                format!("{} over {} samples", c.method.describe(), c.samples.len())
            }
            _ => format!("{} samples", c.samples.len()),
        })
        .unwrap_or_else(|| "none (weights from their values)".into())
        + &init;
    let scales = if options.scheme.weights.pow2 || options.scheme.activations.pow2 {
        "powers of two"
    } else {
        "free"
    };
    let placement = match options.placement {
        qgraph_passes::Placement::TensorRt => "tensorrt",
        qgraph_passes::Placement::Ort => "ort",
    };
    if let Some(c) = calibration {
        crate::data::record_norm(model, c.norm);
    }
    for (k, v) in [
        ("qgraph.scheme", options.scheme.name.clone()),
        (crate::freeze::PLACEMENT_KEY, placement.to_string()),
        ("qgraph.calibration", method.clone()),
        ("qgraph.scales", scales.to_string()),
        ("qgraph.version", env!("CARGO_PKG_VERSION").to_string()),
    ] {
        crate::set_meta_value(model, k, v);
    }
    Ok(Summary {
        plan,
        report,
        calibrated: calibration.is_some(),
        calibration: method,
    })
}
