//! Operator kernels, one module per family. A kernel takes the node context
//! and its inputs (`None` for an absent optional input) and returns its
//! outputs.

mod attention;
mod backward;
mod cast;
mod contrib;
mod control;
mod conv;
mod depthwise;
mod depthwise_blocked;
mod elementwise;
mod fastmath;
mod gemm;
mod image_decoder;
mod index;
mod integer;
mod math;
mod matmul;
mod nn;
mod norm;
mod pointwise;
mod recurrent_attention;
mod reduce;
mod rnn;
mod sequence;
mod signal;
mod spatial;
mod strings;
pub(crate) mod typed;

pub(crate) use control::call_function;
pub(crate) use norm::{batch_norm_backward_through, batch_norm_training};
pub(crate) use pointwise::{
    build as build_pointwise, is_pointwise, relu_gradient_from_output, Clamp, Pointwise,
};
pub(crate) use pool::max_pool_recording;
pub use quant::SCALE_GRADIENT_KEY;
pub(crate) use shape::concatenate_tensors;

/// Whether the kernel of `op` does the work `OpCtx::fusion` asks for.
pub fn accepts_fusion(op: &str) -> bool {
    op == "Conv"
}
mod pool;
mod quant;
mod resize;
mod shape;

use crate::{DataRef, EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn};
use qgraph_ir::{Data, Tensor};

pub type Kernel = fn(&OpCtx, &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError>;

/// A kernel given its first input to keep, because no one reads it after
/// this node (the slice's first entry is `None`): it may compute in that
/// input's buffer, or move it into its output, rather than copy.
pub type ConsumingKernel = fn(&OpCtx, Tensor, &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError>;

/// The consuming form of an operator's kernel, where it has one.
pub fn consuming_kernel(domain: &str, op: &str) -> Option<ConsumingKernel> {
    if !matches!(domain, "" | "ai.onnx") {
        return None;
    }
    shape::CONSUMING_KERNELS
        .iter()
        .chain([("Softmax", norm::softmax_consuming as ConsumingKernel)].iter())
        .find(|(name, _)| *name == op)
        .map(|(_, k)| *k)
}

/// A kernel of values of any kind (sequences, optionals, control flow whose
/// subgraphs pass them on): reads and writes `Data`.
pub type DataKernel = fn(&OpCtx, &[Option<DataRef>]) -> Result<Vec<Data>, EvalError>;

/// The kernel of a default-domain operator that takes or makes sequences
/// or optionals; the evaluator prefers it to a tensor kernel of the same
/// name.
pub fn data_kernel(domain: &str, op: &str) -> Option<DataKernel> {
    if !matches!(domain, "" | "ai.onnx") {
        return None;
    }
    [sequence::DATA_KERNELS, control::DATA_KERNELS]
        .iter()
        .flat_map(|t| t.iter())
        .find(|(name, _)| *name == op)
        .map(|(_, k)| *k)
}

/// What a backward kernel reads: the forward pass's inputs and outputs, the
/// loss gradient of each output (`None`: zero), and which inputs' gradients
/// the caller wants.
pub struct Grads<'a> {
    pub inputs: &'a [Option<&'a Tensor>],
    pub outputs: &'a [Option<&'a Tensor>],
    /// The loss gradient of each output (`None`: zero), handed over to the
    /// kernel, which may reuse its buffer: see [`Grads::d_output`].
    pub d_outputs: std::sync::Mutex<Vec<Option<Tensor>>>,
    pub wanted: &'a [bool],
    /// Whether the forward pass ran in training mode (batch statistics).
    pub training: bool,
    /// What the tape's forward kept for the backward (BatchNormalization in
    /// training: the batch mean and variance; MaxPool: where each window's
    /// first maximum is).
    pub saved: &'a [Tensor],
}

