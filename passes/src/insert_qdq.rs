//! `insert-qdq`: QuantizeLinear/DequantizeLinear pairs placed by TensorRT's
//! rules, with a quantization scheme's grids.
//!
//! Placement (`plan_qdq`), then the rewrite (`insert_qdq`), so that a
//! calibrator can observe exactly the values the plan quantizes between the
//! two. TensorRT's rules:
//! - every input of Conv, ConvTranspose, Gemm and MatMul is quantized:
//!   constant weights per output channel (when the scheme says so and the
//!   opset allows per-axis Q/DQ, 13 and later), data per tensor; biases stay
//!   float;
//! - the outputs of weighted ops are not quantized: the normalization and
//!   activation after them belong to their fusion group, and the next
//!   weighted op quantizes its own input;
//! - of an Add joining a weighted op's branch and another (a residual
//!   connection), the other input is quantized, so that the runtime fuses the
//!   Add into the convolution;
//! - everything else stays float.
//!
//! A value gets one Q/DQ pair, read by the uses that quantize it; its other
//! readers (and the graph outputs) keep the float value. Grids below 8 bits
//! are held in int8/uint8 tensors: weights are within their range by
//! construction, and activations pass a Clip to the grid's range first, so
//! that the int8 QuantizeLinear saturates where the narrower grid would.
//! Activation ranges come from calibration (`ranges`), or from the value
//! metadata `qgraph.range` ("min,max") that a calibration left in a model.

use crate::{util, Params as PassParams, Pass, PassContext};

/// QuantizeLinear node metadata: the integer range ("qmin,qmax") of a grid
/// narrower than 8 bits, which the int8/uint8 tensors holding it do not
/// show (the trainer quantizes to it; a weight's values and an
/// activation's Clip keep the file's arithmetic on it).
pub const GRID_KEY: &str = "qgraph.grid";
use qgraph_ir::{AttrValue, DataType, Graph, Model, NewNode, NodeId, Tensor, ValueId};
use qgraph_quant::rounding::{round_rows, SecondMoment};
use qgraph_quant::{Grid, Params, RangeInit, Scheme, TensorScheme, PACT_INITIAL_ALPHA};
use std::collections::HashMap;

/// Where Q/DQ pairs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// TensorRT's rules (see the module documentation).
    TensorRt,
    /// ONNX Runtime's `quantize_static` (QDQ format): every float tensor
    /// that a quantizable op reads or writes, read through one Q/DQ pair by
    /// the quantizable ops; a Relu or Clip right after a weighted op is
    /// removed when the quantization range lies inside its bounds (the
    /// QuantizeLinear then clamps as it did); Conv and Gemm biases become
    /// int32 with scale `input scale * weight scale`. This is the graph ONNX
    /// Runtime fuses into its integer kernels.
    Ort,
}

impl Placement {
    pub fn parse(name: &str) -> Result<Placement, String> {
        match name {
            "tensorrt" => Ok(Placement::TensorRt),
            "ort" => Ok(Placement::Ort),
            other => Err(format!(
                "unknown placement '{other}'; the placements are tensorrt, ort"
            )),
        }
    }
}

/// The ops ONNX Runtime's QDQ quantizer quantizes (its QDQ registry, for
/// the ops the evaluator knows).
const ORT_QUANTIZABLE: [&str; 22] = [
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Concat",
    "Split",
    "Resize",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Softmax",
];

/// Options of the placement.
#[derive(Clone, Debug)]
pub struct InsertOptions {
    pub scheme: Scheme,
    pub placement: Placement,
    /// With a scheme below 8 bits: keep the first and the last weighted op
    /// (inputs and weights) at 8 bits, as the low-bit literature does.
    pub ends_at_8_bits: bool,
    /// Per-layer rules, later ones winning (see [`Override`]).
    pub overrides: Vec<Override>,
}

impl InsertOptions {
    /// `scheme` placed by TensorRT's rules, the first and last weighted ops
    /// at 8 bits, no overrides.
    pub fn new(scheme: Scheme) -> InsertOptions {
        InsertOptions {
            scheme,
            placement: Placement::TensorRt,
            ends_at_8_bits: true,
            overrides: Vec::new(),
        }
    }
}

/// A per-layer rule: the nodes it matches (name by regular expression,
/// anywhere in the name unless anchored, and/or op type) stay float
/// (`exclude`), or get other bit widths for their weights and the
/// activations they read. Mixed precision comes from these.
#[derive(Clone, Debug, Default)]
pub struct Override {
    pub name: Option<regex::Regex>,
    pub op: Option<String>,
    pub exclude: bool,
    pub weight_bits: Option<u8>,
    pub activation_bits: Option<u8>,
}

impl Override {
    fn matches(&self, g: &Graph, n: NodeId) -> bool {
        let node = g.node(n);
        self.name.as_ref().is_none_or(|r| r.is_match(node.name()))
            && self.op.as_ref().is_none_or(|op| *op == node.op_type)
    }
}

/// The last rule matching node `n`.
fn rule_for<'a>(options: &'a InsertOptions, g: &Graph, n: NodeId) -> Option<&'a Override> {
    options.overrides.iter().rev().find(|o| o.matches(g, n))
}

/// `s` with `bits` instead of its own width, when given.
fn with_bits(s: TensorScheme, bits: Option<u8>) -> TensorScheme {
    match bits {
        Some(bits) => TensorScheme {
            grid: Grid { bits, ..s.grid },
            ..s
        },
        None => s,
    }
}

/// One quantized value: its grid, the axis of per-channel parameters, and
/// the uses (node, input slot) that read the quantized value.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    pub value: ValueId,
    pub scheme: TensorScheme,
    pub axis: Option<usize>,
    pub weight: bool,
    pub uses: Vec<(NodeId, usize)>,
    /// A Relu or Clip producing `value` from a weighted op's output, to be
    /// removed when the quantization range lies inside its bounds
    /// (`Placement::Ort`).
    pub fold: Option<NodeId>,
}

