//! Indexing and data movement: selection (Where, Compress, NonZero, Trilu),
//! gathers and scatters, tensors made from shapes (Range, EyeLike, OneHot,
//! ConstantOfShape, Constant), the reshaping and rearranging operators, and
//! Det. Every operator takes every type its spec allows: data movement
//! moves values of any type, bool and string included; packed types (int4,
//! float8, ...) are moved as one integer code per element and packed back.
//! Indices out of range are errors naming the index, never panics.

use super::typed::{any_elem, broadcast_shapes, broadcast_to, convert, floating, numeric};
use super::typed::{Elem, Float, Number};
use super::{array, input, ints_of, shape, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn, Slice, SliceInfoElem};
use qgraph_ir::{AttrValue, DataType, PackedTensor, Tensor};
use std::borrow::Cow;
use std::cmp::Ordering;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("Where", where_),
    ("Expand", expand),
    ("Tile", tile),
    ("Range", range),
    ("Trilu", trilu),
    ("OneHot", one_hot),
    ("NonZero", non_zero),
    ("Compress", compress),
    ("EyeLike", eye_like),
    ("Size", size),
    ("Gather", gather),
    ("GatherElements", gather_elements),
    ("GatherND", gather_nd),
    ("ScatterND", scatter_nd),
    ("ScatterElements", scatter_elements),
    ("Scatter", scatter_elements),
    ("TensorScatter", tensor_scatter),
    ("Unique", unique),
    ("ReverseSequence", reverse_sequence),
    ("DepthToSpace", depth_to_space),
    ("SpaceToDepth", space_to_depth),
    ("CenterCropPad", center_crop_pad),
    ("Reshape", reshape),
    ("Flatten", flatten),
    ("Squeeze", squeeze),
    ("Unsqueeze", unsqueeze),
    ("Transpose", transpose),
    ("Concat", concat),
    ("Split", split),
    ("Slice", slice),
    ("Pad", pad),
    ("ConstantOfShape", constant_of_shape),
    ("Constant", constant),
    ("Det", det),
];

/// The most elements an output sized by input values (Expand, Tile, Range,
/// ConstantOfShape, OneHot, Pad...) may have: a bad shape is an error, not
/// an allocation that aborts the process.
const MAX_ELEMENTS: usize = 1 << 32;

// ---------------------------------------------------------------------------
// Packed types as per-element codes

/// A packed tensor's elements as one unsigned integer code each (u8 up to 8
/// bits, u16/u32/u64 for the wider packed types such as complex64), so that
/// data movement can move them and [`repack`] can pack the result.
fn unpack(cx: &OpCtx, p: &PackedTensor) -> Result<Tensor, EvalError> {
    let shape = p.shape();
    let count = checked_len(cx, shape)?;
    let bytes = p.bytes();
    Ok(match p.dtype().bits() {
        Some(bits) if bits <= 8 => {
            let mask = ((1u16 << bits) - 1) as u8;
            let codes = (0..count)
                .map(|k| {
                    let at = k * bits;
                    let lo = bytes.get(at / 8).copied().unwrap_or(0) as u16;
                    let hi = bytes.get(at / 8 + 1).copied().unwrap_or(0) as u16;
                    (((lo | hi << 8) >> (at % 8)) as u8) & mask
                })
                .collect();
            Tensor::U8(array(shape, codes))
        }
        Some(16) => Tensor::U16(array(
            shape,
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )),
        Some(32) => Tensor::U32(array(
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )),
        Some(64) => Tensor::U64(array(
            shape,
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        )),
        _ => return cx.err(format!("{} tensors are not supported here", p.dtype())),
    })
}

/// Packs per-element codes (from [`unpack`]) back into `dtype`.
fn repack(cx: &OpCtx, dtype: DataType, codes: Tensor) -> Result<Tensor, EvalError> {
    let shape = codes.shape().to_vec();
    let bytes: Vec<u8> = match (dtype.bits(), &codes) {
        (Some(bits), Tensor::U8(a)) if bits <= 8 => {
            let mut bytes = vec![0u8; (a.len() * bits).div_ceil(8)];
            for (k, &code) in a.iter().enumerate() {
                let at = k * bits;
                let shifted = (code as u16) << (at % 8);
                bytes[at / 8] |= shifted as u8;
                if let Some(next) = bytes.get_mut(at / 8 + 1) {
                    *next |= (shifted >> 8) as u8;
                }
            }
            bytes
        }
        (_, Tensor::U16(a)) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        (_, Tensor::U32(a)) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        (_, Tensor::U64(a)) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        (_, t) => {
            return cx.err(format!(
                "internal: {} codes for a {dtype} tensor",
                t.dtype()
            ))
        }
    };
    match PackedTensor::new(dtype, &shape, bytes) {
        Ok(p) => Ok(Tensor::Packed(p)),
        Err(e) => cx.err(e.to_string()),
    }
}

/// Applies `$body` (with `$a: &ArrayD<T>`, returning `ArrayD<T>`) to a
/// tensor of any type and wraps the result in the same type; packed tensors
/// go through their codes.
macro_rules! moved {
    ($cx:expr, $t:expr, |$a:ident| $body:expr) => {
        match $t {
            Tensor::Packed(packed) => {
                let codes = unpack($cx, packed)?;
                let out = any_elem!($cx, &codes, "the data", |$a| Elem::wrap($body));
                repack($cx, packed.dtype(), out)?
            }
            plain => any_elem!($cx, plain, "the data", |$a| Elem::wrap($body)),
        }
    };
}

/// Another input of the type `T` the kernel dispatched on (checked by the
/// caller with [`same_dtype`]); a packed one as its codes.
fn like<'t, T: Elem>(
    cx: &OpCtx,
    t: &'t Tensor,
    what: &str,
) -> Result<Cow<'t, ArrayD<T>>, EvalError> {
    if let Tensor::Packed(p) = t {
        let codes = unpack(cx, p)?;
        if let Some(a) = T::unwrap(&codes) {
            return Ok(Cow::Owned(a.clone()));
        }
    } else if let Some(a) = T::unwrap(t) {
        return Ok(Cow::Borrowed(a));
    }
    cx.err(format!(
        "{what} is {}, where {} was expected",
        t.dtype(),
        T::DTYPE
    ))
}