impl Grads<'_> {
    /// Whether input `i` is present and its gradient wanted.
    pub fn wants(&self, i: usize) -> bool {
        self.wanted.get(i).copied().unwrap_or(false)
            && self.inputs.get(i).copied().flatten().is_some()
    }

    /// Takes the gradient of output `k`, in standard layout (zeros when
    /// none flows). Taken once: the kernel owns it and may overwrite it.
    /// An output the forward did not keep (fused with the clamp after it)
    /// has no shape to check the gradient against, or to make zeros of.
    pub fn d_output(&self, cx: &OpCtx, k: usize) -> Result<ArrayD<f32>, EvalError> {
        let shape = self.outputs.get(k).copied().flatten().map(|y| y.shape());
        let taken = self
            .d_outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(k)
            .and_then(Option::take);
        match (taken, shape) {
            (Some(Tensor::F32(d)), _) if shape.is_none_or(|s| s == d.shape()) => {
                Ok(if d.is_standard_layout() {
                    d
                } else {
                    d.as_standard_layout().into_owned()
                })
            }
            (Some(d), _) => cx.err(format!(
                "the gradient of output {k} is {} {:?}, the output {shape:?}",
                d.dtype(),
                d.shape(),
            )),
            (None, Some(shape)) => Ok(ArrayD::zeros(IxDyn(shape))),
            (None, None) => cx.err(format!("output {k} was not kept and has no gradient")),
        }
    }
}

/// One gradient per input of the node (`None` where not wanted or not
/// differentiable).
pub type BackwardKernel = fn(&OpCtx, &Grads) -> Result<Vec<Option<Tensor>>, EvalError>;

/// The backward kernel of an operator, beside its forward kernel.
pub fn backward_kernel(domain: &str, op: &str) -> Option<BackwardKernel> {
    if domain == TRAINING_DOMAIN {
        return match op {
            "FakeQuantize" => Some(quant::fake_quantize_backward),
            "TanhNormalize" => Some(quant::tanh_normalize_backward),
            _ => None,
        };
    }
    if !matches!(domain, "" | "ai.onnx") {
        return None;
    }
    BACKWARD_KERNELS
        .iter()
        .find(|(name, _)| *name == op)
        .map(|(_, k)| *k)
}

/// Names of the operators with a backward kernel.
pub fn differentiable_ops() -> Vec<&'static str> {
    BACKWARD_KERNELS.iter().map(|(n, _)| *n).collect()
}

const BACKWARD_KERNELS: &[(&str, BackwardKernel)] = &[
    ("Relu", pointwise::backward),
    ("LeakyRelu", pointwise::backward),
    ("Clip", pointwise::backward),
    ("Sigmoid", pointwise::backward),
    ("HardSigmoid", pointwise::backward),
    ("HardSwish", pointwise::backward),
    ("Tanh", pointwise::backward),
    ("BatchNormalization", norm::batch_norm_backward),
    ("Neg", elementwise::unary_backward),
    ("Abs", elementwise::unary_backward),
    ("Sqrt", elementwise::unary_backward),
    ("Exp", elementwise::unary_backward),
    ("Log", elementwise::unary_backward),
    ("Reciprocal", elementwise::unary_backward),
    ("Identity", elementwise::unary_backward),
    ("Dropout", elementwise::unary_backward),
    ("Add", elementwise::binary_backward),
    ("Sub", elementwise::binary_backward),
    ("Mul", elementwise::binary_backward),
    ("Div", elementwise::binary_backward),
    ("Pow", elementwise::binary_backward),
    ("Conv", conv::conv_backward),
    ("Gemm", matmul::gemm_backward),
    ("MatMul", matmul::matmul_backward),
    ("Softmax", norm::softmax_backward),
    ("MaxPool", pool::max_pool_backward),
    ("AveragePool", pool::average_pool_backward),
    ("GlobalAveragePool", pool::global_average_pool_backward),
    ("ReduceMean", pool::reduce_mean_backward),
    ("Flatten", shape::reshape_backward),
    ("Reshape", shape::reshape_backward),
    ("Squeeze", shape::reshape_backward),
    ("Unsqueeze", shape::reshape_backward),
    ("Transpose", shape::transpose_backward),
    ("Concat", shape::concat_backward),
    ("Split", shape::split_backward),
    ("Slice", shape::slice_backward),
    ("Pad", shape::pad_backward),
    ("QuantizeLinear", quant::quantize_linear_backward),
    ("DequantizeLinear", quant::dequantize_linear_backward),
    ("LayerNormalization", backward::layer_norm_backward),
    ("Erf", backward::erf_backward),
    ("Gelu", backward::gelu_backward),
    ("LogSoftmax", backward::log_softmax_backward),
    ("Where", backward::where_backward),
    ("Expand", backward::expand_backward),
    ("ReduceSum", backward::reduce_sum_backward),
    ("Gather", backward::gather_backward),
    ("Resize", backward::resize_nearest_backward),
    ("Upsample", backward::resize_nearest_backward),
    ("Cast", backward::cast_backward),
];