/// What `plan_qdq` decided.
#[derive(Clone, Debug, Default)]
pub struct QdqPlan {
    pub sites: Vec<Site>,
    /// Decisions a user should know about (weights kept per tensor, ...).
    pub notes: Vec<String>,
    /// Whether Conv and Gemm biases become int32 (`Placement::Ort`).
    pub int32_biases: bool,
}

impl QdqPlan {
    /// The activation values whose ranges calibration must find.
    pub fn activations(&self) -> Vec<ValueId> {
        self.sites
            .iter()
            .filter(|s| !s.weight)
            .map(|s| s.value)
            .collect()
    }
}

/// The metadata key of a calibrated range on a value.
pub const RANGE_KEY: &str = "qgraph.range";

/// The metadata key, on a DequantizeLinear `insert-qdq` made, naming the
/// float value it stands for.
pub const QUANTIZES_KEY: &str = "qgraph.quantizes";

const WEIGHTED: [&str; 4] = ["Conv", "ConvTranspose", "Gemm", "MatMul"];

/// Ops through which a weighted op's output still belongs to its fusion
/// group (the chain a runtime fuses into the op).
const GROUP_TAIL: [&str; 8] = [
    "BatchNormalization",
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
];

fn is_op(g: &Graph, n: NodeId, ops: &[&str]) -> bool {
    let node = g.node(n);
    node.domain.is_empty() && ops.contains(&node.op_type.as_str())
}

fn int_attr(g: &Graph, n: NodeId, name: &str, default: i64) -> i64 {
    match g.node(n).attr(name) {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    }
}

/// Whether `v` is the output of a weighted op's fusion group: a weighted op
/// followed only by normalization and activations, each read by one node.
fn from_weighted_group(g: &Graph, mut v: ValueId) -> bool {
    loop {
        let Some((p, _)) = g.producer(v) else {
            return false;
        };
        if is_op(g, p, &WEIGHTED) {
            return g.consumers(v).len() == 1;
        }
        if !is_op(g, p, &GROUP_TAIL) || g.consumers(v).len() != 1 {
            return false;
        }
        match g.node(p).inputs().first().copied().flatten() {
            Some(input) => v = input,
            None => return false,
        }
    }
}

/// Adds a use of `value` to its site, creating the site; a use asking for
/// more bits widens the site's grid.
fn add_use(
    sites: &mut Vec<Site>,
    value: ValueId,
    scheme: TensorScheme,
    axis: Option<usize>,
    weight: bool,
    use_: (NodeId, usize),
) {
    match sites.iter_mut().find(|s| s.value == value) {
        Some(site) => {
            if scheme.grid.bits > site.scheme.grid.bits {
                site.scheme = scheme;
            }
            site.uses.push(use_);
        }
        None => sites.push(Site {
            value,
            scheme,
            axis,
            weight,
            uses: vec![use_],
            fold: None,
        }),
    }
}