/// An error unless the tensors all have the type of the first.
fn same_dtype(cx: &OpCtx, tensors: &[&Tensor], what: &str) -> Result<(), EvalError> {
    if let Some(first) = tensors.first() {
        if let Some(other) = tensors.iter().find(|t| t.dtype() != first.dtype()) {
            return cx.err(format!(
                "{what} must have one type, found {} and {}",
                first.dtype(),
                other.dtype()
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Shapes, indices and element access

/// The element count of `shape`, at most [`MAX_ELEMENTS`].
fn checked_len(cx: &OpCtx, shape: &[usize]) -> Result<usize, EvalError> {
    match qgraph_ir::element_count(shape) {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => cx.err(format!("a shape of {shape:?} is too large")),
    }
}

/// Dims given as values (a shape input): non-negative, of a size that fits.
fn dims_of(cx: &OpCtx, values: &[i64], what: &str) -> Result<Vec<usize>, EvalError> {
    if let Some(v) = values.iter().find(|&&v| v < 0) {
        return cx.err(format!("{what} {values:?} has a negative dim {v}"));
    }
    let dims: Vec<usize> = values.iter().map(|&v| v as usize).collect();
    checked_len(cx, &dims)?;
    Ok(dims)
}

/// An index into a dim of `dim` elements; negative ones count from the end.
fn resolve(cx: &OpCtx, index: i64, dim: usize, what: &str) -> Result<usize, EvalError> {
    let d = dim as i64;
    let at = if index < 0 { index + d } else { index };
    if at < 0 || at >= d {
        return cx.err(format!("{what} {index} is out of range for a dim of {dim}"));
    }
    Ok(at as usize)
}

/// Row-major strides of `shape`, in elements.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Calls `f` with each multi-index of `shape`, in row-major order.
fn each_index(
    shape: &[usize],
    mut f: impl FnMut(&[usize]) -> Result<(), EvalError>,
) -> Result<(), EvalError> {
    if shape.contains(&0) {
        return Ok(());
    }
    let mut idx = vec![0; shape.len()];
    loop {
        f(&idx)?;
        let mut d = shape.len();
        loop {
            if d == 0 {
                return Ok(());
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The elements of `a` in row-major order, borrowed when they already are.
fn flat<T: Clone>(a: &ArrayD<T>) -> Cow<'_, [T]> {
    match a.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(a.iter().cloned().collect()),
    }
}

/// The elements of `a` at row-major `offsets` (checked by the caller), in
/// an array of `shape`.
fn pick<T: Clone>(a: &ArrayD<T>, offsets: &[usize], shape: &[usize]) -> ArrayD<T> {
    let data = flat(a);
    array(shape, offsets.iter().map(|&o| data[o].clone()).collect())
}

/// As [`pick`], with `fill` where an offset is `None`.
fn pick_or<T: Clone>(
    a: &ArrayD<T>,
    offsets: &[Option<usize>],
    shape: &[usize],
    fill: &T,
) -> ArrayD<T> {
    let data = flat(a);
    array(
        shape,
        offsets
            .iter()
            .map(|o| o.map_or_else(|| fill.clone(), |o| data[o].clone()))
            .collect(),
    )
}

/// Runs of `len` elements of `a` from each of `starts`, laid end to end.
fn copy_runs<T: Clone>(a: &ArrayD<T>, starts: &[usize], len: usize, shape: &[usize]) -> ArrayD<T> {
    let data = flat(a);
    let mut out = Vec::with_capacity(starts.len() * len);
    for &s in starts {
        out.extend_from_slice(&data[s..s + len]);
    }
    array(shape, out)
}

/// A tensor's values as i64 (indices given in any numeric type; floats
/// truncate).
fn numbers_as_i64(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<i64>, EvalError> {
    Ok(numeric!(cx, t, what, |a| a
        .iter()
        .map(|v| v.to_i64())
        .collect()))
}

/// The single value of a scalar (or one-element) integer input.
fn scalar_int(cx: &OpCtx, t: &Tensor, what: &str) -> Result<i64, EvalError> {
    match ints_of(cx, t, what)?.as_slice() {
        [v] => Ok(*v),
        v => cx.err(format!("{what} must hold one value, found {}", v.len())),
    }
}

/// Runs an older kernel (of `shape.rs`, any plain type) on a packed input 0
/// through its codes, packing the outputs of the codes' type back.
fn via_codes(cx: &OpCtx, i: &[Option<&Tensor>], kernel: Kernel) -> Result<Vec<Tensor>, EvalError> {
    let Some(Some(Tensor::Packed(p))) = i.first() else {
        return kernel(cx, i);
    };
    let codes = unpack(cx, p)?;
    let mut inputs = i.to_vec();
    inputs[0] = Some(&codes);
    kernel(cx, &inputs)?
        .into_iter()
        .map(|t| {
            if t.dtype() == codes.dtype() {
                repack(cx, p.dtype(), t)
            } else {
                Ok(t)
            }
        })
        .collect()
}

/// The `axis` attribute (default 0) of an operator that indexes along an
/// axis of its data, which therefore has one.
fn data_axis(cx: &OpCtx, rank: usize) -> Result<usize, EvalError> {
    if rank == 0 {
        return cx.err("the data is a scalar, which has no axis to index along");
    }
    cx.axis(cx.int_attr("axis", 0)?, rank)
}

/// Whether the node sets attribute `name`.
fn has_attr(cx: &OpCtx, name: &str) -> bool {
    cx.graph.node(cx.node).attr(name).is_some()
}

// ---------------------------------------------------------------------------
// Element traits for the operators that look at values of any type

/// Whether a value counts as non-zero (NonZero): numbers other than zero
/// (NaN included), true, non-empty strings.
trait Truthy {
    fn truthy(&self) -> bool;
}

macro_rules! truthy_numbers {
    ($($t:ty),*) => {$(
        impl Truthy for $t {
            fn truthy(&self) -> bool {
                *self != <$t as Number>::zero()
            }
        }
    )*};
}

truthy_numbers!(f32, f64, f16, bf16, i8, i16, i32, i64, u8, u16, u32, u64);

impl Truthy for bool {
    fn truthy(&self) -> bool {
        *self
    }
}

impl Truthy for Vec<u8> {
    fn truthy(&self) -> bool {
        !self.is_empty()
    }
}

/// A total order for Unique: numbers by value with every NaN equal and
/// after all numbers (as numpy's `unique`), strings by bytes.
trait Sortable {
    fn order(&self, other: &Self) -> Ordering;
}

macro_rules! sortable_total {
    ($($t:ty),*) => {$(
        impl Sortable for $t {
            fn order(&self, other: &Self) -> Ordering {
                self.cmp(other)
            }
        }
    )*};
}

sortable_total!(i8, i16, i32, i64, u8, u16, u32, u64, bool, Vec<u8>);

macro_rules! sortable_float {
    ($($t:ty),*) => {$(
        impl Sortable for $t {
            fn order(&self, other: &Self) -> Ordering {
                match (self.is_nan(), other.is_nan()) {
                    (true, true) => Ordering::Equal,
                    (true, false) => Ordering::Greater,
                    (false, true) => Ordering::Less,
                    (false, false) => self.partial_cmp(other).unwrap_or(Ordering::Equal),
                }
            }
        }
    )*};
}

sortable_float!(f32, f64, f16, bf16);

// ---------------------------------------------------------------------------
// Selection: Where, Trilu, Compress, NonZero

fn where_(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let cond = match input(cx, i, 0)? {
        Tensor::Bool(c) => c,
        t => return cx.err(format!("the condition must be bool, found {}", t.dtype())),
    };
    let (x, y) = (input(cx, i, 1)?, input(cx, i, 2)?);
    same_dtype(cx, &[x, y], "X and Y")?;
    Ok(vec![moved!(cx, x, |a| where_typed(cx, cond, a, y)?)])
}

fn where_typed<T: Elem>(
    cx: &OpCtx,
    cond: &ArrayD<bool>,
    x: &ArrayD<T>,
    y: &Tensor,
) -> Result<ArrayD<T>, EvalError> {
    let y = like::<T>(cx, y, "Y")?;
    super::typed::zip3(
        cx,
        cond,
        x,
        &y,
        |&c, a, b| if c { a.clone() } else { b.clone() },
    )
}

/// The lower (upper = 0) or upper triangle of the last two axes from
/// diagonal k; zeros elsewhere.
fn trilu(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    if x.shape().len() < 2 {
        return cx.err(format!(
            "the input has rank {}, Trilu needs 2 or more",
            x.shape().len()
        ));
    }
    let k = match i.get(1).copied().flatten() {
        Some(t) => scalar_int(cx, t, "k")?,
        None => 0,
    };
    let upper = cx.int_attr("upper", 1)? != 0;
    Ok(vec![moved!(cx, x, |a| trilu_typed(a, k, upper))])
}

fn trilu_typed<T: Clone + Default>(a: &ArrayD<T>, k: i64, upper: bool) -> ArrayD<T> {
    let r = a.ndim();
    let mut out = a.to_owned();
    for (idx, v) in out.indexed_iter_mut() {
        let offset = idx[r - 1] as i64 - idx[r - 2] as i64;
        let keep = if upper { offset >= k } else { offset <= k };
        if !keep {
            *v = T::default();
        }
    }
    out
}

fn compress(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let cond: Vec<bool> = match input(cx, i, 1)? {
        Tensor::Bool(c) => c.iter().copied().collect(),
        t => return cx.err(format!("the condition must be bool, found {}", t.dtype())),
    };
    let axis = if has_attr(cx, "axis") {
        Some(data_axis(cx, x.shape().len())?)
    } else {
        None
    };
    let len = match axis {
        Some(d) => x.shape()[d],
        None => x.len(),
    };
    // A condition longer than the axis is fine while the extra is false.
    if let Some(k) = cond.iter().skip(len).position(|&c| c) {
        return cx.err(format!(
            "condition {} is true, beyond the {len} elements it selects from",
            len + k
        ));
    }
    let kept: Vec<usize> = (0..len.min(cond.len())).filter(|&k| cond[k]).collect();
    Ok(vec![moved!(cx, x, |a| match axis {
        Some(d) => a.select(Axis(d), &kept),
        None => {
            let data = flat(a);
            array(
                &[kept.len()],
                kept.iter().map(|&k| data[k].clone()).collect(),
            )
        }
    })])
}

/// The indices of the non-zero elements: int64 [rank, count].
fn non_zero(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let hits: Vec<bool> = any_elem!(cx, x, "the input", |a| a
        .iter()
        .map(Truthy::truthy)
        .collect());
    // A scalar counts as a vector of one (as numpy and ONNX Runtime do).
    let shape: Vec<usize> = if x.shape().is_empty() {
        vec![1]
    } else {
        x.shape().to_vec()
    };
    let count = hits.iter().filter(|&&h| h).count();
    let mut out = vec![0i64; shape.len() * count];
    let mut k = 0;
    let mut flat_at = 0;
    each_index(&shape, |idx| {
        if hits[flat_at] {
            for (d, &v) in idx.iter().enumerate() {
                out[d * count + k] = v as i64;
            }
            k += 1;
        }
        flat_at += 1;
        Ok(())
    })?;
    Ok(vec![Tensor::I64(array(&[shape.len(), count], out))])
}

// ---------------------------------------------------------------------------
// Tensors made from shapes: Expand, Tile, Range, EyeLike, OneHot, Size,
// ConstantOfShape, Constant

fn expand(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let dims = dims_of(cx, &ints_of(cx, input(cx, i, 1)?, "shape")?, "shape")?;
    let out_shape = broadcast_shapes(cx, &[x.shape(), &dims])?;
    checked_len(cx, &out_shape)?;
    Ok(vec![
        moved!(cx, x, |a| broadcast_to(cx, a, &out_shape)?.to_owned())
    ])
}

/// Tile: `repeats` per axis (opset 6 on); before, a number of `tiles`
/// along one `axis`, both inputs.
fn tile(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let repeats = if cx.opset >= 6 {
        ints_of(cx, input(cx, i, 1)?, "repeats")?
    } else {
        let tiles = scalar_int(cx, input(cx, i, 1)?, "tiles")?;
        let axis = cx.axis(scalar_int(cx, input(cx, i, 2)?, "axis")?, r)?;
        let mut reps = vec![1; r];
        reps[axis] = tiles;
        reps
    };
    if repeats.len() != r {
        return cx.err(format!(
            "repeats has {} values for an input of rank {r}",
            repeats.len()
        ));
    }
    let repeats = dims_of(cx, &repeats, "repeats")?;
    let out_shape: Vec<usize> = x
        .shape()
        .iter()
        .zip(&repeats)
        .map(|(&d, &k)| d.saturating_mul(k))
        .collect();
    checked_len(cx, &out_shape)?;
    Ok(vec![moved!(cx, x, |a| tile_typed(cx, a, &repeats)?)])
}

fn tile_typed<T: Clone>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    repeats: &[usize],
) -> Result<ArrayD<T>, EvalError> {
    let mut out = a.to_owned();
    for (d, &k) in repeats.iter().enumerate() {
        if k == 1 {
            continue;
        }
        let next = if k == 0 {
            out.slice_axis(Axis(d), Slice::from(0..0)).to_owned()
        } else {
            let views = vec![out.view(); k];
            match qgraph_ir::ndarray::concatenate(Axis(d), &views) {
                Ok(t) => t,
                Err(e) => return cx.err(format!("cannot tile: {e}")),
            }
        };
        out = next;
    }
    Ok(out)
}

/// Range: `start + k * delta` while before `limit`. Integers exactly; f32
/// and f64 in their own type; float16/bfloat16 in f32 (or f64 when
/// `stash_type` says double), as opset 27 specifies.
fn range(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let (start, limit, delta) = (input(cx, i, 0)?, input(cx, i, 1)?, input(cx, i, 2)?);
    same_dtype(cx, &[start, limit, delta], "start, limit and delta")?;
    for (t, what) in [(start, "start"), (limit, "limit"), (delta, "delta")] {
        if t.len() != 1 {
            return cx.err(format!(
                "{what} must be a scalar, found shape {:?}",
                t.shape()
            ));
        }
    }
    let stash_double = cx.int_attr("stash_type", 1)? == 11;
    Ok(vec![numeric!(cx, start, "start", |a| Elem::wrap(
        range_typed(cx, a, limit, delta, stash_double)?
    ))])
}

fn range_typed<T: Number>(
    cx: &OpCtx,
    start: &ArrayD<T>,
    limit: &Tensor,
    delta: &Tensor,
    stash_double: bool,
) -> Result<ArrayD<T>, EvalError> {
    let first = |a: &ArrayD<T>| a.iter().next().copied().unwrap_or_default();
    let s = first(start);
    let l = first(like::<T>(cx, limit, "limit")?.as_ref());
    let d = first(like::<T>(cx, delta, "delta")?.as_ref());
    if d == T::zero() {
        return cx.err("delta is 0");
    }
    let count = |n: f64| -> Result<usize, EvalError> {
        if n.is_nan() || n > MAX_ELEMENTS as f64 {
            return cx.err(format!("a range of {n} elements is too large"));
        }
        Ok(n.max(0.0) as usize)
    };
    let values: Vec<T> = if !T::IS_FLOAT {
        let (s, l, d) = (s.to_i64() as i128, l.to_i64() as i128, d.to_i64() as i128);
        let diff = l - s;
        // Ceiling division of exact integers.
        let n = diff / d + i128::from(diff % d != 0 && (diff < 0) == (d < 0));
        let n = count(n as f64)?;
        (0..n)
            .map(|k| T::from_i64((s + k as i128 * d) as i64))
            .collect()
    } else if T::DTYPE == DataType::F64 || (T::DTYPE != DataType::F32 && stash_double) {
        let (s, l, d) = (s.to_f64(), l.to_f64(), d.to_f64());
        let n = count(((l - s) / d).ceil())?;
        (0..n).map(|k| T::from_f64(s + k as f64 * d)).collect()
    } else {
        let (s, l, d) = (s.to_f64() as f32, l.to_f64() as f32, d.to_f64() as f32);
        let n = count(((l - s) / d).ceil() as f64)?;
        (0..n)
            .map(|k| T::from_f64((s + k as f32 * d) as f64))
            .collect()
    };
    Ok(array(&[values.len()], values))
}

/// A matrix of the input's shape with ones on diagonal k, in `dtype` (the
/// input's type by default).
fn eye_like(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let (rows, cols) = match x.shape() {
        &[r, c] => (r, c),
        // The reference implementation takes a vector as a square matrix.
        &[n] => (n, n),
        s => return cx.err(format!("EyeLike takes a 2-D input, found shape {s:?}")),
    };
    checked_len(cx, &[rows, cols])?;
    let dtype = match cx.int_attr("dtype", -1)? {
        -1 => x.dtype(),
        code => match i32::try_from(code).ok().and_then(DataType::from_onnx_code) {
            Some(t) => t,
            None => return cx.err(format!("dtype {code} is not an ONNX type")),
        },
    };
    let k = cx.int_attr("k", 0)?;
    fn eye<T: Clone>(rows: usize, cols: usize, k: i64, zero: T, one: T) -> ArrayD<T> {
        let mut m = ArrayD::from_elem(IxDyn(&[rows, cols]), zero);
        for r in 0..rows {
            let c = (r as i64).saturating_add(k);
            if (0..cols as i64).contains(&c) {
                m[[r, c as usize]] = one.clone();
            }
        }
        m
    }
    macro_rules! eye_of {
        ($($v:ident: $t:ty),*) => {
            match dtype {
                $(DataType::$v => Tensor::$v(eye(rows, cols, k, <$t as Number>::zero(), <$t as Number>::one())),)*
                DataType::Bool => Tensor::Bool(eye(rows, cols, k, false, true)),
                t => return cx.err(format!("EyeLike does not make {t} tensors")),
            }
        };
    }
    Ok(vec![eye_of!(
        F32: f32, F64: f64, F16: f16, BF16: bf16, I8: i8, I16: i16, I32: i32, I64: i64,
        U8: u8, U16: u16, U32: u32, U64: u64
    )])
}

/// OneHot: a new axis of `depth` holding `on` where it equals the index,
/// `off` elsewhere; negative indices count from the end (opset 11), indices
/// out of range select nothing.
fn one_hot(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let indices_t = input(cx, i, 0)?;
    let indices = numbers_as_i64(cx, indices_t, "indices")?;
    let depth_t = input(cx, i, 1)?;
    let depth = match numbers_as_i64(cx, depth_t, "depth")?.as_slice() {
        [d] => *d,
        d => return cx.err(format!("depth must hold one value, found {}", d.len())),
    };
    if depth < 0 {
        return cx.err(format!("depth {depth} is negative"));
    }
    let values = input(cx, i, 2)?;
    if values.len() != 2 {
        return cx.err(format!(
            "values must hold [off, on], found {} values",
            values.len()
        ));
    }
    let r = indices_t.shape().len();
    let axis = cx.axis(cx.int_attr("axis", -1)?, r + 1)?;
    let depth_n = depth as usize;
    let mut out_shape = indices_t.shape().to_vec();
    out_shape.insert(axis, depth_n);
    checked_len(cx, &out_shape)?;
    let inner: usize = indices_t.shape()[axis..].iter().product();
    // Where `on` goes: one position per index in range.
    let mut on_at = Vec::with_capacity(indices.len());
    for (k, &v) in indices.iter().enumerate() {
        let v = if v < 0 { v + depth } else { v };
        if (0..depth).contains(&v) {
            let (o, n) = (k / inner.max(1), k % inner.max(1));
            on_at.push((o * depth_n + v as usize) * inner + n);
        }
    }
    Ok(vec![moved!(cx, values, |a| {
        let data = flat(a);
        let mut out = ArrayD::from_elem(IxDyn(&out_shape), data[0].clone());
        if let Some(s) = out.as_slice_mut() {
            for &p in &on_at {
                s[p] = data[1].clone();
            }
        }
        out
    })])
}

fn size(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    Ok(vec![Tensor::I64(array(&[], vec![x.len() as i64]))])
}

fn constant_of_shape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let dims = dims_of(cx, &ints_of(cx, input(cx, i, 0)?, "shape")?, "shape")?;
    Ok(vec![match cx.tensor_attr("value")? {
        None => Tensor::F32(ArrayD::zeros(IxDyn(&dims))),
        Some(v) => {
            if v.len() != 1 {
                return cx.err(format!("value must hold one element, found {}", v.len()));
            }
            moved!(cx, v, |a| ArrayD::from_elem(
                IxDyn(&dims),
                flat(a)[0].clone()
            ))
        }
    }])
}

/// Constant: the one value attribute the node sets.
fn constant(cx: &OpCtx, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let node = cx.graph.node(cx.node);
    for a in &node.attrs {
        let t = match (a.name.as_str(), &a.value) {
            ("value", AttrValue::Tensor(t)) => {
                if t.is_elided() {
                    return cx.err("the constant's data was elided in the text form it came from");
                }
                t.clone()
            }
            ("value_float", AttrValue::Float(f)) => Tensor::scalar_f32(*f),
            ("value_floats", AttrValue::Floats(f)) => Tensor::F32(array(&[f.len()], f.clone())),
            ("value_int", AttrValue::Int(v)) => Tensor::I64(array(&[], vec![*v])),
            ("value_ints", AttrValue::Ints(v)) => Tensor::i64_vector(v.clone()),
            ("value_string", AttrValue::String(s)) => Tensor::String(array(&[], vec![s.clone()])),
            ("value_strings", AttrValue::Strings(s)) => {
                Tensor::String(array(&[s.len()], s.clone()))
            }
            ("sparse_value", _) => return cx.err("sparse_value constants are not supported"),
            _ => continue,
        };
        return Ok(vec![t]);
    }
    cx.err("Constant sets none of value, value_float(s), value_int(s), value_string(s)")
}

// ---------------------------------------------------------------------------
// Gathers

fn gather(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let indices_t = input(cx, i, 1)?;
    let r = x.shape().len();
    if r == 0 {
        return cx.err("Gather needs data of rank 1 or more");
    }
    let axis = cx.axis(cx.int_attr("axis", 0)?, r)?;
    let dim = x.shape()[axis];
    let picked: Vec<usize> = ints_of(cx, indices_t, "indices")?
        .into_iter()
        .map(|v| resolve(cx, v, dim, "index"))
        .collect::<Result<_, _>>()?;
    let mut out_shape = x.shape()[..axis].to_vec();
    out_shape.extend_from_slice(indices_t.shape());
    out_shape.extend_from_slice(&x.shape()[axis + 1..]);
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let mut starts = Vec::with_capacity(outer * picked.len());
    for o in 0..outer {
        starts.extend(picked.iter().map(|&k| (o * dim + k) * inner));
    }
    Ok(vec![moved!(cx, x, |a| copy_runs(
        a, &starts, inner, &out_shape
    ))])
}

/// The data offsets of an element-wise indexing (GatherElements,
/// ScatterElements): for each position of `index_shape`, the position with
/// its `axis` coordinate replaced by the index there.
fn element_offsets(
    cx: &OpCtx,
    data_shape: &[usize],
    index_shape: &[usize],
    indices: &[i64],
    axis: usize,
) -> Result<Vec<usize>, EvalError> {
    if index_shape.len() != data_shape.len() {
        return cx.err(format!(
            "indices have rank {}, the data rank {}",
            index_shape.len(),
            data_shape.len()
        ));
    }
    if let Some(d) = (0..data_shape.len()).find(|&d| d != axis && index_shape[d] > data_shape[d]) {
        return cx.err(format!(
            "indices shape {index_shape:?} exceeds the data shape {data_shape:?} on axis {d}"
        ));
    }
    let st = strides(data_shape);
    let mut offsets = Vec::with_capacity(indices.len());
    let mut k = 0;
    each_index(index_shape, |idx| {
        let mut o = 0;
        for (d, &c) in idx.iter().enumerate() {
            let c = if d == axis {
                resolve(cx, indices[k], data_shape[d], "index")?
            } else {
                c
            };
            o += c * st[d];
        }
        offsets.push(o);
        k += 1;
        Ok(())
    })?;
    Ok(offsets)
}

fn gather_elements(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let indices_t = input(cx, i, 1)?;
    let axis = data_axis(cx, x.shape().len())?;
    let indices = ints_of(cx, indices_t, "indices")?;
    let offsets = element_offsets(cx, x.shape(), indices_t.shape(), &indices, axis)?;
    let shape = indices_t.shape().to_vec();
    Ok(vec![moved!(cx, x, |a| pick(a, &offsets, &shape))])
}

/// The tuples of an ND indexing (GatherND, ScatterND): `indices` of shape
/// [batch..., n..., m] address slices of `data_shape`, after `batch_dims`
/// leading axes both share. Returns the start offset of each addressed
/// slice and the slice's length.
fn nd_offsets(
    cx: &OpCtx,
    data_shape: &[usize],
    index_shape: &[usize],
    indices: &[i64],
    batch_dims: usize,
) -> Result<(Vec<usize>, usize), EvalError> {
    let (r, q) = (data_shape.len(), index_shape.len());
    let Some(&m) = index_shape.last() else {
        return cx.err("indices must have rank 1 or more");
    };
    if batch_dims >= q || batch_dims + m > r {
        return cx.err(format!(
            "indices of shape {index_shape:?} (batch_dims {batch_dims}) do not index data of shape {data_shape:?}"
        ));
    }
    if data_shape[..batch_dims] != index_shape[..batch_dims] {
        return cx.err(format!(
            "the batch dims of data {data_shape:?} and indices {index_shape:?} differ"
        ));
    }
    let st = strides(data_shape);
    let slice_len: usize = data_shape[batch_dims + m..].iter().product();
    let batch_size: usize = data_shape[batch_dims..].iter().product();
    let per_batch: usize = index_shape[batch_dims..q - 1].iter().product();
    let tuples: usize = index_shape[..q - 1].iter().product();
    let mut starts = Vec::with_capacity(tuples);
    for t in 0..tuples {
        let batch = if per_batch == 0 { 0 } else { t / per_batch };
        let mut o = batch * batch_size;
        for j in 0..m {
            let d = batch_dims + j;
            o += resolve(cx, indices[t * m + j], data_shape[d], "index")? * st[d];
        }
        starts.push(o);
    }
    Ok((starts, slice_len))
}

fn gather_nd(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let indices_t = input(cx, i, 1)?;
    let batch_dims = cx.int_attr("batch_dims", 0)?;
    if batch_dims < 0 {
        return cx.err(format!("batch_dims {batch_dims} is negative"));
    }
    let indices = ints_of(cx, indices_t, "indices")?;
    let (starts, len) = nd_offsets(
        cx,
        x.shape(),
        indices_t.shape(),
        &indices,
        batch_dims as usize,
    )?;
    let q = indices_t.shape().len();
    let m = indices_t.shape()[q - 1];
    let mut out_shape = indices_t.shape()[..q - 1].to_vec();
    out_shape.extend_from_slice(&x.shape()[batch_dims as usize + m..]);
    Ok(vec![moved!(cx, x, |a| copy_runs(
        a, &starts, len, &out_shape
    ))])
}

// ---------------------------------------------------------------------------
// Scatters

/// A copy of `data` with the runs of `len` elements at each of `starts`
/// combined with the updates, laid end to end in `updates`: replaced
/// (reduction "none", any type) or reduced with add/mul/max/min (numbers).
/// Duplicate targets apply in order.
fn scatter_runs(
    cx: &OpCtx,
    data: &Tensor,
    updates: &Tensor,
    starts: &[usize],
    len: usize,
    reduction: &str,
) -> Result<Tensor, EvalError> {
    same_dtype(cx, &[data, updates], "data and updates")?;
    if updates.len() != starts.len() * len {
        return cx.err(format!(
            "updates have {} elements, the indices address {}",
            updates.len(),
            starts.len() * len
        ));
    }
    Ok(match reduction {
        "none" => moved!(cx, data, |a| scatter_typed(
            cx,
            a,
            updates,
            starts,
            len,
            |_, u| u.clone()
        )?),
        "add" | "mul" | "max" | "min" => numeric!(cx, data, "data", |a| Elem::wrap(
            scatter_reduce(cx, a, updates, starts, len, reduction)?
        )),
        other => {
            return cx.err(format!(
                "reduction '{other}' is not one of none, add, mul, max, min"
            ))
        }
    })
}

fn scatter_reduce<T: Number>(
    cx: &OpCtx,
    data: &ArrayD<T>,
    updates: &Tensor,
    starts: &[usize],
    len: usize,
    reduction: &str,
) -> Result<ArrayD<T>, EvalError> {
    let f: fn(T, T) -> T = match reduction {
        "add" => T::add,
        "mul" => T::mul,
        "max" => T::max_of,
        _ => T::min_of,
    };
    scatter_typed(cx, data, updates, starts, len, |x, u| f(*x, *u))
}

fn scatter_typed<T: Elem>(
    cx: &OpCtx,
    data: &ArrayD<T>,
    updates: &Tensor,
    starts: &[usize],
    len: usize,
    combine: impl Fn(&T, &T) -> T,
) -> Result<ArrayD<T>, EvalError> {
    let updates = like::<T>(cx, updates, "updates")?;
    let updates = flat(&updates);
    let mut out = flat(data).into_owned();
    for (k, &s) in starts.iter().enumerate() {
        for e in 0..len {
            out[s + e] = combine(&out[s + e], &updates[k * len + e]);
        }
    }
    Ok(array(data.shape(), out))
}

/// The reduction of ScatterND/ScatterElements: an attribute from opset 16.
fn reduction_of(cx: &OpCtx) -> Result<String, EvalError> {
    if cx.opset >= 16 {
        cx.string_attr("reduction", "none")
    } else {
        Ok("none".into())
    }
}

fn scatter_nd(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let indices_t = input(cx, i, 1)?;
    let updates = input(cx, i, 2)?;
    let indices = ints_of(cx, indices_t, "indices")?;
    let (starts, len) = nd_offsets(cx, x.shape(), indices_t.shape(), &indices, 0)?;
    let q = indices_t.shape().len();
    let mut expected = indices_t.shape()[..q - 1].to_vec();
    expected.extend_from_slice(&x.shape()[indices_t.shape()[q - 1]..]);
    if updates.shape() != expected.as_slice() {
        return cx.err(format!(
            "updates have shape {:?}, the indices address {expected:?}",
            updates.shape()
        ));
    }
    Ok(vec![scatter_runs(
        cx,
        x,
        updates,
        &starts,
        len,
        &reduction_of(cx)?,
    )?])
}

/// ScatterElements, and Scatter (its deprecated name, without reduction).
fn scatter_elements(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let indices_t = input(cx, i, 1)?;
    let updates = input(cx, i, 2)?;
    if updates.shape() != indices_t.shape() {
        return cx.err(format!(
            "updates have shape {:?}, the indices {:?}",
            updates.shape(),
            indices_t.shape()
        ));
    }
    let axis = data_axis(cx, x.shape().len())?;
    let indices = ints_of(cx, indices_t, "indices")?;
    let offsets = element_offsets(cx, x.shape(), indices_t.shape(), &indices, axis)?;
    let reduction = if cx.graph.node(cx.node).op_type == "Scatter" {
        "none".to_string()
    } else {
        reduction_of(cx)?
    };
    Ok(vec![scatter_runs(cx, x, updates, &offsets, 1, &reduction)?])
}

/// TensorScatter (opset 24): writes `update` into a cache along `axis`
/// from each batch's write index; `circular` wraps around the cache.
fn tensor_scatter(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let cache = input(cx, i, 0)?;
    let update = input(cx, i, 1)?;
    let shape = cache.shape();
    let r = shape.len();
    let axis = cx.axis(cx.int_attr("axis", -2)?, r)?;
    if axis == 0 {
        return cx.err("axis 0 is the batch axis; TensorScatter writes along another");
    }
    let mode = cx.string_attr("mode", "linear")?;
    if !matches!(mode.as_str(), "linear" | "circular") {
        return cx.err(format!("mode '{mode}' is not linear or circular"));
    }
    let ushape = update.shape();
    if ushape.len() != r
        || (0..r).any(|d| {
            if d == axis {
                ushape[d] > shape[d]
            } else {
                ushape[d] != shape[d]
            }
        })
    {
        return cx.err(format!(
            "update of shape {ushape:?} does not fit the cache of shape {shape:?} along axis {axis}"
        ));
    }
    let batch = shape[0];
    let write: Vec<i64> = match i.get(2).copied().flatten() {
        Some(t) => ints_of(cx, t, "write_indices")?,
        None => vec![0; batch],
    };
    if write.len() != batch {
        return cx.err(format!(
            "write_indices has {} values for a batch of {batch}",
            write.len()
        ));
    }
    let (max_len, seq_len) = (shape[axis], ushape[axis]);
    let prefix: usize = shape[..axis].iter().product();
    let per_batch = prefix / batch.max(1);
    let inner: usize = shape[axis + 1..].iter().product();
    let mut starts = Vec::with_capacity(prefix * seq_len);
    for p in 0..prefix {
        let w = write[p / per_batch.max(1)];
        for s in 0..seq_len {
            let at = w + s as i64;
            let at = if mode == "circular" && max_len > 0 {
                at.rem_euclid(max_len as i64)
            } else {
                at
            };
            if at < 0 || at >= max_len as i64 {
                return cx.err(format!(
                    "write index {w} (+{s}) is out of range for a cache of {max_len}"
                ));
            }
            starts.push((p * max_len + at as usize) * inner);
        }
    }
    Ok(vec![scatter_runs(
        cx, cache, update, &starts, inner, "none",
    )?])
}

// ---------------------------------------------------------------------------
// Unique

/// Unique: the distinct elements (or slices along `axis`), sorted or in
/// order of first occurrence, with the first index of each, the inverse
/// (each element's position among them) and the counts.
fn unique(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let axis = if has_attr(cx, "axis") {
        Some(data_axis(cx, x.shape().len())?)
    } else {
        None
    };
    let sorted = cx.int_attr("sorted", 1)? != 0;
    let found;
    let y = any_elem!(cx, x, "the input", |a| {
        let (y, groups) = unique_typed(a, axis, sorted);
        found = groups;
        Elem::wrap(y)
    });
    let Groups {
        first,
        inverse,
        counts,
    } = found;
    let vector = |v: Vec<i64>| Tensor::I64(array(&[v.len()], v));
    Ok(vec![y, vector(first), vector(inverse), vector(counts)])
}

struct Groups {
    first: Vec<i64>,
    inverse: Vec<i64>,
    counts: Vec<i64>,
}

fn unique_typed<T: Clone + Sortable>(
    a: &ArrayD<T>,
    axis: Option<usize>,
    sorted: bool,
) -> (ArrayD<T>, Groups) {
    // Items: the elements, or the slices along the axis (each in
    // row-major order), compared lexicographically.
    let (items, n, width) = match axis {
        None => (flat(a).into_owned(), a.len(), 1),
        Some(d) => {
            let n = a.shape()[d];
            // The axis first, the others in their order.
            let mut perm: Vec<usize> = (0..a.ndim()).collect();
            perm.remove(d);
            perm.insert(0, d);
            let items: Vec<T> = a
                .view()
                .permuted_axes(IxDyn(&perm))
                .iter()
                .cloned()
                .collect();
            let width = if n == 0 { 0 } else { items.len() / n };
            (items, n, width)
        }
    };
    let item = |k: usize| &items[k * width..(k + 1) * width];
    let compare = |p: usize, q: usize| {
        item(p)
            .iter()
            .zip(item(q))
            .map(|(x, y)| x.order(y))
            .find(|o| *o != Ordering::Equal)
            .unwrap_or(Ordering::Equal)
    };
    let mut order: Vec<usize> = (0..n).collect();
    // Stable: equal items keep their order, so a group's first is its
    // first occurrence.
    order.sort_by(|&p, &q| compare(p, q));
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for &k in &order {
        match groups.last_mut() {
            Some((first, members)) if compare(*first, k) == Ordering::Equal => members.push(k),
            _ => groups.push((k, vec![k])),
        }
    }
    if !sorted {
        groups.sort_by_key(|(first, _)| *first);
    }
    let mut inverse = vec![0i64; n];
    for (g, (_, members)) in groups.iter().enumerate() {
        for &k in members {
            inverse[k] = g as i64;
        }
    }
    let firsts: Vec<usize> = groups.iter().map(|(f, _)| *f).collect();
    let y = match axis {
        None => array(
            &[firsts.len()],
            firsts.iter().map(|&k| items[k].clone()).collect(),
        ),
        Some(d) => a.select(Axis(d), &firsts),
    };
    let groups = Groups {
        first: firsts.iter().map(|&k| k as i64).collect(),
        inverse,
        counts: groups.iter().map(|(_, m)| m.len() as i64).collect(),
    };
    (y, groups)
}

// ---------------------------------------------------------------------------
// Rearranging: ReverseSequence, DepthToSpace, SpaceToDepth, CenterCropPad

fn reverse_sequence(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let shape = x.shape().to_vec();
    if shape.len() < 2 {
        return cx.err(format!(
            "the input has rank {}, ReverseSequence needs 2 or more",
            shape.len()
        ));
    }
    let batch_axis = cx.axis(cx.int_attr("batch_axis", 1)?, shape.len())?;
    let time_axis = cx.axis(cx.int_attr("time_axis", 0)?, shape.len())?;
    if batch_axis > 1 || time_axis > 1 || batch_axis == time_axis {
        return cx.err(format!(
            "batch_axis {batch_axis} and time_axis {time_axis} must be 0 and 1"
        ));
    }
    let lens = ints_of(cx, input(cx, i, 1)?, "sequence_lens")?;
    if lens.len() != shape[batch_axis] {
        return cx.err(format!(
            "sequence_lens has {} values for a batch of {}",
            lens.len(),
            shape[batch_axis]
        ));
    }
    if let Some(l) = lens.iter().find(|&&l| l < 0 || l > shape[time_axis] as i64) {
        return cx.err(format!(
            "sequence length {l} is out of range for a time axis of {}",
            shape[time_axis]
        ));
    }
    let st = strides(&shape);
    let mut offsets = Vec::with_capacity(x.len());
    each_index(&shape, |idx| {
        let (b, t) = (idx[batch_axis], idx[time_axis]);
        let len = lens[b] as usize;
        let from = if t < len { len - 1 - t } else { t };
        let o: usize = idx.iter().zip(&st).map(|(&c, &s)| c * s).sum();
        offsets.push(o - t * st[time_axis] + from * st[time_axis]);
        Ok(())
    })?;
    Ok(vec![moved!(cx, x, |a| pick(a, &offsets, &shape))])
}

/// Reshapes to `split`, permutes the axes, reshapes to `joined`: the
/// regrouping of DepthToSpace and SpaceToDepth (shapes checked by the
/// caller).
fn regroup<T: Clone>(
    a: &ArrayD<T>,
    split: &[usize],
    perm: &[usize],
    joined: &[usize],
) -> ArrayD<T> {
    let data = flat(a).into_owned();
    let grouped = array(split, data).permuted_axes(IxDyn(perm));
    array(joined, grouped.iter().cloned().collect())
}

fn block_size(cx: &OpCtx, x: &Tensor) -> Result<(usize, [usize; 4]), EvalError> {
    let &[n, c, h, w] = x.shape() else {
        return cx.err(format!(
            "the input must be 4-D (NCHW), found {:?}",
            x.shape()
        ));
    };
    let b = cx.int_attr("blocksize", 0)?;
    if b <= 0 {
        return cx.err(format!("blocksize {b} must be positive"));
    }
    let b = b as usize;
    // Both regroupings hold blocks of b * b channels.
    if b.checked_mul(b).and_then(|bb| bb.checked_mul(c)).is_none() {
        return cx.err(format!("blocksize {b} is too large"));
    }
    Ok((b, [n, c, h, w]))
}

fn depth_to_space(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let (b, [n, c, h, w]) = block_size(cx, x)?;
    let (Some(hb), Some(wb)) = (h.checked_mul(b), w.checked_mul(b)) else {
        return cx.err(format!("blocksize {b} is too large"));
    };
    if c % (b * b) != 0 {
        return cx.err(format!("{c} channels do not divide into blocks of {b}x{b}"));
    }
    let mode = cx.string_attr("mode", "DCR")?;
    let (split, perm) = match mode.as_str() {
        "DCR" => ([n, b, b, c / (b * b), h, w], [0, 3, 4, 1, 5, 2]),
        "CRD" => ([n, c / (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]),
        m => return cx.err(format!("mode '{m}' is not DCR or CRD")),
    };
    let joined = [n, c / (b * b), hb, wb];
    Ok(vec![moved!(cx, x, |a| regroup(a, &split, &perm, &joined))])
}

fn space_to_depth(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let (b, [n, c, h, w]) = block_size(cx, x)?;
    if h % b != 0 || w % b != 0 {
        return cx.err(format!("{h}x{w} does not divide into blocks of {b}x{b}"));
    }
    let split = [n, c, h / b, b, w / b, b];
    let perm = match cx.string_attr("mode", "DCR")?.as_str() {
        "DCR" => [0, 3, 5, 1, 2, 4],
        "CRD" => [0, 1, 3, 5, 2, 4],
        m => return cx.err(format!("mode '{m}' is not DCR or CRD")),
    };
    let joined = [n, c * b * b, h / b, w / b];
    Ok(vec![moved!(cx, x, |a| regroup(a, &split, &perm, &joined))])
}

/// Per output coordinate of one axis, the input coordinate it copies, or
/// `None` for the fill value: the maps Pad and CenterCropPad are made of.
type AxisMap = Vec<Option<usize>>;

/// The row-major offsets of an output built from one map per axis.
fn mapped_offsets(maps: &[AxisMap], in_shape: &[usize]) -> Vec<Option<usize>> {
    let st = strides(in_shape);
    let out_shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    let mut offsets = Vec::with_capacity(out_shape.iter().product());
    let _ = each_index(&out_shape, |idx| {
        let mut o = Some(0);
        for (d, &c) in idx.iter().enumerate() {
            o = match (o, maps[d][c]) {
                (Some(o), Some(at)) => Some(o + at * st[d]),
                _ => None,
            };
        }
        offsets.push(o);
        Ok(())
    });
    offsets
}

fn center_crop_pad(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let sizes = dims_of(cx, &ints_of(cx, input(cx, i, 1)?, "shape")?, "shape")?;
    let axes: Vec<usize> = match cx.ints_attr("axes")? {
        Some(a) => a.iter().map(|&v| cx.axis(v, r)).collect::<Result<_, _>>()?,
        None => (0..r).collect(),
    };
    if sizes.len() != axes.len() {
        return cx.err(format!(
            "shape has {} values for {} axes",
            sizes.len(),
            axes.len()
        ));
    }
    let mut maps: Vec<AxisMap> = x
        .shape()
        .iter()
        .map(|&n| (0..n).map(Some).collect())
        .collect();
    for (&d, &want) in axes.iter().zip(&sizes) {
        let n = x.shape()[d];
        // Crop or pad centred; an odd difference puts the extra at the end.
        maps[d] = if want <= n {
            let start = (n - want) / 2;
            (start..start + want).map(Some).collect()
        } else {
            let before = (want - n) / 2;
            (0..want)
                .map(|o| o.checked_sub(before).filter(|&p| p < n))
                .collect()
        };
    }
    let out_shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    checked_len(cx, &out_shape)?;
    let offsets = mapped_offsets(&maps, x.shape());
    Ok(vec![moved!(cx, x, |a| pick_or(
        a,
        &offsets,
        &out_shape,
        &Default::default()
    ))])
}

// ---------------------------------------------------------------------------
// Pad

/// Pad, every version: pads (`paddings` in opset 1) and the constant value
/// are attributes before opset 11 and inputs after; `axes` is an input from
/// 18; modes constant, reflect, edge, and wrap (19). Negative pads crop
/// first; the other pads then extend what is left.
fn pad(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let pads = if cx.opset >= 11 {
        ints_of(cx, input(cx, i, 1)?, "pads")?
    } else {
        let name = if cx.opset < 2 { "paddings" } else { "pads" };
        cx.ints_attr(name)?.unwrap_or_default()
    };
    let axes: Vec<usize> = match i.get(3).copied().flatten() {
        Some(t) if cx.opset >= 18 => ints_of(cx, t, "axes")?
            .iter()
            .map(|&a| cx.axis(a, r))
            .collect::<Result<_, _>>()?,
        _ => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return cx.err(format!(
            "pads has {} values for {} axes",
            pads.len(),
            axes.len()
        ));
    }
    let mut before = vec![0i64; r];
    let mut after = vec![0i64; r];
    for (k, &d) in axes.iter().enumerate() {
        before[d] = pads[k];
        after[d] = pads[k + axes.len()];
    }
    let mode = cx.string_attr("mode", "constant")?;
    if !matches!(mode.as_str(), "constant" | "reflect" | "edge" | "wrap") {
        return cx.err(format!(
            "pad mode '{mode}' is not constant, reflect, edge or wrap"
        ));
    }
    // The constant: an input of the data's type from opset 11, a float
    // attribute before.
    let value_attr;
    let value: Option<&Tensor> = if cx.opset >= 11 {
        i.get(2).copied().flatten()
    } else {
        let v = cx.float_attr("value", 0.0)?;
        value_attr = numeric!(cx, x, "the data", |a| scalar_like(a, v));
        Some(&value_attr)
    };
    if let Some(v) = value {
        same_dtype(cx, &[x, v], "the data and the constant value")?;
    }
    let mut maps: Vec<AxisMap> = Vec::with_capacity(r);
    for d in 0..r {
        let n = x.shape()[d] as i64;
        let lo = before[d].saturating_neg().max(0);
        let hi = n.saturating_sub(after[d].saturating_neg().max(0));
        let kept = hi - lo;
        if kept < 0 {
            return cx.err(format!("pads crop more than axis {d} of {n} has"));
        }
        let (pb, pa) = (before[d].max(0), after[d].max(0));
        let len = kept.saturating_add(pb).saturating_add(pa);
        if len > MAX_ELEMENTS as i64 {
            return cx.err(format!("pads make axis {d} {len} long"));
        }
        if kept == 0 && (pb > 0 || pa > 0) && mode != "constant" {
            return cx.err(format!("{mode} padding of axis {d}, which is empty"));
        }
        maps.push(
            (0..len)
                .map(|o| {
                    let p = o - pb;
                    let at = if (0..kept).contains(&p) {
                        p
                    } else {
                        match mode.as_str() {
                            "edge" => p.clamp(0, kept - 1),
                            "wrap" => p.rem_euclid(kept),
                            "reflect" if kept == 1 => 0,
                            "reflect" => {
                                let period = 2 * (kept - 1);
                                let m = p.rem_euclid(period);
                                if m < kept {
                                    m
                                } else {
                                    period - m
                                }
                            }
                            _ => return None,
                        }
                    };
                    Some((lo + at) as usize)
                })
                .collect(),
        );
    }
    let out_shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    checked_len(cx, &out_shape)?;
    let simple = mode == "constant" && before.iter().chain(&after).all(|&p| p >= 0);
    Ok(vec![moved!(cx, x, |a| pad_typed(
        cx, a, value, &maps, &before, simple
    )?)])
}

fn scalar_like<T: Number>(_: &ArrayD<T>, v: f32) -> Tensor {
    T::wrap(array(&[], vec![convert::<f32, T>(v)]))
}

fn pad_typed<T: Elem + Default>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    value: Option<&Tensor>,
    maps: &[AxisMap],
    before: &[i64],
    simple: bool,
) -> Result<ArrayD<T>, EvalError> {
    let fill = match value {
        Some(v) => like::<T>(cx, v, "the constant value")?
            .iter()
            .next()
            .cloned()
            .unwrap_or_default(),
        None => T::default(),
    };
    let out_shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    if simple {
        // Fill, then copy the input block.
        let mut out = ArrayD::from_elem(IxDyn(&out_shape), fill);
        let region: Vec<SliceInfoElem> = (0..a.ndim())
            .map(|d| SliceInfoElem::Slice {
                start: before[d] as isize,
                end: Some(before[d] as isize + a.shape()[d] as isize),
                step: 1,
            })
            .collect();
        out.slice_mut(region.as_slice()).assign(a);
        return Ok(out);
    }
    Ok(pick_or(
        a,
        &mapped_offsets(maps, a.shape()),
        &out_shape,
        &fill,
    ))
}

// ---------------------------------------------------------------------------
// Reshaping and rearranging (the older kernels of shape.rs, on any type)

/// Reshape; the shape is an attribute in opset 1-4, an input from 5.
fn reshape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    if cx.opset >= 5 {
        return via_codes(cx, i, shape::reshape);
    }
    let Some(dims) = cx.ints_attr("shape")? else {
        return cx.err("Reshape before opset 5 needs the shape attribute");
    };
    let dims = Tensor::i64_vector(dims);
    via_codes(
        cx,
        &[i.first().copied().flatten(), Some(&dims)],
        shape::reshape,
    )
}

fn flatten(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    via_codes(cx, i, shape::flatten)
}

fn squeeze(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    via_codes(cx, i, shape::squeeze)
}

fn unsqueeze(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    via_codes(cx, i, shape::unsqueeze)
}

fn transpose(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    via_codes(cx, i, shape::transpose)
}

/// Slice: starts/ends/axes/steps attributes before opset 10, inputs from.
/// Clamping as the spec (and ONNX Runtime) does: for a negative step the
/// start is clamped to [0, dim - 1] (`shape.rs`'s selection, which its
/// backward kernel uses, clamps it to -1 and so keeps nothing there).
fn slice(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let (starts, ends, axes, steps) = if cx.opset >= 10 {
        let optional = |k: usize, what: &str| {
            i.get(k)
                .copied()
                .flatten()
                .map(|t| ints_of(cx, t, what))
                .transpose()
        };
        (
            ints_of(cx, input(cx, i, 1)?, "starts")?,
            ints_of(cx, input(cx, i, 2)?, "ends")?,
            optional(3, "axes")?,
            optional(4, "steps")?,
        )
    } else {
        (
            cx.ints_attr("starts")?.unwrap_or_default(),
            cx.ints_attr("ends")?.unwrap_or_default(),
            cx.ints_attr("axes")?,
            None,
        )
    };
    let n = starts.len();
    let axes = axes.unwrap_or_else(|| (0..n as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return cx.err(format!(
            "starts, ends, axes and steps have {n}, {}, {} and {} values",
            ends.len(),
            axes.len(),
            steps.len()
        ));
    }
    let r = x.shape().len();
    let mut seen = vec![false; r];
    let mut selection = Vec::with_capacity(n);
    for k in 0..n {
        let axis = cx.axis(axes[k], r)?;
        if std::mem::replace(&mut seen[axis], true) {
            return cx.err(format!("axes {axes:?} name axis {axis} twice"));
        }
        let dim = x.shape()[axis] as i64;
        let step = steps[k];
        if step == 0 {
            return cx.err("a step is 0");
        }
        let norm = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let picked: Vec<usize> = if dim == 0 {
            Vec::new()
        } else if step > 0 {
            let (s, e) = (norm(starts[k]).clamp(0, dim), norm(ends[k]).clamp(0, dim));
            (s..e).step_by(step as usize).map(|v| v as usize).collect()
        } else {
            let s = norm(starts[k]).clamp(0, dim - 1);
            let e = norm(ends[k]).clamp(-1, dim - 1);
            let mut v = Vec::new();
            let mut p = s;
            while p > e {
                v.push(p as usize);
                p = p.saturating_add(step);
            }
            v
        };
        selection.push((axis, picked));
    }
    let mut result = x.clone();
    for (axis, picked) in selection {
        result = moved!(cx, &result, |a| a.select(Axis(axis), &picked));
    }
    Ok(vec![result])
}

/// Concat of any type; `axis` defaults to 1 in opset 1.
fn concat(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let parts: Vec<&Tensor> = i.iter().flatten().copied().collect();
    let Some(&first) = parts.first() else {
        return cx.err("Concat needs inputs");
    };
    same_dtype(cx, &parts, "the inputs")?;
    let r = first.shape().len();
    if r == 0 {
        return cx.err("Concat cannot join scalars");
    }
    if let Some(p) = parts.iter().find(|p| p.shape().len() != r) {
        return cx.err(format!(
            "inputs of rank {r} and {} cannot be joined",
            p.shape().len()
        ));
    }
    let axis = cx.int_attr("axis", if cx.opset < 4 { 1 } else { 0 })?;
    let axis = cx.axis(axis, r)?;
    Ok(vec![moved!(cx, first, |a| concat_typed(
        cx, a, &parts, axis
    )?)])
}

fn concat_typed<T: Elem>(
    cx: &OpCtx,
    _first: &ArrayD<T>,
    parts: &[&Tensor],
    axis: usize,
) -> Result<ArrayD<T>, EvalError> {
    let arrays = parts
        .iter()
        .map(|p| like::<T>(cx, p, "an input"))
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
    match qgraph_ir::ndarray::concatenate(Axis(axis), &views) {
        Ok(a) => Ok(a),
        Err(e) => cx.err(format!(
            "cannot join shapes {}: {e}",
            parts
                .iter()
                .map(|p| format!("{:?}", p.shape()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Split, every version: `split` is an optional input in opset 1, an
/// attribute in 2-12, an input from 13; without it, the outputs share the
/// axis equally, and from 18 `num_outputs` parts of ceil(len / n), the
/// last one shorter.
fn split(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let axis = data_axis(cx, r)?;
    let len = x.shape()[axis];
    let outputs = cx.graph.node(cx.node).outputs().len();
    let given = match (cx.opset, i.get(1).copied().flatten()) {
        (o, Some(t)) if o >= 13 || o < 2 => Some(ints_of(cx, t, "split")?),
        (o, _) if o >= 13 => None,
        _ => cx.ints_attr("split")?,
    };
    let sizes: Vec<usize> = match given {
        Some(s) => {
            if let Some(v) = s.iter().find(|&&v| v < 0) {
                return cx.err(format!("split {s:?} has a negative size {v}"));
            }
            s.iter().map(|&v| v as usize).collect()
        }
        None => {
            let parts = if cx.opset >= 18 && has_attr(cx, "num_outputs") {
                cx.int_attr("num_outputs", outputs as i64)?
            } else {
                outputs as i64
            };
            if parts < 1 {
                return cx.err(format!("cannot split into {parts} parts"));
            }
            let parts = parts as usize;
            let each = len.div_ceil(parts);
            (0..parts)
                .map(|k| each.min(len.saturating_sub(k * each)))
                .collect()
        }
    };
    if sizes.iter().sum::<usize>() != len {
        return cx.err(format!("split sizes {sizes:?} do not add up to {len}"));
    }
    if sizes.len() < outputs {
        return cx.err(format!("{} parts for {outputs} outputs", sizes.len()));
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(sizes.len());
    for s in sizes {
        let range = Slice::from(start..start + s);
        out.push(moved!(cx, x, |a| a
            .slice_axis(Axis(axis), range)
            .to_owned()));
        start += s;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Det

/// The determinant of each square matrix of the last two axes: LU with
/// partial pivoting, f64 in f64, the others in f32.
fn det(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let s = x.shape();
    let r = s.len();
    if r < 2 || s[r - 1] != s[r - 2] {
        return cx.err(format!(
            "Det takes square matrices [..., M, M], found {s:?}"
        ));
    }
    Ok(vec![floating!(cx, x, "the input", |a| Elem::wrap(
        det_typed(a)
    ))])
}

fn det_typed<T: Float>(a: &ArrayD<T>) -> ArrayD<T> {
    let s = a.shape();
    let r = s.len();
    let n = s[r - 1];
    let count: usize = s[..r - 2].iter().product();
    // An empty matrix (n = 0) has determinant 1.
    if n == 0 {
        return array(&s[..r - 2], vec![T::one(); count]);
    }
    let data = flat(a);
    let dets: Vec<T> = data
        .chunks(n * n)
        .take(count)
        .map(|m| {
            if T::DTYPE == DataType::F64 {
                T::from_f64(lu_det(m.iter().map(|v| v.to_f64()).collect(), n))
            } else {
                T::from_f32(lu_det(m.iter().map(|v| v.to_f32()).collect(), n))
            }
        })
        .collect();
    array(&s[..r - 2], dets)
}

fn lu_det<C: Number>(mut m: Vec<C>, n: usize) -> C {
    let mut det = C::one();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| {
                m[p * n + col]
                    .abs()
                    .partial_cmp(&m[q * n + col].abs())
                    .unwrap_or(Ordering::Equal)
            })
            .unwrap_or(col);
        if m[pivot * n + col] == C::zero() {
            return C::zero();
        }
        if pivot != col {
            for k in 0..n {
                m.swap(pivot * n + k, col * n + k);
            }
            det = det.neg();
        }
        let p = m[col * n + col];
        det = det.mul(p);
        for row in col + 1..n {
            let f = m[row * n + col].div(p).unwrap_or_default();
            for k in col..n {
                m[row * n + k] = m[row * n + k].sub(f.mul(m[col * n + k]));
            }
        }
    }
    det
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::{Graph, NewNode, ValueId};

    /// Runs one node of `op` on `inputs` (None: an absent optional input).
    fn run(
        op: &str,
        opset: i64,
        attrs: Vec<(&str, AttrValue)>,
        inputs: &[Option<&Tensor>],
        outputs: usize,
    ) -> Result<Vec<Tensor>, EvalError> {
        let mut g = Graph::new("test");
        let ins: Vec<Option<ValueId>> = inputs
            .iter()
            .enumerate()
            .map(|(k, t)| t.map(|_| g.add_input(format!("in{k}"), None).unwrap()))
            .collect();
        let outs: Vec<ValueId> = (0..outputs)
            .map(|k| g.add_value(format!("out{k}"), None).unwrap())
            .collect();
        let mut node = NewNode::new(op).outputs(outs);
        node.inputs = ins;
        for (name, value) in attrs {
            node = node.attr(name, value);
        }
        let id = g.add_node(node).unwrap();
        crate::run_node(&g, id, opset, inputs)
    }

    fn f64s(shape: &[usize], v: &[f64]) -> Tensor {
        Tensor::F64(array(shape, v.to_vec()))
    }
    fn i64s(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::I64(array(shape, v.to_vec()))
    }
    fn i32s(shape: &[usize], v: &[i32]) -> Tensor {
        Tensor::I32(array(shape, v.to_vec()))
    }
    fn strings(shape: &[usize], v: &[&str]) -> Tensor {
        Tensor::String(array(
            shape,
            v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ))
    }
    fn one(r: Result<Vec<Tensor>, EvalError>) -> Tensor {
        r.unwrap().remove(0)
    }

    #[test]
    fn gather_takes_negative_indices_of_any_type_and_refuses_bad_ones() {
        let x = strings(&[3, 2], &["a", "b", "c", "d", "e", "f"]);
        let idx = i32s(&[2], &[-1, 0]);
        let y = one(run("Gather", 13, vec![], &[Some(&x), Some(&idx)], 1));
        assert_eq!(y, strings(&[2, 2], &["e", "f", "a", "b"]));
        let bad = i64s(&[1], &[3]);
        let e = run("Gather", 13, vec![], &[Some(&x), Some(&bad)], 1).unwrap_err();
        assert!(e.to_string().contains("index 3"), "{e}");
    }

    #[test]
    fn gather_elements_and_nd_with_batch_dims() {
        let x = i64s(&[2, 2], &[1, 2, 3, 4]);
        let idx = i64s(&[2, 2], &[0, 0, 1, 0]);
        let y = one(run(
            "GatherElements",
            13,
            vec![("axis", AttrValue::Int(1))],
            &[Some(&x), Some(&idx)],
            1,
        ));
        assert_eq!(y, i64s(&[2, 2], &[1, 1, 4, 3]));
        let data = i32s(&[2, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7]);
        let idx = i64s(&[2, 1], &[1, 0]);
        let y = one(run(
            "GatherND",
            13,
            vec![("batch_dims", AttrValue::Int(1))],
            &[Some(&data), Some(&idx)],
            1,
        ));
        assert_eq!(y, i32s(&[2, 2], &[2, 3, 4, 5]));
    }

    #[test]
    fn scatter_reductions_are_exact() {
        let data = f64s(&[4], &[1.0, 2.0, 3.0, 4.0]);
        let idx = i64s(&[3, 1], &[0, 0, -1]);
        let upd = f64s(&[3], &[0.1, 0.2, 10.0]);
        let add = one(run(
            "ScatterND",
            18,
            vec![("reduction", AttrValue::String(b"add".to_vec()))],
            &[Some(&data), Some(&idx), Some(&upd)],
            1,
        ));
        assert_eq!(add, f64s(&[4], &[1.0 + 0.1 + 0.2, 2.0, 3.0, 14.0]));
        let data = i64s(&[2, 2], &[1, 2, 3, 4]);
        let idx = i64s(&[1, 2], &[1, 0]);
        let upd = i64s(&[1, 2], &[5, 1]);
        let max = one(run(
            "ScatterElements",
            18,
            vec![
                ("axis", AttrValue::Int(1)),
                ("reduction", AttrValue::String(b"max".to_vec())),
            ],
            &[Some(&data), Some(&idx), Some(&upd)],
            1,
        ));
        assert_eq!(max, i64s(&[2, 2], &[1, 5, 3, 4]));
        let bad = i64s(&[1, 2], &[2, 0]);
        assert!(run(
            "ScatterElements",
            18,
            vec![("axis", AttrValue::Int(1))],
            &[Some(&data), Some(&bad), Some(&upd)],
            1
        )
        .is_err());
    }

    #[test]
    fn unique_sorted_and_unsorted() {
        let x = i64s(&[6], &[2, 1, 1, 3, 4, 3]);
        let sorted = run("Unique", 11, vec![], &[Some(&x)], 4).unwrap();
        assert_eq!(sorted[0], i64s(&[4], &[1, 2, 3, 4]));
        assert_eq!(sorted[1], i64s(&[4], &[1, 0, 3, 4]));
        assert_eq!(sorted[2], i64s(&[6], &[1, 0, 0, 2, 3, 2]));
        assert_eq!(sorted[3], i64s(&[4], &[2, 1, 2, 1]));
        let unsorted = run(
            "Unique",
            11,
            vec![("sorted", AttrValue::Int(0))],
            &[Some(&x)],
            4,
        )
        .unwrap();
        assert_eq!(unsorted[0], i64s(&[4], &[2, 1, 3, 4]));
        assert_eq!(unsorted[2], i64s(&[6], &[0, 1, 1, 2, 3, 2]));
        let rows = f64s(&[3, 2], &[1.0, 0.5, 0.0, 1.0, 1.0, 0.5]);
        let by_row = run(
            "Unique",
            11,
            vec![("axis", AttrValue::Int(0))],
            &[Some(&rows)],
            4,
        )
        .unwrap();
        assert_eq!(by_row[0], f64s(&[2, 2], &[0.0, 1.0, 1.0, 0.5]));
        assert_eq!(by_row[3], i64s(&[2], &[1, 2]));
    }

    #[test]
    fn range_is_exact_for_integers_and_f64() {
        let y = one(run(
            "Range",
            11,
            vec![],
            &[
                Some(&i64s(&[], &[10])),
                Some(&i64s(&[], &[4])),
                Some(&i64s(&[], &[-3])),
            ],
            1,
        ));
        assert_eq!(y, i64s(&[2], &[10, 7]));
        let y = one(run(
            "Range",
            11,
            vec![],
            &[
                Some(&f64s(&[], &[0.1])),
                Some(&f64s(&[], &[0.35])),
                Some(&f64s(&[], &[0.1])),
            ],
            1,
        ));
        // start + k * delta, each in f64 (not a running sum).
        assert_eq!(y, f64s(&[3], &[0.1, 0.1 + 0.1, 0.1 + 2.0 * 0.1]));
        assert!(run(
            "Range",
            11,
            vec![],
            &[
                Some(&i64s(&[], &[0])),
                Some(&i64s(&[], &[4])),
                Some(&i64s(&[], &[0]))
            ],
            1
        )
        .is_err());
    }

    #[test]
    fn pad_modes_and_cropping() {
        let x = i32s(&[4], &[1, 2, 3, 4]);
        let pads = i64s(&[2], &[2, 1]);
        let mode = |m: &str| vec![("mode", AttrValue::String(m.as_bytes().to_vec()))];
        let y = |m: &str| one(run("Pad", 19, mode(m), &[Some(&x), Some(&pads)], 1));
        assert_eq!(y("constant"), i32s(&[7], &[0, 0, 1, 2, 3, 4, 0]));
        assert_eq!(y("edge"), i32s(&[7], &[1, 1, 1, 2, 3, 4, 4]));
        assert_eq!(y("reflect"), i32s(&[7], &[3, 2, 1, 2, 3, 4, 3]));
        assert_eq!(y("wrap"), i32s(&[7], &[3, 4, 1, 2, 3, 4, 1]));
        // Negative pads crop first; wrap then repeats what is left.
        let crop = i64s(&[2], &[-1, 2]);
        let y = one(run("Pad", 19, mode("wrap"), &[Some(&x), Some(&crop)], 1));
        assert_eq!(y, i32s(&[5], &[2, 3, 4, 2, 3]));
        // Opset 2: attributes.
        let y = one(run(
            "Pad",
            2,
            vec![
                ("pads", AttrValue::Ints(vec![1, 0])),
                ("value", AttrValue::Float(7.0)),
            ],
            &[Some(&x)],
            1,
        ));
        assert_eq!(y, i32s(&[5], &[7, 1, 2, 3, 4]));
    }

    #[test]
    fn packed_tensors_move_through_codes() {
        let p = Tensor::Packed(
            PackedTensor::from_sub_byte_ints(DataType::I4, &[2, 3], &[1, -2, 3, -4, 5, -6])
                .unwrap(),
        );
        let y = one(run("Transpose", 21, vec![], &[Some(&p)], 1));
        let Tensor::Packed(y) = y else {
            panic!("not packed")
        };
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(y.unpack_sub_byte_ints().unwrap(), vec![1, -4, -2, 5, 3, -6]);
        let shape = i64s(&[1], &[6]);
        let y = one(run("Reshape", 21, vec![], &[Some(&p), Some(&shape)], 1));
        assert_eq!(y.shape(), &[6]);
        assert_eq!(y.dtype(), DataType::I4);
    }

    #[test]
    fn slice_clamps_as_the_spec_says() {
        let x = i64s(&[5], &[0, 1, 2, 3, 4]);
        let y = |start: i64, end: i64, step: i64| {
            let (s, e, a, st) = (
                i64s(&[1], &[start]),
                i64s(&[1], &[end]),
                i64s(&[1], &[0]),
                i64s(&[1], &[step]),
            );
            one(run(
                "Slice",
                13,
                vec![],
                &[Some(&x), Some(&s), Some(&e), Some(&a), Some(&st)],
                1,
            ))
        };
        assert_eq!(y(-100, -100, -1), i64s(&[1], &[0]));
        assert_eq!(y(100, -100, -2), i64s(&[3], &[4, 2, 0]));
        assert_eq!(y(1, i64::MAX, 2), i64s(&[2], &[1, 3]));
        assert_eq!(y(i64::MIN, i64::MAX, i64::MAX), i64s(&[1], &[0]));
        let empty = i64s(&[0], &[]);
        let (s, e) = (i64s(&[1], &[0]), i64s(&[1], &[-1]));
        let steps = i64s(&[1], &[-1]);
        let axes = i64s(&[1], &[0]);
        let y = one(run(
            "Slice",
            13,
            vec![],
            &[Some(&empty), Some(&s), Some(&e), Some(&axes), Some(&steps)],
            1,
        ));
        assert_eq!(y.len(), 0);
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        let scalar = i64s(&[], &[1]);
        let axis0 = || vec![("axis", AttrValue::Int(0))];
        let cond = Tensor::Bool(array(&[1], vec![true]));
        assert!(run("Compress", 11, axis0(), &[Some(&scalar), Some(&cond)], 1).is_err());
        assert!(run("Unique", 11, axis0(), &[Some(&scalar)], 1).is_err());
        assert!(run("Split", 13, axis0(), &[Some(&scalar)], 1).is_err());
        let x = i64s(&[1, 4, 1, 1], &[1, 2, 3, 4]);
        let huge = vec![("blocksize", AttrValue::Int(1 << 40))];
        assert!(run("DepthToSpace", 13, huge.clone(), &[Some(&x)], 1).is_err());
        assert!(run("SpaceToDepth", 13, huge, &[Some(&x)], 1).is_err());
        let m = i64s(&[2, 2], &[1, 2, 3, 4]);
        let k = vec![("k", AttrValue::Int(i64::MAX))];
        assert_eq!(
            one(run("EyeLike", 9, k, &[Some(&m)], 1)),
            i64s(&[2, 2], &[0, 0, 0, 0])
        );
        let pads = i64s(&[4], &[i64::MIN, 0, 0, i64::MAX]);
        assert!(run("Pad", 13, vec![], &[Some(&m), Some(&pads)], 1).is_err());
        let idx = i64s(&[1, 1], &[i64::MIN]);
        let upd = i64s(&[1], &[0]);
        assert!(run(
            "ScatterND",
            13,
            vec![],
            &[Some(&m), Some(&idx), Some(&upd)],
            1
        )
        .is_err());
        let reps = i64s(&[2], &[1 << 31, 1 << 31]);
        assert!(run("Tile", 13, vec![], &[Some(&m), Some(&reps)], 1).is_err());
    }

    #[test]
    fn det_in_f64_and_batches() {
        let x = f64s(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 1.0, 0.0]);
        let y = one(run("Det", 11, vec![], &[Some(&x)], 1));
        assert_eq!(y, f64s(&[2], &[-2.0, -1.0]));
    }

    #[test]
    fn small_operators() {
        let cond = Tensor::Bool(array(&[3], vec![true, false, true]));
        let x = strings(&[3], &["a", "b", "c"]);
        let y = strings(&[1], &["z"]);
        assert_eq!(
            one(run(
                "Where",
                16,
                vec![],
                &[Some(&cond), Some(&x), Some(&y)],
                1
            )),
            strings(&[3], &["a", "z", "c"])
        );
        let m = i64s(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            one(run(
                "Trilu",
                14,
                vec![("upper", AttrValue::Int(0))],
                &[Some(&m)],
                1
            )),
            i64s(&[2, 3], &[1, 0, 0, 4, 5, 0])
        );
        assert_eq!(
            one(run(
                "NonZero",
                13,
                vec![],
                &[Some(&i64s(&[2, 2], &[0, 3, 4, 0]))],
                1
            )),
            i64s(&[2, 2], &[0, 1, 1, 0])
        );
        let reps = i64s(&[2], &[2, 1]);
        assert_eq!(
            one(run("Tile", 13, vec![], &[Some(&m), Some(&reps)], 1)).shape(),
            &[4, 3]
        );
        let idx = i64s(&[2], &[1, -1]);
        let depth = i64s(&[], &[3]);
        let values = f64s(&[2], &[0.0, 1.0]);
        assert_eq!(
            one(run(
                "OneHot",
                11,
                vec![],
                &[Some(&idx), Some(&depth), Some(&values)],
                1
            )),
            f64s(&[2, 3], &[0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
        );
        let parts = run(
            "Split",
            18,
            vec![("num_outputs", AttrValue::Int(2))],
            &[Some(&i64s(&[5], &[1, 2, 3, 4, 5]))],
            2,
        )
        .unwrap();
        assert_eq!(parts[1], i64s(&[2], &[4, 5]));
        let big = i64s(&[2], &[1 << 40, 1 << 40]);
        assert!(run("ConstantOfShape", 9, vec![], &[Some(&big)], 1).is_err());
    }
}