/// Sums a gradient over the dims its operand was broadcast along, back to
/// the operand's `shape`.
pub(crate) fn sum_to_shape(mut g: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    while g.ndim() > shape.len() {
        g = g.sum_axis(Axis(0));
    }
    for (d, &s) in shape.iter().enumerate() {
        if s == 1 && g.shape()[d] != 1 {
            g = g.sum_axis(Axis(d)).insert_axis(Axis(d));
        }
    }
    g
}

/// Why the evaluator refuses an operator it has no kernel for, where the
/// refusal is a decision rather than work not yet done.
pub fn why_refused(domain: &str, op: &str) -> Option<&'static str> {
    const RANDOM: &[&str] = &[
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
    ];
    // Default-domain operators newer than the opset the evaluator covers.
    const AFTER_OPSET_23: &[(&str, &str)] = &[(
        "SwiGLU",
        "an operator of opset 28, newer than the opset 23 the evaluator covers",
    )];
    match qgraph_ir::canonical_domain(domain) {
        "" if RANDOM.contains(&op) => Some(
            "its result is random, and ONNX fixes no generator: no seed reproduces another \
             runtime's draws",
        ),
        "" => AFTER_OPSET_23
            .iter()
            .find(|(name, _)| *name == op)
            .map(|(_, why)| *why),
        "ai.onnx.preview.training" => Some(
            "the training optimizers of ai.onnx.preview.training are left out: `qgraph train` \
             has its own",
        ),
        "ai.onnx.ml" => Some("the ai.onnx.ml domain (classical machine learning) is not covered"),
        "ai.onnx.preview" => Some("the experimental ai.onnx.preview domain is not covered"),
        _ => None,
    }
}

/// The kernel for an operator of the default ONNX domain, or of ONNX
/// Runtime's `com.microsoft` operators.
pub fn kernel(domain: &str, op: &str) -> Option<Kernel> {
    let tables: &[&[(&str, Kernel)]] = match domain {
        "" | "ai.onnx" => DEFAULT_DOMAIN_TABLES,
        "com.microsoft" => &[
            nn::MICROSOFT_KERNELS,
            attention::MICROSOFT_KERNELS,
            MICROSOFT_KERNELS,
        ],
        TRAINING_DOMAIN => &[TRAINING_KERNELS],
        _ => return None,
    };
    tables
        .iter()
        .flat_map(|t| t.iter())
        .find(|(name, _)| *name == op)
        .map(|(_, k)| *k)
}

/// The default domain's kernels, one table per family module; the first
/// table naming an operator wins, so a family's general kernel replaces an
/// older f32-only one listed in `KERNELS`.
const DEFAULT_DOMAIN_TABLES: &[&[(&str, Kernel)]] = &[
    math::KERNELS,
    cast::KERNELS,
    reduce::KERNELS,
    index::KERNELS,
    nn::KERNELS,
    attention::KERNELS,
    recurrent_attention::KERNELS,
    rnn::KERNELS,
    control::KERNELS,
    signal::KERNELS,
    spatial::KERNELS,
    strings::KERNELS,
    image_decoder::KERNELS,
    KERNELS,
];

/// The domain of the operators only training graphs have.
pub const TRAINING_DOMAIN: &str = "qgraph.train";

const TRAINING_KERNELS: &[(&str, Kernel)] = &[
    ("FakeQuantize", quant::fake_quantize),
    ("TanhNormalize", quant::tanh_normalize),
];