/// Decides which values get Q/DQ pairs.
pub fn plan_qdq(model: &Model, options: &InsertOptions) -> Result<QdqPlan, String> {
    let g = &model.graph;
    let order = util::order(g)?;
    let opset = model.opset_version("").unwrap_or(1);
    let mut plan = QdqPlan::default();
    if opset < 10 {
        return Err(format!(
            "QuantizeLinear needs opset 10 or later; the model imports opset {opset}"
        ));
    }
    let per_axis = opset >= 13;
    let scheme = &options.scheme;
    if scheme.weights.per_channel && !per_axis {
        plan.notes.push(format!(
            "weights are quantized per tensor: per-channel Q/DQ needs opset 13, the model imports {opset}"
        ));
    }
    let weighted: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&n| is_op(g, n, &WEIGHTED))
        .collect();
    let at_8_bits = |n: NodeId| {
        options.ends_at_8_bits
            && scheme.is_low_bit()
            && (weighted.first() == Some(&n) || weighted.last() == Some(&n))
    };
    let widen = |s: TensorScheme| TensorScheme {
        grid: Grid {
            bits: s.grid.bits.max(8),
            ..s.grid
        },
        ..s
    };
    let mut sites: Vec<Site> = Vec::new();
    for &n in &order {
        let node = g.node(n);
        if !node.domain.is_empty() {
            continue;
        }
        let inputs = node.inputs();
        let input = |k: usize| inputs.get(k).copied().flatten();
        match node.op_type.as_str() {
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul" => {
                let rule = rule_for(options, g, n);
                if rule.is_some_and(|r| r.exclude) {
                    continue;
                }
                let wide = at_8_bits(n);
                let (act, wts) = if wide {
                    (widen(scheme.activations), widen(scheme.weights))
                } else {
                    (scheme.activations, scheme.weights)
                };
                let act = with_bits(act, rule.and_then(|r| r.activation_bits));
                let wts = with_bits(wts, rule.and_then(|r| r.weight_bits));
                // The weight's output-channel axis, when per-channel applies.
                let weight_axis = match node.op_type.as_str() {
                    "Conv" => Some(0),
                    "ConvTranspose" if int_attr(g, n, "group", 1) == 1 => Some(1),
                    "Gemm" => Some(if int_attr(g, n, "transB", 0) != 0 {
                        0
                    } else {
                        1
                    }),
                    "MatMul" => input(1)
                        .and_then(|w| util::constant(g, Some(w)))
                        .filter(|t| t.shape().len() >= 2)
                        .map(|t| t.shape().len() - 1),
                    _ => None,
                };
                for slot in 0..2 {
                    let Some(v) = input(slot) else { continue };
                    if !is_float(g, v) {
                        continue;
                    }
                    if util::constant(g, Some(v)).is_some() {
                        let axis = if slot == 1 && wts.per_channel && per_axis {
                            weight_axis
                        } else {
                            None
                        };
                        add_use(&mut sites, v, wts, axis, true, (n, slot));
                    } else {
                        add_use(&mut sites, v, act, None, false, (n, slot));
                    }
                }
            }
            "Add" if options.placement == Placement::TensorRt => {
                let rule = rule_for(options, g, n);
                if rule.is_some_and(|r| r.exclude) {
                    continue;
                }
                let act = with_bits(scheme.activations, rule.and_then(|r| r.activation_bits));
                let (Some(a), Some(b)) = (input(0), input(1)) else {
                    continue;
                };
                let constant = |v| util::constant(g, Some(v)).is_some();
                if constant(a) || constant(b) || !is_float(g, a) || !is_float(g, b) {
                    continue;
                }
                let residual = match (from_weighted_group(g, a), from_weighted_group(g, b)) {
                    (true, false) => Some((b, 1)),
                    (false, true) | (true, true) => Some((a, 0)),
                    (false, false) => None,
                };
                if let Some((v, slot)) = residual {
                    add_use(&mut sites, v, act, None, false, (n, slot));
                }
            }
            _ => {}
        }
    }
    if options.placement == Placement::Ort {
        // Removable: a Relu or Clip (constant bounds) that alone reads a
        // weighted op's output.
        let removable = |a: NodeId| -> Option<ValueId> {
            if !is_op(g, a, &["Relu", "Clip"]) {
                return None;
            }
            let u = g.node(a).inputs().first().copied().flatten()?;
            let (p, _) = g.producer(u)?;
            let out = g.node(a).outputs().first().copied().flatten()?;
            let bounds_constant = g.node(a).inputs()[1..]
                .iter()
                .flatten()
                .all(|&b| util::constant(g, Some(b)).is_some());
            (is_op(g, p, &WEIGHTED)
                && g.consumers(u).len() == 1
                && !g.value(u).is_graph_output()
                && !g.value(out).is_graph_output()
                && bounds_constant)
                .then_some(u)
        };
        let folded_inputs: Vec<ValueId> = order.iter().filter_map(|&a| removable(a)).collect();
        let quantizable = |n: NodeId| is_op(g, n, &ORT_QUANTIZABLE);
        for &n in &order {
            if !quantizable(n) {
                continue;
            }
            let node = g.node(n);
            let weighted = is_op(g, n, &WEIGHTED);
            let mut tensors: Vec<ValueId> = node
                .inputs()
                .iter()
                .enumerate()
                // A weighted op's first two inputs are placed above; its
                // third is the bias.
                .filter(|_| !weighted)
                .filter_map(|(_, v)| *v)
                .collect();
            tensors.extend(node.outputs().iter().flatten());
            for v in tensors {
                let skip = util::constant(g, Some(v)).is_some()
                    || !is_float(g, v)
                    || g.value(v).is_graph_output()
                    || folded_inputs.contains(&v);
                if skip {
                    continue;
                }
                for (c, slot) in g.consumers(v) {
                    let is_weight_slot = is_op(g, c, &WEIGHTED) && slot >= 1;
                    let known = sites
                        .iter()
                        .any(|s| s.value == v && s.uses.contains(&(c, slot)));
                    let rule = rule_for(options, g, c);
                    let excluded = rule.is_some_and(|r| r.exclude);
                    if quantizable(c) && !is_weight_slot && !known && !excluded {
                        let act =
                            with_bits(scheme.activations, rule.and_then(|r| r.activation_bits));
                        add_use(&mut sites, v, act, None, false, (c, slot));
                    }
                }
                // The output of a removable activation: quantized where the
                // activation's input was, the activation then removed.
                if let Some((p, _)) = g.producer(v) {
                    if removable(p).is_some() {
                        if let Some(site) = sites.iter_mut().find(|s| s.value == v) {
                            let all_read = g.consumers(v).iter().all(|u| site.uses.contains(u));
                            site.fold = all_read.then_some(p);
                        }
                    }
                }
            }
        }
    }
    // int16/uint16 QuantizeLinear came with opset 21; an older model
    // would be written with operators no runtime accepts.
    if opset < 21 {
        if let Some(wide) = sites.iter().find(|s| s.scheme.grid.bits > 8) {
            return Err(format!(
                "'{}' would be quantized on a {}-bit grid, which needs int16 Q/DQ (opset 21); \
                 the model imports opset {opset}: keep widths at 8 bits or below",
                g.value(wide.value).name(),
                wide.scheme.grid.bits
            ));
        }
    }
    plan.sites = sites;
    plan.int32_biases = options.placement == Placement::Ort;
    Ok(plan)
}

/// Whether `v` is known to be f32 (declared, or an initializer), or of
/// unknown type (computed values often are until shapes are inferred).
fn is_float(g: &Graph, v: ValueId) -> bool {
    match g.value(v).effective_type() {
        Some(qgraph_ir::ValueType::Tensor(t)) => t.dtype.is_none_or(|d| d == DataType::F32),
        Some(_) => false,
        None => true,
    }
}

/// The integer type that holds a grid: int8/uint8 up to 8 bits.
fn storage(grid: Grid) -> Result<DataType, String> {
    match (grid.bits, grid.signed) {
        (2..=8, true) => Ok(DataType::I8),
        (2..=8, false) => Ok(DataType::U8),
        (9..=16, true) => Ok(DataType::I16),
        (9..=16, false) => Ok(DataType::U16),
        (bits, _) => Err(format!("no integer type holds a {bits}-bit grid")),
    }
}

/// A range recorded on a value by calibration (`RANGE_KEY`).
pub fn recorded_range(g: &Graph, v: ValueId) -> Option<(f32, f32)> {
    let text = &g.value(v).meta.iter().find(|(k, _)| k == RANGE_KEY)?.1;
    let (lo, hi) = text.split_once(',')?;
    Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
}

/// Scale and zero point per channel of `axis` (or one pair) for a weight.
fn weight_params(
    tensor: &Tensor,
    scheme: TensorScheme,
    axis: Option<usize>,
) -> Result<Vec<Params>, String> {
    let Tensor::F32(w) = tensor else {
        return Err(format!("a weight of type {} is not f32", tensor.dtype()));
    };
    // LSQ's initial step comes from the mean |w|, other schemes' from the
    // extremes.
    let range = |values: &mut dyn Iterator<Item = f32>| match scheme.init {
        RangeInit::LsqMeanAbs => {
            let (sum, n) = values.fold((0f64, 0usize), |(s, n), v| (s + v.abs() as f64, n + 1));
            Scheme::lsq_range(scheme.grid, sum / n.max(1) as f64)
        }
        _ => min_max(values),
    };
    let channels: Vec<_> = match axis {
        None => vec![w.view()],
        Some(axis) => w.axis_iter(qgraph_ir::ndarray::Axis(axis)).collect(),
    };
    channels
        .iter()
        .map(|c| {
            let (lo, hi) = range(&mut c.iter().copied());
            if scheme.pow2 {
                // Of the two powers of two around the scale, the one that
                // quantizes this channel's weights with less error.
                Params::from_range_pow2(lo, hi, scheme.grid, scheme.mode, |p| {
                    p.squared_error(c.iter().copied(), scheme.grid)
                })
            } else {
                Params::from_range(lo, hi, scheme.grid, scheme.mode)
            }
            .map_err(|e| e.to_string())
        })
        .collect()
}

fn min_max(values: &mut dyn Iterator<Item = f32>) -> (f32, f32) {
    values
        .filter(|x| x.is_finite())
        .fold((0f32, 0f32), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// What `insert_qdq` did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InsertReport {
    pub weights: usize,
    pub activations: usize,
    /// Activation values left float for want of a range.
    pub unranged: Vec<String>,
    /// Weighted ops whose bias absorbed their weight's quantization shift.
    pub bias_corrected: usize,
    /// Relu/Clip nodes removed, their clamp done by a QuantizeLinear.
    pub folded: usize,
    /// Biases stored as int32 (`Placement::Ort`).
    pub int32_biases: usize,
    /// For each weight rounded to minimise its op's output error on the
    /// calibration data rather than to the nearest grid point, how much
    /// smaller (dB) that error is than with nearest rounding.
    pub rounding_gains_db: Vec<f64>,
}

/// What calibration measured: the range of each activation, the mean of
/// each of its channels (axis 1), which bias correction needs, and the
/// second moments of weighted ops' input vectors (one per group), which
/// output-aware rounding needs.
#[derive(Clone, Debug, Default)]
pub struct Calibrated {
    pub ranges: HashMap<ValueId, (f32, f32)>,
    pub channel_means: HashMap<ValueId, Vec<f64>>,
    pub input_moments: HashMap<NodeId, Vec<SecondMoment>>,
}

/// How a weighted op's weight splits into rows, one per output channel,
/// each multiplying one input vector: `(rows, k, transposed)`, where a
/// transposed weight holds row `r` in its column `r` (Gemm without transB,
/// MatMul).
fn weight_rows(g: &Graph, node: NodeId, shape: &[usize]) -> Option<(usize, usize, bool)> {
    match (g.node(node).op_type.as_str(), shape) {
        ("Conv", [m, rest @ ..]) if !rest.is_empty() => Some((*m, rest.iter().product(), false)),
        ("Gemm", [a, b]) if int_attr(g, node, "transB", 0) != 0 => Some((*a, *b, false)),
        ("Gemm" | "MatMul", [a, b]) => Some((*b, *a, true)),
        _ => None,
    }
}

/// The weight `w` of the weighted op `node`, each output channel's row
/// rounded onto the grid so as to minimise the op's output error for inputs
/// with second moments `moments` (one per group; see
/// `qgraph_quant::rounding`). `None` when the shapes do not fit. Returns
/// the rounded weight (dequantized values, which quantize back exactly)
/// and the output errors of nearest and of this rounding.
/// A weight's rounded values, with the output errors of nearest and of the
/// chosen rounding.
type RoundedWeight = (Tensor, (f64, f64));

fn round_weight(
    g: &Graph,
    node: NodeId,
    w: &Tensor,
    params: &[Params],
    grid: Grid,
    moments: &[SecondMoment],
) -> Result<Option<RoundedWeight>, String> {
    let Tensor::F32(a) = w else { return Ok(None) };
    let shape = a.shape().to_vec();
    let Some((rows, k, transposed)) = weight_rows(g, node, &shape) else {
        return Ok(None);
    };
    let groups = moments.len();
    let fits = groups >= 1
        && rows % groups == 0
        && moments.iter().all(|m| m.k == k && m.count > 0)
        && (params.len() == rows || params.len() == 1);
    if !fits {
        return Ok(None);
    }
    let a = a.as_standard_layout();
    let flat = a.as_slice().expect("standard layout");
    let mut row_major: Vec<f32> = if transposed {
        (0..rows * k)
            .map(|i| flat[(i % k) * rows + i / k])
            .collect()
    } else {
        flat.to_vec()
    };
    let per_group = rows / groups;
    let mut errors = (0.0, 0.0);
    for (gi, (chunk, moment)) in row_major.chunks_mut(per_group * k).zip(moments).enumerate() {
        let p = if params.len() == 1 {
            params
        } else {
            &params[gi * per_group..(gi + 1) * per_group]
        };
        let e = round_rows(chunk, k, &moment.mean(), p, grid)?;
        errors.0 += e.nearest / rows as f64;
        errors.1 += e.chosen / rows as f64;
    }
    let values: Vec<f32> = if transposed {
        (0..rows * k)
            .map(|i| row_major[(i % rows) * k + i / rows])
            .collect()
    } else {
        row_major
    };
    let t = qgraph_ir::ndarray::ArrayD::from_shape_vec(shape, values).map_err(|e| e.to_string())?;
    Ok(Some((Tensor::F32(t), errors)))
}

/// The expected change of each output channel of the weighted op `node`
/// when its weight `w` becomes `wq`, for inputs whose channel means are
/// `means` (empirical bias correction, Nagel et al. 2019, "Data-Free
/// Quantization", section 4.2: `E[(Wq - W) x] = (Wq - W) E[x]`, the mean
/// taken per input channel, borders ignored). `None` when the op has no
/// additive bias to absorb it or the shapes do not fit.
fn output_shift(
    g: &Graph,
    node: NodeId,
    w: &[usize],
    dw: &[f32],
    means: &[f64],
) -> Option<Vec<f64>> {
    match g.node(node).op_type.as_str() {
        "Conv" if w.len() >= 3 => {
            let group = int_attr(g, node, "group", 1).max(1) as usize;
            let (m, cg) = (w[0], w[1]);
            let taps: usize = w[2..].iter().product();
            if m % group != 0 || means.len() != cg * group {
                return None;
            }
            let per_group = m / group;
            Some(
                (0..m)
                    .map(|o| {
                        let first = (o / per_group) * cg;
                        (0..cg)
                            .map(|j| {
                                let row = &dw[(o * cg + j) * taps..][..taps];
                                row.iter().map(|&d| d as f64).sum::<f64>() * means[first + j]
                            })
                            .sum()
                    })
                    .collect(),
            )
        }
        "Gemm" if w.len() == 2 => {
            let plain = |name, default: f32| match g.node(node).attr(name) {
                Some(AttrValue::Float(v)) => *v == default,
                None => true,
                _ => false,
            };
            if int_attr(g, node, "transA", 0) != 0 || !plain("alpha", 1.0) || !plain("beta", 1.0) {
                return None;
            }
            let trans_b = int_attr(g, node, "transB", 0) != 0;
            let (k, n) = if trans_b { (w[1], w[0]) } else { (w[0], w[1]) };
            if means.len() != k {
                return None;
            }
            let at = |kk: usize, nn: usize| {
                if trans_b {
                    dw[nn * k + kk]
                } else {
                    dw[kk * n + nn]
                }
            };
            Some(
                (0..n)
                    .map(|nn| (0..k).map(|kk| at(kk, nn) as f64 * means[kk]).sum())
                    .collect(),
            )
        }
        _ => None,
    }
}

/// Subtracts `shift` from the bias of `node` (input 2 of Conv and Gemm),
/// creating the bias when there is none; the corrected bias is a new
/// initializer, the old one removed when nothing else reads it.
fn correct_bias(g: &mut Graph, node: NodeId, shift: &[f64]) -> Result<bool, String> {
    let old = g.node(node).inputs().get(2).copied().flatten();
    let bias: Vec<f64> = match old {
        None => vec![0.0; shift.len()],
        Some(b) => match util::constant(g, Some(b)) {
            Some(Tensor::F32(a)) if a.len() == shift.len() => a.iter().map(|&v| v as f64).collect(),
            Some(Tensor::F32(a)) if a.len() == 1 => {
                vec![a.iter().next().copied().unwrap_or(0.0) as f64; shift.len()]
            }
            _ => return Ok(false),
        },
    };
    let corrected: Vec<f64> = bias.iter().zip(shift).map(|(b, s)| b - s).collect();
    let tensor = Tensor::from_floats(DataType::F32, &[shift.len()], &corrected)
        .map_err(|e| e.to_string())?;
    let name = g.unique_value_name(&format!("{}_bias_corrected", g.node(node).name()));
    let err = |e: qgraph_ir::IrError| e.to_string();
    let new = g.add_initializer(name, tensor).map_err(err)?;
    while g.node(node).inputs().len() < 3 {
        g.push_node_input(node, None).map_err(err)?;
    }
    g.set_node_input(node, 2, Some(new)).map_err(err)?;
    if let Some(old) = old {
        if g.consumers(old).is_empty()
            && !g.value(old).is_graph_input()
            && !g.value(old).is_graph_output()
        {
            g.remove_value(old).map_err(err)?;
        }
    }
    Ok(true)
}

/// Inserts the plan's Q/DQ pairs. Activation ranges come from `calibrated`,
/// else from the value's recorded range; without either the value stays
/// float (listed in the report). With `bias_correction` and the channel
/// means of a weighted op's input, the op's bias absorbs the mean shift its
/// quantized weight causes.
pub fn insert_qdq(
    model: &mut Model,
    plan: &QdqPlan,
    calibrated: &Calibrated,
    bias_correction: bool,
) -> Result<InsertReport, String> {
    let ranges = &calibrated.ranges;
    let opset = model.opset_version("").unwrap_or(1);
    let mut report = InsertReport::default();
    // The scales of each quantized value, for int32 biases.
    let mut site_scales: HashMap<ValueId, Vec<f32>> = HashMap::new();
    // The data input of each weighted op, before any is rewired.
    let data_input: HashMap<NodeId, ValueId> = plan
        .sites
        .iter()
        .filter(|s| s.weight)
        .flat_map(|s| s.uses.iter().map(|&(n, _)| n))
        .filter_map(|n| Some((n, model.graph.node(n).inputs().first().copied().flatten()?)))
        .collect();
    for site in &plan.sites {
        let g = &mut model.graph;
        let name = g.value(site.value).name().to_string();
        let params = if site.weight {
            let tensor = util::constant(g, Some(site.value))
                .ok_or_else(|| format!("weight '{name}' is not a constant"))?;
            weight_params(tensor, site.scheme, site.axis)
                .map_err(|e| format!("weight '{name}': {e}"))?
        } else {
            // PACT without data: the paper's initial clipping level.
            let pact =
                (site.scheme.init == RangeInit::PactClip).then_some((0.0, PACT_INITIAL_ALPHA));
            // DoReFa: [0, 1], the paper's fixed range, with or without data;
            // the network's input keeps its own range (the paper leaves the
            // first layer's input unquantized).
            let unit = (site.scheme.init == RangeInit::UnitRange
                && !g.value(site.value).is_graph_input())
            .then_some((0.0, 1.0));
            let Some(&(lo, hi)) = unit
                .as_ref()
                .or(ranges.get(&site.value))
                .or(recorded_range(g, site.value).as_ref())
                .or(pact.as_ref())
            else {
                report.unranged.push(name);
                continue;
            };
            // Calibration already chose a power-of-two scale; a range
            // recorded without one gets the scale above it.
            let params = if site.scheme.pow2 {
                Params::from_range_pow2(lo, hi, site.scheme.grid, site.scheme.mode, |_| 0.0)
            } else {
                Params::from_range(lo, hi, site.scheme.grid, site.scheme.mode)
            };
            vec![params.map_err(|e| format!("activation '{name}': {e}"))?]
        };
        if site.weight {
            let g = &mut model.graph;
            // The float weight, when something below reads it.
            let needed = bias_correction || !calibrated.input_moments.is_empty();
            let original = util::constant(g, Some(site.value))
                .filter(|_| needed)
                .cloned();
            // Output-aware rounding, when calibration measured the one op
            // reading this weight: the weight becomes its rounded values.
            let rounded = match (&site.uses[..], &original) {
                ([(node, 1)], Some(w)) if g.consumers(site.value).len() == 1 => {
                    match calibrated.input_moments.get(node) {
                        Some(moments) => {
                            round_weight(g, *node, w, &params, site.scheme.grid, moments)
                                .map_err(|e| format!("weight '{name}': {e}"))?
                        }
                        None => None,
                    }
                }
                _ => None,
            };
            if let (Some(Tensor::F32(w)), true) = (&original, bias_correction) {
                let w = w.as_standard_layout();
                let values = w.as_slice().expect("standard layout");
                let shape = w.shape().to_vec();
                let inner: usize = match site.axis {
                    Some(axis) => shape[axis + 1..].iter().product(),
                    None => 1,
                };
                let axis_len = site.axis.map_or(1, |a| shape[a]);
                let dw: Vec<f32> = match &rounded {
                    Some((Tensor::F32(r), _)) => {
                        r.iter().zip(values).map(|(&q, &v)| q - v).collect()
                    }
                    _ => values
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let p = if site.axis.is_some() {
                                params[(i / inner) % axis_len]
                            } else {
                                params[0]
                            };
                            p.fake_quantize(v, site.scheme.grid) - v
                        })
                        .collect(),
                };
                for &(node, slot) in &site.uses {
                    let shift = data_input
                        .get(&node)
                        .and_then(|x| calibrated.channel_means.get(x))
                        .filter(|_| slot == 1)
                        .and_then(|means| output_shift(g, node, &shape, &dw, means));
                    if let Some(shift) = shift {
                        if correct_bias(g, node, &shift)? {
                            report.bias_corrected += 1;
                        }
                    }
                }
            }
            if let Some((tensor, (nearest, chosen))) = rounded {
                util::set_constant(g, site.value, tensor)?;
                let gain = if chosen > 0.0 {
                    10.0 * (nearest / chosen).log10()
                } else {
                    0.0
                };
                report.rounding_gains_db.push(gain);
            }
            // Below 8 bits a range from the mean |w| (LSQ) leaves large
            // weights outside the grid, where the int8 QuantizeLinear would
            // not saturate: such weights are clipped to the grid first.
            if site.scheme.grid.bits < 8 {
                clip_weight_to_grid(g, site.value, &params, site.scheme.grid, site.axis)?;
            }
        }
        let g = &mut model.graph;
        let dtype = storage(site.scheme.grid)?;
        let shape: Vec<usize> = if site.axis.is_some() {
            vec![params.len()]
        } else {
            vec![]
        };
        let scales: Vec<f64> = params.iter().map(|p| p.scale as f64).collect();
        let zeros: Vec<i128> = params.iter().map(|p| p.zero_point as i128).collect();
        let scale =
            Tensor::from_floats(DataType::F32, &shape, &scales).map_err(|e| e.to_string())?;
        let zero = Tensor::from_ints(dtype, &shape, &zeros).map_err(|e| e.to_string())?;
        let err = |e: qgraph_ir::IrError| e.to_string();
        let scale = g
            .add_initializer(g.unique_value_name(&format!("{name}_scale")), scale)
            .map_err(err)?;
        let zero = g
            .add_initializer(g.unique_value_name(&format!("{name}_zero_point")), zero)
            .map_err(err)?;
        // Below 8 bits an activation is first clipped to the grid's range.
        let mut source = site.value;
        if !site.weight && site.scheme.grid.bits < 8 {
            let p = params[0];
            let (lo, hi) = p.representable(site.scheme.grid);
            let lo = g
                .add_initializer(
                    g.unique_value_name(&format!("{name}_clip_min")),
                    Tensor::scalar_f32(lo),
                )
                .map_err(err)?;
            let hi = g
                .add_initializer(
                    g.unique_value_name(&format!("{name}_clip_max")),
                    Tensor::scalar_f32(hi),
                )
                .map_err(err)?;
            let clipped = g
                .add_value(g.unique_value_name(&format!("{name}_clipped")), None)
                .map_err(err)?;
            g.add_node(
                NewNode::new("Clip")
                    .named(g.unique_node_name(&format!("{name}_Clip")))
                    .inputs([site.value, lo, hi])
                    .outputs([clipped]),
            )
            .map_err(err)?;
            source = clipped;
        }
        // A removable activation whose bounds the quantization range keeps
        // goes: the QuantizeLinear reads its input and clamps as it did.
        let fold = site
            .fold
            .filter(|_| !site.weight && site.scheme.grid.bits >= 8)
            .filter(|&a| {
                let (lo, hi) = params[0].representable(site.scheme.grid);
                activation_bounds(g, opset, a).is_some_and(|(a_lo, a_hi)| lo >= a_lo && hi <= a_hi)
            });
        if let Some(a) = fold {
            source = g.node(a).inputs()[0].ok_or("an activation without input")?;
        }
        let quantized = g
            .add_value(g.unique_value_name(&format!("{name}_quantized")), None)
            .map_err(err)?;
        let dequantized = g
            .add_value(g.unique_value_name(&format!("{name}_dequantized")), None)
            .map_err(err)?;
        let mut q = NewNode::new("QuantizeLinear")
            .named(g.unique_node_name(&format!("{name}_QuantizeLinear")))
            .inputs([source, scale, zero])
            .outputs([quantized]);
        let mut dq = NewNode::new("DequantizeLinear")
            .named(g.unique_node_name(&format!("{name}_DequantizeLinear")))
            .inputs([quantized, scale, zero])
            .outputs([dequantized]);
        if let Some(axis) = site.axis {
            q = q.attr("axis", AttrValue::Int(axis as i64));
            dq = dq.attr("axis", AttrValue::Int(axis as i64));
        }
        let q = g.add_node(q).map_err(err)?;
        if site.scheme.grid.bits < 8 {
            let grid = site.scheme.grid;
            g.node_mut(q).map_err(err)?.meta.push((
                GRID_KEY.to_string(),
                format!("{},{}", grid.qmin(), grid.qmax()),
            ));
        }
        let dq = g.add_node(dq).map_err(err)?;
        // The value this pair stands for, which a folded activation's
        // removal takes out of the graph (for `qgraph report`).
        g.node_mut(dq)
            .map_err(err)?
            .meta
            .push((QUANTIZES_KEY.to_string(), name.clone()));
        for &(node, slot) in &site.uses {
            g.set_node_input(node, slot, Some(dequantized))
                .map_err(err)?;
        }
        if let Some(a) = fold {
            let bounds: Vec<ValueId> = g.node(a).inputs()[1..].iter().flatten().copied().collect();
            g.remove_node(a).map_err(err)?;
            g.remove_value(site.value).map_err(err)?;
            for b in bounds {
                let v = g.value(b);
                if g.consumers(b).is_empty()
                    && g.producer(b).is_none()
                    && !v.is_graph_input()
                    && !v.is_graph_output()
                {
                    g.remove_value(b).map_err(err)?;
                }
            }
            report.folded += 1;
        }
        if site.weight {
            report.weights += 1;
        } else {
            report.activations += 1;
        }
        site_scales.insert(site.value, params.iter().map(|p| p.scale).collect());
    }
    if plan.int32_biases {
        report.int32_biases = quantize_biases(&mut model.graph, plan, &site_scales)?;
    }
    Ok(report)
}