const MICROSOFT_KERNELS: &[(&str, Kernel)] = &[
    ("QLinearAdd", contrib::qlinear_add),
    ("QLinearMul", contrib::qlinear_mul),
    (
        "QLinearGlobalAveragePool",
        contrib::qlinear_global_average_pool,
    ),
    ("QLinearConcat", contrib::qlinear_concat),
    ("QLinearSigmoid", contrib::qlinear_sigmoid),
    ("QGemm", contrib::qgemm),
];

/// Names of the operators the evaluator runs.
pub fn supported_ops() -> Vec<&'static str> {
    let mut ops: Vec<&'static str> = DEFAULT_DOMAIN_TABLES
        .iter()
        .flat_map(|t| t.iter().map(|(n, _)| *n))
        .chain(sequence::DATA_KERNELS.iter().map(|(n, _)| *n))
        .chain(control::DATA_KERNELS.iter().map(|(n, _)| *n))
        .collect();
    ops.sort_unstable();
    ops.dedup();
    ops
}

const KERNELS: &[(&str, Kernel)] = &[
    ("Relu", pointwise::kernel),
    ("LeakyRelu", pointwise::kernel),
    ("Clip", elementwise::clip),
    ("Sigmoid", pointwise::kernel),
    ("HardSigmoid", pointwise::kernel),
    ("HardSwish", pointwise::kernel),
    ("Tanh", pointwise::kernel),
    ("Neg", elementwise::neg),
    ("Abs", elementwise::abs),
    ("Sqrt", elementwise::sqrt),
    ("Exp", elementwise::exp),
    ("Log", elementwise::log),
    ("Reciprocal", elementwise::reciprocal),
    ("Floor", elementwise::floor),
    ("Ceil", elementwise::ceil),
    ("Identity", elementwise::identity),
    ("Dropout", elementwise::dropout),
    ("Add", elementwise::add),
    ("Sub", elementwise::sub),
    ("Mul", elementwise::mul),
    ("Div", elementwise::div),
    ("Pow", elementwise::pow),
    ("Conv", conv::conv),
    ("ConvTranspose", conv::conv_transpose),
    ("Gemm", matmul::gemm),
    ("MatMul", matmul::matmul),
    ("BatchNormalization", pointwise::kernel),
    ("Softmax", norm::softmax),
    ("MaxPool", pool::max_pool),
    ("AveragePool", pool::average_pool),
    ("GlobalAveragePool", pool::global_average_pool),
    ("GlobalMaxPool", pool::global_max_pool),
    ("ReduceMean", pool::reduce_mean),
    ("Flatten", shape::flatten),
    ("Reshape", shape::reshape),
    ("Transpose", shape::transpose),
    ("Concat", shape::concat),
    ("Split", shape::split),
    ("Slice", shape::slice),
    ("Pad", shape::pad),
    ("Shape", shape::shape),
    ("Gather", shape::gather),
    ("Cast", shape::cast),
    ("Squeeze", shape::squeeze),
    ("Unsqueeze", shape::unsqueeze),
    ("ConstantOfShape", shape::constant_of_shape),
    ("Constant", shape::constant),
    ("Resize", resize::resize),
    ("QuantizeLinear", quant::quantize_linear),
    ("DequantizeLinear", quant::dequantize_linear),
    ("ConvInteger", integer::conv_integer),
    ("MatMulInteger", integer::matmul_integer),
    ("QLinearConv", integer::qlinear_conv),
    ("QLinearMatMul", integer::qlinear_matmul),
    ("DynamicQuantizeLinear", integer::dynamic_quantize_linear),
];