/// Clamps a constant weight to the values its quantization grid can
/// represent (per channel of `axis`, or with one pair); leaves it alone
/// when every value is inside.
fn clip_weight_to_grid(
    g: &mut Graph,
    weight: ValueId,
    params: &[Params],
    grid: Grid,
    axis: Option<usize>,
) -> Result<(), String> {
    let Some(Tensor::F32(w)) = util::constant(g, Some(weight)) else {
        return Ok(());
    };
    let mut clipped = w.clone();
    let mut changed = false;
    let mut clamp = |values: &mut dyn Iterator<Item = &mut f32>, p: Params| {
        let (lo, hi) = p.representable(grid);
        for v in values {
            let c = v.clamp(lo, hi);
            changed |= c != *v;
            *v = c;
        }
    };
    match axis {
        Some(axis) => {
            for (mut lane, &p) in clipped
                .axis_iter_mut(qgraph_ir::ndarray::Axis(axis))
                .zip(params)
            {
                clamp(&mut lane.iter_mut(), p);
            }
        }
        None => clamp(&mut clipped.iter_mut(), params[0]),
    }
    if changed {
        util::set_constant(g, weight, Tensor::F32(clipped))?;
    }
    Ok(())
}

/// The bounds a Relu or Clip clamps to.
fn activation_bounds(g: &Graph, opset: i64, a: NodeId) -> Option<(f32, f32)> {
    let node = g.node(a);
    match node.op_type.as_str() {
        "Relu" => Some((0.0, f32::INFINITY)),
        "Clip" if opset < 11 => {
            let attr = |name, default| match node.attr(name) {
                Some(AttrValue::Float(v)) => *v,
                _ => default,
            };
            Some((attr("min", f32::NEG_INFINITY), attr("max", f32::INFINITY)))
        }
        "Clip" => {
            let bound = |k: usize, default: f32| match node.inputs().get(k).copied().flatten() {
                None => Some(default),
                Some(v) => match util::constant(g, Some(v))? {
                    Tensor::F32(t) if t.len() == 1 => t.iter().next().copied(),
                    _ => None,
                },
            };
            Some((bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?))
        }
        _ => None,
    }
}

/// ONNX Runtime's bias quantization: the f32 bias of a Conv or Gemm whose
/// input and weight are quantized becomes int32 with scale `input scale *
/// weight scale` (per output channel) and zero point 0, behind a
/// DequantizeLinear. Returns how many biases it quantized.
fn quantize_biases(
    g: &mut Graph,
    plan: &QdqPlan,
    scales: &HashMap<ValueId, Vec<f32>>,
) -> Result<usize, String> {
    let err = |e: qgraph_ir::IrError| e.to_string();
    let mut done = 0;
    let ops: Vec<NodeId> = plan
        .sites
        .iter()
        .filter(|s| s.weight)
        .flat_map(|s| {
            s.uses
                .iter()
                .filter(|(_, slot)| *slot == 1)
                .map(|&(n, _)| n)
        })
        .collect();
    for n in ops {
        if !is_op(g, n, &["Conv", "Gemm"]) {
            continue;
        }
        let inputs = g.node(n).inputs().to_vec();
        let (Some(Some(x)), Some(Some(w)), Some(Some(b))) =
            (inputs.first(), inputs.get(1), inputs.get(2))
        else {
            continue;
        };
        // The Q/DQ sources: the values the plan quantized.
        let source = |v: ValueId| {
            plan.sites
                .iter()
                .find(|s| s.uses.contains(&(n, if v == *x { 0 } else { 1 })))
                .map(|s| s.value)
        };
        let (Some(xs), Some(ws)) = (
            source(*x).and_then(|v| scales.get(&v)),
            source(*w).and_then(|v| scales.get(&v)),
        ) else {
            continue;
        };
        let Some(Tensor::F32(bias)) = util::constant(g, Some(*b)).cloned() else {
            continue;
        };
        let (Some(&sx), m) = (xs.first(), bias.len()) else {
            continue;
        };
        if ws.len() != m && ws.len() != 1 {
            continue;
        }
        let scale: Vec<f64> = (0..m)
            .map(|c| (sx * ws[if ws.len() == 1 { 0 } else { c }]) as f64)
            .collect();
        if scale.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
            continue;
        }
        let q: Vec<i128> = bias
            .iter()
            .zip(&scale)
            .map(|(&v, &s)| {
                ((v as f64 / s).round_ties_even()).clamp(i32::MIN as f64, i32::MAX as f64) as i128
            })
            .collect();
        let name = g.value(*b).name().to_string();
        // One weight scale: a scalar bias scale (per-axis Q/DQ needs opset
        // 13, and per-tensor weights are what older models get).
        let per_axis = ws.len() != 1;
        let scale_shape: &[usize] = if per_axis { &[m] } else { &[] };
        let scale = if per_axis { scale } else { vec![scale[0]] };
        let q = Tensor::from_ints(DataType::I32, &[m], &q).map_err(|e| e.to_string())?;
        let scale =
            Tensor::from_floats(DataType::F32, scale_shape, &scale).map_err(|e| e.to_string())?;
        let zero = Tensor::from_ints(
            DataType::I32,
            scale_shape,
            &vec![0; scale_shape.iter().product()],
        )
        .map_err(|e| e.to_string())?;
        let q = g
            .add_initializer(g.unique_value_name(&format!("{name}_quantized")), q)
            .map_err(err)?;
        let scale = g
            .add_initializer(g.unique_value_name(&format!("{name}_scale")), scale)
            .map_err(err)?;
        let zero = g
            .add_initializer(g.unique_value_name(&format!("{name}_zero_point")), zero)
            .map_err(err)?;
        let out = g
            .add_value(g.unique_value_name(&format!("{name}_dequantized")), None)
            .map_err(err)?;
        let mut dq = NewNode::new("DequantizeLinear")
            .named(g.unique_node_name(&format!("{name}_DequantizeLinear")))
            .inputs([q, scale, zero])
            .outputs([out]);
        if per_axis {
            dq = dq.attr("axis", AttrValue::Int(0));
        }
        g.add_node(dq).map_err(err)?;
        g.set_node_input(n, 2, Some(out)).map_err(err)?;
        if g.consumers(*b).is_empty()
            && !g.value(*b).is_graph_input()
            && !g.value(*b).is_graph_output()
        {
            g.remove_value(*b).map_err(err)?;
        }
        done += 1;
    }
    Ok(done)
}