/// Applies `$body` (with `$a` bound to the array) to any ndarray variant,
/// rebuilding the same variant: for data movement that ignores the type.
macro_rules! map_any {
    ($cx:expr, $t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => Tensor::F32($body),
            Tensor::F64($a) => Tensor::F64($body),
            Tensor::F16($a) => Tensor::F16($body),
            Tensor::BF16($a) => Tensor::BF16($body),
            Tensor::I8($a) => Tensor::I8($body),
            Tensor::I16($a) => Tensor::I16($body),
            Tensor::I32($a) => Tensor::I32($body),
            Tensor::I64($a) => Tensor::I64($body),
            Tensor::U8($a) => Tensor::U8($body),
            Tensor::U16($a) => Tensor::U16($body),
            Tensor::U32($a) => Tensor::U32($body),
            Tensor::U64($a) => Tensor::U64($body),
            Tensor::Bool($a) => Tensor::Bool($body),
            Tensor::String($a) => Tensor::String($body),
            other => return $cx.err(format!("{} tensors are not supported here", other.dtype())),
        }
    };
}
pub(crate) use map_any;

/// Input `i`, which must be present.
pub fn input<'t>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
) -> Result<&'t Tensor, EvalError> {
    match inputs.get(i).copied().flatten() {
        Some(t) => Ok(t),
        None => cx.err(format!("input {i} is required")),
    }
}

pub fn f32_input<'t>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
) -> Result<&'t ArrayD<f32>, EvalError> {
    match input(cx, inputs, i)? {
        Tensor::F32(a) => Ok(a),
        t => cx.err(format!(
            "input {i} is {}, this kernel computes in f32",
            t.dtype()
        )),
    }
}

/// An integer tensor's values (shapes, axes, indices).
pub fn ints_of(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<i64>, EvalError> {
    match t {
        Tensor::I64(a) => Ok(a.iter().copied().collect()),
        Tensor::I32(a) => Ok(a.iter().map(|&x| x as i64).collect()),
        t => cx.err(format!(
            "{what} must be int64 or int32, found {}",
            t.dtype()
        )),
    }
}

/// An optional integer input, or an attribute of the same meaning for
/// older opsets.
pub fn ints_input_or_attr(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    i: usize,
    attr: &str,
) -> Result<Option<Vec<i64>>, EvalError> {
    match inputs.get(i).copied().flatten() {
        Some(t) => Ok(Some(ints_of(cx, t, attr)?)),
        None => cx.ints_attr(attr),
    }
}

pub fn array<T>(shape: &[usize], data: Vec<T>) -> ArrayD<T> {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("kernels build data of the shape's size")
}

/// The sum of `f(v)` over a slice (a plane, a row): f32 partial sums in 16
/// lanes (which the compiler keeps in vector registers), added in f64 at the
/// end; the callers add such sums in f64, in order. The backward kernels'
/// reductions use these, so that they vectorise.
#[inline(always)]
pub(crate) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v) as f64).sum();
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail
}

/// As [`lane_sum`], of `f(x, d)` over two planes.
#[inline(always)]
pub(crate) fn lane_dot(xs: &[f32], ds: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut lanes = [0f32; 16];
    let mut xc = xs.chunks_exact(16);
    let mut dc = ds.chunks_exact(16);
    for (x, d) in (&mut xc).zip(&mut dc) {
        for ((l, &a), &b) in lanes.iter_mut().zip(x).zip(d) {
            *l += f(a, b);
        }
    }
    let tail: f64 = xc
        .remainder()
        .iter()
        .zip(dc.remainder())
        .map(|(&a, &b)| f(a, b) as f64)
        .sum();
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail
}

/// Runs one node of `op` without edges (inputs by position, `None` for an
/// absent optional one) at the default domain's `opset`: the kernel tests'
/// way to call a kernel through `run_node`.
#[cfg(test)]
pub(crate) fn run_test_op(
    op: &str,
    opset: i64,
    attrs: Vec<(&str, qgraph_ir::AttrValue)>,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let mut graph = qgraph_ir::Graph::new("test");
    let mut node = qgraph_ir::NewNode::new(op);
    for (name, value) in attrs {
        node = node.attr(name, value);
    }
    let id = graph.add_node(node).expect("a node without edges");
    crate::run_node(&graph, id, opset, inputs)
}

/// Test values in [-1, 1) with whole 24-bit mantissas (a linear
/// congruential generator from `seed`), so that products round and a
/// different order, or a multiply-add not fused, shows in the bits.
#[cfg(test)]
pub(crate) fn test_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