/// The pass form: `insert-qdq(scheme=int8)`. Weights are quantized from
/// their values; activations where the model records a calibrated range
/// (`qgraph insert` calibrates on data and then runs the same code).
pub struct InsertQdq {
    pub options: InsertOptions,
}

impl InsertQdq {
    pub fn from_params(mut p: PassParams) -> Result<Box<dyn Pass>, String> {
        let scheme = p.take("scheme").unwrap_or_else(|| "int8".to_string());
        let mut scheme = Scheme::parse(&scheme)?;
        let mut flag = |name: &str, default: bool| match p.take(name).as_deref() {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(format!("{name} must be true or false, not '{other}'")),
        };
        let ends = flag("ends-at-8-bits", true)?;
        let pow2 = flag("pow2-scales", false)?;
        scheme.weights.pow2 = pow2;
        scheme.activations.pow2 = pow2;
        let placement =
            Placement::parse(&p.take("placement").unwrap_or_else(|| "tensorrt".into()))?;
        p.finish(&["scheme", "placement", "ends-at-8-bits", "pow2-scales"])?;
        Ok(Box::new(InsertQdq {
            options: InsertOptions {
                scheme,
                placement,
                ends_at_8_bits: ends,
                overrides: Vec::new(),
            },
        }))
    }
}

impl Pass for InsertQdq {
    fn name(&self) -> &'static str {
        "insert-qdq"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        if !cx.allow_rewrite() {
            return Ok(false);
        }
        let plan = plan_qdq(model, &self.options)?;
        let report = insert_qdq(model, &plan, &Calibrated::default(), false)?;
        Ok(report.weights + report.activations > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_recorded_as_text() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", None).unwrap();
        g.value_mut(x)
            .unwrap()
            .meta
            .push((RANGE_KEY.into(), "-1.5, 2.25".into()));
        assert_eq!(recorded_range(&g, x), Some((-1.5, 2.25)));
    }

    #[test]
    fn grids_are_held_in_the_smallest_integer_type() {
        let grid = |bits, signed| Grid {
            bits,
            signed,
            narrow: false,
        };
        assert_eq!(storage(grid(4, true)), Ok(DataType::I8));
        assert_eq!(storage(grid(8, false)), Ok(DataType::U8));
        assert_eq!(storage(grid(16, true)), Ok(DataType::I16));
    }

    #[test]
    fn bias_correction_shifts_each_output_channel_by_its_expected_error() {
        let g = qgraph_text::parse_model(
            r#"
ir_version 8
opset "" 13
graph main {
  input %x: f32[N,4,3,3]
  input %v: f32[N,2]
  output %y: f32[N,2,3,3]
  output %z: f32[N,3]
  init %w = f32[2,2,1,1] [1.0, 2.0, 3.0, 4.0]
  init %m = f32[3,2] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  conv: %y = Conv(%x, %w) {group = 2}
  gemm: %z = Gemm(%v, %m) {transB = 1}
}
"#,
        )
        .unwrap()
        .graph;
        let node = |name| g.node_by_name(name).unwrap();
        // Grouped: output 0 reads channels 0 and 1, output 1 channels 2 and 3.
        let shift = output_shift(
            &g,
            node("conv"),
            &[2, 2, 1, 1],
            &[0.5, -1.0, 2.0, 0.25],
            &[1.0, 2.0, 3.0, 4.0],
        );
        assert_eq!(shift, Some(vec![0.5 - 2.0, 6.0 + 1.0]));
        // Gemm with transB: output n sums dw[n][k] * mean[k].
        let shift = output_shift(
            &g,
            node("gemm"),
            &[3, 2],
            &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            &[2.0, 3.0],
        );
        assert_eq!(shift, Some(vec![2.0, 3.0, 5.0]));
        // Means that do not fit the weight: no correction.
        assert_eq!(
            output_shift(&g, node("gemm"), &[3, 2], &[0.0; 6], &[1.0]),
            None
        );
    }

    #[test]
    fn weights_get_one_scale_per_output_channel() {
        let w = Tensor::F32(
            qgraph_ir::ndarray::ArrayD::from_shape_vec(
                vec![2, 3],
                vec![1.0, -2.0, 0.5, 0.1, 0.2, -0.4],
            )
            .unwrap(),
        );
        let scheme = Scheme::parse("int8").unwrap().weights;
        let p = weight_params(&w, scheme, Some(0)).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].scale, 2.0 / 127.0);
        assert_eq!(p[1].scale, 0.4 / 127.0);
        assert!(p.iter().all(|p| p.zero_point == 0));
    }
}
