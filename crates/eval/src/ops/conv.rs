//! Convolution: im2col + matrix product per group (depthwise convolutions
//! go to `depthwise.rs`), and the window arithmetic shared with pooling.

use super::depthwise;
use super::gemm::{gemm, gemm_into, MatRef, Threads};
use super::pointwise::Epilogue;
use super::{array, f32_input, Grads};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayViewMut2, Axis};
use qgraph_ir::Tensor;
use rayon::prelude::*;

/// Window geometry over the spatial dims.
pub struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pad_begin: Vec<usize>,
    pub pad_end: Vec<usize>,
    pub out: Vec<usize>,
}

fn positive(cx: &OpCtx, v: Vec<i64>, what: &str) -> Result<Vec<usize>, EvalError> {
    v.into_iter()
        .map(|x| {
            if x >= 1 {
                Ok(x as usize)
            } else {
                cx.err(format!("{what} must be positive, found {x}"))
            }
        })
        .collect()
}

/// Reads kernel_shape (or takes `kernel`), strides, dilations, pads and
/// auto_pad, and computes the output size of each spatial dim.
pub fn window(
    cx: &OpCtx,
    input: &[usize],
    kernel: Option<Vec<usize>>,
    ceil_mode: bool,
) -> Result<Window, EvalError> {
    let n = input.len();
    let kernel = match kernel {
        Some(k) => k,
        None => match cx.ints_attr("kernel_shape")? {
            Some(k) => positive(cx, k, "kernel_shape")?,
            None => return cx.err("kernel_shape is required"),
        },
    };
    let strides = positive(
        cx,
        cx.ints_attr("strides")?.unwrap_or(vec![1; n]),
        "strides",
    )?;
    let dilations = positive(
        cx,
        cx.ints_attr("dilations")?.unwrap_or(vec![1; n]),
        "dilations",
    )?;
    if kernel.len() != n || strides.len() != n || dilations.len() != n {
        return cx.err(format!(
            "kernel, strides and dilations must have {n} values"
        ));
    }
    let auto_pad = cx.string_attr("auto_pad", "NOTSET")?;
    let mut pad_begin = vec![0; n];
    let mut pad_end = vec![0; n];
    let mut out = vec![0; n];
    for d in 0..n {
        let span = (kernel[d] - 1) * dilations[d] + 1;
        match auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                out[d] = input[d].div_ceil(strides[d]);
                let total = ((out[d] - 1) * strides[d] + span).saturating_sub(input[d]);
                let small = total / 2;
                (pad_begin[d], pad_end[d]) = if auto_pad == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
            }
            "VALID" | "NOTSET" => {
                if auto_pad == "NOTSET" {
                    if let Some(p) = cx.ints_attr("pads")? {
                        if p.len() != 2 * n || p.iter().any(|&x| x < 0) {
                            return cx.err(format!("pads must have {} non-negative values", 2 * n));
                        }
                        pad_begin[d] = p[d] as usize;
                        pad_end[d] = p[d + n] as usize;
                    }
                }
                // Padding the plan moved here from a Pad node (2-D only).
                let [top, left, bottom, right] = cx.input_pads;
                if n == 2 {
                    pad_begin[d] += [top, left][d];
                    pad_end[d] += [bottom, right][d];
                }
                let padded = input[d] + pad_begin[d] + pad_end[d];
                if padded < span {
                    return cx.err(format!(
                        "the window ({span}) is larger than the padded input ({padded})"
                    ));
                }
                let steps = padded - span;
                out[d] = if ceil_mode {
                    steps.div_ceil(strides[d])
                } else {
                    steps / strides[d]
                } + 1;
                // A last window that would start in the end padding is dropped.
                if ceil_mode && (out[d] - 1) * strides[d] >= input[d] + pad_begin[d] {
                    out[d] -= 1;
                }
            }
            other => return cx.err(format!("auto_pad '{other}' is not an ONNX value")),
        }
    }
    Ok(Window {
        kernel,
        strides,
        dilations,
        pad_begin,
        pad_end,
        out,
    })
}

pub fn conv(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let w = f32_input(cx, inputs, 1)?;
    let bias = match inputs.get(2).copied().flatten() {
        Some(Tensor::F32(b)) => Some(b.iter().copied().collect::<Vec<f32>>()),
        Some(t) => return cx.err(format!("bias must be f32, found {}", t.dtype())),
        None => None,
    };
    let ConvShape {
        n,
        c,
        h,
        w: wd,
        m,
        group,
        cg,
        mg,
        g: geometry,
        depthwise,
        pointwise,
    } = ConvShape::read(cx, x.shape(), w.shape())?;
    let (oh, ow) = (geometry.oh, geometry.ow);
    if bias.as_ref().is_some_and(|b| b.len() != m) {
        return cx.err(format!("bias must have {m} values"));
    }
    if let Some(ch) = cx
        .epilogue
        .iter()
        .find_map(|p| p.channels().filter(|&k| k != m))
    {
        return cx.err(format!(
            "the batch normalization after it has {ch} channels, the convolution makes {m}"
        ));
    }
    // The tensor a fused Add adds; the executor runs the nodes one by one
    // when it does not have the output's shape.
    let added = match cx.added {
        None => None,
        Some(Tensor::F32(a)) if a.shape() == [n, m, oh, ow] => Some(a.as_standard_layout()),
        Some(t) => {
            return cx.err(format!(
                "the fused Add's other input is {} {:?}, the output {:?}",
                t.dtype(),
                t.shape(),
                [n, m, oh, ow]
            ))
        }
    };
    let added = added
        .as_ref()
        .map(|a| a.as_slice().expect("standard layout"));
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let w = w.as_standard_layout();
    let ws = w.as_slice().expect("standard layout");
    let k = cg * geometry.kh * geometry.kw;
    let plane = oh * ow;
    // The loops below are compiled for the best vector unit found at run
    // time; they are loads, adds and fused multiply-adds (`mul_add`, rounded
    // once whether the unit or the library computes it), so the values are
    // the same on every unit.
    let simd = pulp::Arch::new();
    let mut out = cx.buffers.take(n * m * plane);
    if depthwise {
        depthwise::forward(
            depthwise::Forward {
                src: xs,
                weights: ws,
                bias: bias.as_deref(),
                epilogue: cx.epilogue,
                added,
                g: &geometry,
                channels: m,
            },
            &mut out,
        );
        return Ok(vec![Tensor::F32(array(&[n, m, oh, ow], out))]);
    }
    // Bias, then the epilogue, on the values of one output channel that
    // start at `offset` in the output.
    let finish = |channel: usize, offset: usize, values: &mut [f32]| {
        simd.dispatch(Epilogue {
            bias: bias.as_ref().map(|b| b[channel]),
            maps: cx.epilogue,
            channel,
            added: added.map(|a| &a[offset..][..values.len()]),
            data: values,
        });
    };
    // Tasks are tiles of one (image, group)'s output: a block of whole
    // output rows (im2col makes only those columns) by a block of output
    // channels, both cut from the shape alone, so that neither the batch
    // size nor the thread count changes a result's bits. Each tile stays in
    // cache from the product through the epilogue.
    if out.is_empty() {
        return Ok(vec![Tensor::F32(array(&[n, m, oh, ow], out))]);
    }
    // From here every size is at least 1.
    let tile = Tile::new(mg, k, oh, ow);
    // A plain product's columns need not be whole rows: blocks of whole
    // 16-column panels (the `gemm` crate's microkernel height, as it takes
    // the product transposed) leave a partial panel only at the plane's end.
    let block_columns = if pointwise {
        (tile.rows * ow).next_multiple_of(16).min(plane)
    } else {
        tile.rows * ow
    };
    let whole = ArrayViewMut2::from_shape((n * group * mg, plane), &mut out[..])
        .expect("the output holds n x m planes");
    let mut tasks = Vec::new();
    for (image_group, outputs) in chunks(whole, Axis(0), mg).into_iter().enumerate() {
        for (part, channels) in chunks(outputs, Axis(0), tile.channels)
            .into_iter()
            .enumerate()
        {
            for (block, tile_view) in chunks(channels, Axis(1), block_columns)
                .into_iter()
                .enumerate()
            {
                tasks.push((
                    image_group,
                    part * tile.channels,
                    block * block_columns,
                    tile_view,
                ));
            }
        }
    }
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(columns, gathered), (image_group, first_channel, first, mut dst)| {
            let (b, g) = (image_group / group, image_group % group);
            let (channels, width) = dst.dim();
            // The group's planes and what follows them (see `im2col_rows`).
            let src = &xs[(b * c + g * cg) * h * wd..];
            let weights = &ws[(g * mg + first_channel) * k..][..channels * k];
            let wg = MatRef::row_major(weights, channels, k);
            let rhs = if pointwise {
                // A 1x1 convolution without stride or padding is a product
                // with the input planes as they are.
                MatRef::row_major(src, cg, plane).columns(first, width)
            } else {
                let y0 = first / ow;
                im2col_rows(src, cg, &geometry, y0..y0 + width / ow, columns);
                MatRef::row_major(columns, k, width)
            };
            // A last partial panel of a few columns goes to `narrow_product`.
            let narrow = width % 16;
            if width > 16 && narrow <= NARROW_COLUMNS {
                let full = width - narrow;
                let (head, tail) = dst.view_mut().split_at(Axis(1), full);
                gemm_into(head, wg, rhs.columns(0, full), 1.0, false, Threads::One);
                simd.dispatch(NarrowProduct {
                    dst: tail,
                    a: weights,
                    b: rhs.columns(full, narrow),
                    gathered,
                });
            } else {
                gemm_into(dst.view_mut(), wg, rhs, 1.0, false, Threads::One);
            }
            for (oc, mut row) in dst.rows_mut().into_iter().enumerate() {
                let channel = first_channel + oc;
                finish(
                    g * mg + channel,
                    (image_group * mg + channel) * plane + first,
                    row.as_slice_mut().expect("a tile's rows are contiguous"),
                );
            }
        },
    );
    Ok(vec![Tensor::F32(array(&[n, m, oh, ow], out))])
}

/// A view cut along `axis` into consecutive blocks of `size` (the last one
/// shorter), each keeping the view's lifetime.
fn chunks(view: ArrayViewMut2<f32>, axis: Axis, size: usize) -> Vec<ArrayViewMut2<f32>> {
    let mut blocks = Vec::new();
    let mut rest = view;
    while rest.len_of(axis) > size {
        let (block, tail) = rest.split_at(axis, size);
        blocks.push(block);
        rest = tail;
    }
    blocks.push(rest);
    blocks
}

/// Columns at most in a partial panel that [`NarrowProduct`] computes
/// instead of the `gemm` crate: the crate takes such a panel with its 8-row
/// microkernel at about the cost of a whole 16-row one (a 7x7 plane's 49th
/// column took 23% of a 1x1 layer's time), where a few dot products per
/// output do the work of only the columns there are.
const NARROW_COLUMNS: usize = 4;

/// `dst = a b` for a product with a few columns (`b.cols()` at most
/// [`NARROW_COLUMNS`]): `a` is row-major `dst.nrows() x b.rows()`. The
/// columns of `b` are gathered into rows (`gathered`), then each output is
/// a dot product in 8 lanes (fused multiply-adds in increasing k, lane
/// `l` taking every k = l mod 8), the lanes added pairwise, and the last
/// k % 8 terms added one by one. Two rows of `a` share each load of the
/// gathered columns. The same operations in the same order on every vector
/// unit, so the values do not depend on it.
struct NarrowProduct<'a> {
    dst: ArrayViewMut2<'a, f32>,
    a: &'a [f32],
    b: MatRef<'a>,
    gathered: &'a mut Vec<f32>,
}

impl pulp::WithSimd for NarrowProduct<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let NarrowProduct {
            mut dst,
            a,
            b,
            gathered,
        } = self;
        let (k, cols) = (b.rows(), b.cols());
        gathered.clear();
        for p in 0..cols {
            gathered.extend((0..k).map(|kk| b.at(kk, p)));
        }
        let k8 = k - k % 8;
        #[cfg(target_arch = "x86_64")]
        let v3 = pulp::x86::V3::try_new();
        for (pair, mut rows) in dst.axis_chunks_iter_mut(Axis(0), 2).enumerate() {
            let count = rows.nrows();
            let a_rows: [&[f32]; 2] =
                std::array::from_fn(|i| &a[(2 * pair + i.min(count - 1)) * k..][..k]);
            for p in 0..cols {
                let column = &gathered[p * k..][..k];
                #[cfg(target_arch = "x86_64")]
                let lanes = match v3 {
                    Some(v3) => dot_lanes_avx(v3, a_rows, &column[..k8]),
                    None => dot_lanes(a_rows, &column[..k8]),
                };
                #[cfg(not(target_arch = "x86_64"))]
                let lanes = dot_lanes(a_rows, &column[..k8]);
                for i in 0..count {
                    let l = lanes[i];
                    let mut sum = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
                    for kk in k8..k {
                        sum = a_rows[i][kk].mul_add(column[kk], sum);
                    }
                    rows[[i, p]] = sum;
                }
            }
        }
    }
}

/// The 8 lanes of two rows' dot products with `x` (a whole number of
/// vectors long): lane `l` sums terms `l, l + 8, ...` with fused
/// multiply-adds from zero.
#[inline(always)]
fn dot_lanes(rows: [&[f32]; 2], x: &[f32]) -> [[f32; 8]; 2] {
    let mut acc = [[0f32; 8]; 2];
    for (at, xs) in x.chunks_exact(8).enumerate() {
        for (acc, row) in acc.iter_mut().zip(rows) {
            for l in 0..8 {
                acc[l] = row[at * 8 + l].mul_add(xs[l], acc[l]);
            }
        }
    }
    acc
}

/// [`dot_lanes`] in AVX registers, written out (the same operations).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_lanes_avx(v3: pulp::x86::V3, rows: [&[f32]; 2], x: &[f32]) -> [[f32; 8]; 2] {
    use pulp::{cast, f32x8};
    let vector = |values: &[f32]| -> f32x8 {
        let values: [f32; 8] = values[..8].try_into().expect("a vector");
        cast(values)
    };
    let (mut a0, mut a1) = (v3.splat_f32x8(0.0), v3.splat_f32x8(0.0));
    let (r0, r1) = (&rows[0][..x.len()], &rows[1][..x.len()]);
    for ((xs, w0), w1) in x
        .chunks_exact(8)
        .zip(r0.chunks_exact(8))
        .zip(r1.chunks_exact(8))
    {
        let xs = vector(xs);
        a0 = v3.mul_add_f32x8(vector(w0), xs, a0);
        a1 = v3.mul_add_f32x8(vector(w1), xs, a1);
    }
    [cast(a0), cast(a1)]
}

/// A convolution task's share of one (image, group)'s output.
struct Tile {
    /// Output channels (all of them unless the rows are too few to share).
    channels: usize,
    /// Whole output rows.
    rows: usize,
}

impl Tile {
    /// About `TASK_MACS` multiply-adds per tile, at least 65 columns (see
    /// gemm.rs: a product with more than 64 columns takes the general path)
    /// and no more than fit in about 1 MiB of cache with their input
    /// columns; all output channels, so that the right operand is packed
    /// once for all of them, unless that leaves fewer than `MIN_TILES` tiles
    /// per image: then channel blocks of whole microkernel panels make more
    /// (6 channels: the crate takes the product transposed, the channels as
    /// its 6-wide panels; blocks of 16 had cut 160 channels as 48, 48, 48
    /// and 16, for two threads 96 against 64).
    /// Every size is at least 1.
    fn new(channels: usize, k: usize, oh: usize, ow: usize) -> Tile {
        const TASK_MACS: usize = 1 << 21;
        const MIN_TILES: usize = 4;
        // Measured on MobileNetV2: 256 KiB blocks were slower than 1 MiB ones.
        const BLOCK_VALUES: usize = 262144;
        let row_macs = channels * k * ow;
        let cached = (BLOCK_VALUES / (k + channels)).div_ceil(ow);
        let rows = (TASK_MACS / row_macs)
            .min(cached)
            .max(65usize.div_ceil(ow))
            .clamp(1, oh);
        let row_tiles = oh.div_ceil(rows);
        let channels = if row_tiles < MIN_TILES {
            channels
                .div_ceil(MIN_TILES.div_ceil(row_tiles))
                .next_multiple_of(6)
                .min(channels)
        } else {
            channels
        };
        Tile { channels, rows }
    }
}

/// A 2-D convolution's sizes, read from its input and weight shapes and
/// its attributes.
struct ConvShape {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    /// Output channels.
    m: usize,
    group: usize,
    /// Input and output channels per group.
    cg: usize,
    mg: usize,
    g: Geometry,
    depthwise: bool,
    /// 1x1 without stride or padding: a product with the input as it is.
    pointwise: bool,
}

impl ConvShape {
    fn read(cx: &OpCtx, x: &[usize], w: &[usize]) -> Result<ConvShape, EvalError> {
        if x.len() != 4 || w.len() != 4 {
            return cx.err(format!(
                "only 2-D convolution is implemented (input rank {})",
                x.len()
            ));
        }
        let (n, c, h, wd) = (x[0], x[1], x[2], x[3]);
        let (m, cg, kh, kw) = (w[0], w[1], w[2], w[3]);
        if kh == 0 || kw == 0 {
            return cx.err(format!("the kernel {w:?} is empty"));
        }
        let group = cx.int_attr("group", 1)?;
        if group < 1
            || c % group as usize != 0
            || m % group as usize != 0
            || c / group as usize != cg
        {
            return cx.err(format!(
                "group {group} does not fit {c} input channels, weights {w:?}"
            ));
        }
        let group = group as usize;
        let mg = m / group;
        let win = window(cx, &[h, wd], Some(vec![kh, kw]), false)?;
        let g = Geometry {
            h,
            w: wd,
            kh,
            kw,
            oh: win.out[0],
            ow: win.out[1],
            sh: win.strides[0],
            sw: win.strides[1],
            dh: win.dilations[0],
            dw: win.dilations[1],
            ph: win.pad_begin[0],
            pw: win.pad_begin[1],
        };
        let pointwise = kh == 1
            && kw == 1
            && g.sh == 1
            && g.sw == 1
            && win.pad_begin.iter().chain(&win.pad_end).all(|&p| p == 0);
        Ok(ConvShape {
            n,
            c,
            h,
            w: wd,
            m,
            group,
            cg,
            mg,
            depthwise: cg == 1 && mg == 1,
            pointwise,
            g,
        })
    }
}

/// The sizes of one 2-D convolution: input plane, kernel, output plane,
/// strides, dilations and leading pads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    pub(super) dh: usize,
    pub(super) dw: usize,
    pub(super) ph: usize,
    pub(super) pw: usize,
}

impl Geometry {
    /// The input row read by output row `y` at kernel row `i`, if inside.
    pub(super) fn input_row(&self, y: usize, i: usize) -> Option<usize> {
        (y * self.sh + i * self.dh)
            .checked_sub(self.ph)
            .filter(|&r| r < self.h)
    }

    /// For kernel column `j`: output column `x` reads input column
    /// `x * sw + j * dw - pw`. Returns (first x, end x, input column of the
    /// first x), every read in between inside the row.
    pub(super) fn column_range(&self, j: usize) -> (usize, usize, usize) {
        let offset = (j * self.dw) as isize - self.pw as isize;
        let sw = self.sw as isize;
        // The smallest x with x * sw + offset >= 0, and the first x with
        // x * sw + offset >= w.
        let first = ((-offset).max(0) + sw - 1).div_euclid(sw);
        let end = (self.w as isize - offset + sw - 1).div_euclid(sw).max(0);
        let end = (end as usize).min(self.ow);
        let first = (first as usize).min(end);
        (first, end, (first as isize * sw + offset).max(0) as usize)
    }
}

/// The vector unit [`copy_strided`] shuffles with, looked up once per
/// caller rather than per row.
#[cfg(target_arch = "x86_64")]
pub(super) type Shuffles = Option<pulp::x86::V3>;
#[cfg(not(target_arch = "x86_64"))]
pub(super) type Shuffles = Option<()>;

pub(super) fn shuffles() -> Shuffles {
    #[cfg(target_arch = "x86_64")]
    return pulp::x86::V3::try_new();
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// `dst[to + t] = src[from + t * stride]` for `t < count`: one row of an
/// im2col block or of a padded, phase-split plane. Stride 2 goes through
/// [`copy_even_columns`] where the unit allows, so callers copy rows in
/// increasing order of `to` into zeros (see there).
#[inline(always)]
pub(super) fn copy_strided(
    shuffles: Shuffles,
    src: &[f32],
    from: usize,
    stride: usize,
    dst: &mut [f32],
    to: usize,
    count: usize,
) {
    match stride {
        1 => dst[to..][..count].copy_from_slice(&src[from..][..count]),
        2 => {
            #[cfg(target_arch = "x86_64")]
            if let Some(v3) = shuffles {
                if copy_even_columns(v3, src, from, dst, to, count) {
                    return;
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = shuffles;
            for (t, d) in dst[to..][..count].iter_mut().enumerate() {
                *d = src[from + 2 * t];
            }
        }
        _ => {
            let out = &mut dst[to..][..count];
            for (d, s) in out.iter_mut().zip(src[from..].iter().step_by(stride)) {
                *d = *s;
            }
        }
    }
}

/// `dst[to + t] = src[from + 2 t]` for `t < count`, eight values at a
/// time from two vector loads and three shuffles: the compiler keeps a
/// strided copy scalar, and that copy took half of a stride-2 depthwise
/// layer. The last block writes up to seven zeros past `count`, so callers
/// copy in increasing order of `to` into places whose unwritten values are
/// zero: what a block spills over is either such a zero or a later copy's.
/// Returns false, having written nothing, when `src` or `dst` is too short
/// for whole blocks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn copy_even_columns(
    v3: pulp::x86::V3,
    src: &[f32],
    from: usize,
    dst: &mut [f32],
    to: usize,
    count: usize,
) -> bool {
    use std::arch::x86_64::{__m256, __m256i};
    if count == 0 {
        return true;
    }
    let blocks = count.div_ceil(8);
    let (Some(input), Some(out)) = (
        src.get(from..from + 16 * blocks),
        dst.get_mut(to..to + 8 * blocks),
    ) else {
        return false;
    };
    // Even lanes to the low half, odd lanes to the high half.
    let split: __m256i = pulp::cast([0i32, 2, 4, 6, 1, 3, 5, 7]);
    // Values of the last block that belong to the copy.
    let last = count - 8 * (blocks - 1);
    for (b, (d, s)) in out
        .chunks_exact_mut(8)
        .zip(input.chunks_exact(16))
        .enumerate()
    {
        let low: [f32; 8] = s[..8].try_into().expect("8 values");
        let high: [f32; 8] = s[8..].try_into().expect("8 values");
        let low = v3
            .avx2
            ._mm256_permutevar8x32_ps(pulp::cast::<_, __m256>(low), split);
        let high = v3
            .avx2
            ._mm256_permutevar8x32_ps(pulp::cast::<_, __m256>(high), split);
        let mut even: [f32; 8] = pulp::cast(v3.avx._mm256_permute2f128_ps::<0x20>(low, high));
        if b + 1 == blocks {
            // Zeros past the copy, selected in registers: a fill of the
            // few values there was a library call per row.
            for (l, e) in even.iter_mut().enumerate() {
                *e = if l < last { *e } else { 0.0 };
            }
        }
        d.copy_from_slice(&even);
    }
    true
}

/// im2col for the output rows `ys`: one row per (channel, ky, kx), one
/// column per output pixel of those rows, zeros where the window reads
/// padding. Written into `cols`, reused between calls. `src` holds the
/// channels' planes and may go on past them (a stride-2 copy reads whole
/// vectors).
fn im2col_rows(
    src: &[f32],
    channels: usize,
    g: &Geometry,
    ys: std::ops::Range<usize>,
    cols: &mut Vec<f32>,
) {
    pulp::Arch::new().dispatch(Im2colRows {
        src,
        channels,
        g,
        ys,
        cols,
    });
}

/// [`im2col_rows`], compiled for the vector unit found at run time.
struct Im2colRows<'a> {
    src: &'a [f32],
    channels: usize,
    g: &'a Geometry,
    ys: std::ops::Range<usize>,
    cols: &'a mut Vec<f32>,
}

impl pulp::WithSimd for Im2colRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Im2colRows {
            src,
            channels,
            g,
            ys,
            cols,
        } = self;
        let shuffles = shuffles();
        let width = ys.len() * g.ow;
        cols.clear();
        cols.resize(channels * g.kh * g.kw * width, 0.0);
        if width == 0 {
            return;
        }
        let spans: Vec<_> = (0..g.kw).map(|j| g.column_range(j)).collect();
        let in_plane = g.h * g.w;
        // Rows are written in increasing order, into zeros.
        for ci in 0..channels {
            let block = ci * g.kh * g.kw * width;
            let input = &src[ci * in_plane..];
            for i in 0..g.kh {
                for (j, &(first, end, from)) in spans.iter().enumerate() {
                    if first == end {
                        continue;
                    }
                    let row = block + (i * g.kw + j) * width;
                    for (y, at) in ys.clone().zip((row..).step_by(g.ow)) {
                        let Some(r) = g.input_row(y, i) else { continue };
                        copy_strided(
                            shuffles,
                            input,
                            r * g.w + from,
                            g.sw,
                            cols,
                            at + first,
                            end - first,
                        );
                    }
                }
            }
        }
    }
}

/// Conv's gradient. The bias gets the output's gradient summed per channel.
/// Otherwise per (image, group), as the forward: the weights get
/// `dY cols^T` summed over the images in order, the input `col2im(W^T dY)`;
/// depthwise convolutions run direct loops per plane instead.
pub fn conv_backward(cx: &OpCtx, grads_in: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; grads_in.inputs.len()];
    let x = f32_input(cx, grads_in.inputs, 0)?;
    let w = f32_input(cx, grads_in.inputs, 1)?;
    let s = ConvShape::read(cx, x.shape(), w.shape())?;
    let geo = &s.g;
    let (plane, in_plane) = (geo.oh * geo.ow, s.h * s.w);
    let k = s.cg * geo.kh * geo.kw;
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let w = w.as_standard_layout();
    let ws = w.as_slice().expect("standard layout");
    let d = grads_in.d_output(cx, 0)?;
    let ds = d.as_slice().expect("standard layout");
    if grads_in.wants(2) {
        let db: Vec<f32> = (0..s.m)
            .into_par_iter()
            .map(|oc| {
                let total: f64 = (0..s.n)
                    .map(|b| ds[(b * s.m + oc) * plane..][..plane].iter().sum::<f32>() as f64)
                    .sum();
                total as f32
            })
            .collect();
        grads[2] = Some(Tensor::F32(array(&[s.m], db)));
    }
    if s.depthwise {
        if grads_in.wants(1) {
            let dw = depthwise::weight_gradient(xs, ds, geo, s.n, s.m);
            grads[1] = Some(Tensor::F32(array(w.shape(), dw)));
        }
        if grads_in.wants(0) {
            let mut dx = vec![0f32; xs.len()];
            depthwise::input_gradient(ds, ws, geo, s.m, &mut dx);
            grads[0] = Some(Tensor::F32(array(x.shape(), dx)));
        }
        return Ok(grads);
    }
    let (cg, mg) = (s.cg, s.mg);
    if grads_in.wants(1) {
        // Per group, partial sums over fixed chunks of images in parallel,
        // then the chunks added in order: the chunks come from the batch
        // alone, so the result does not depend on the thread count.
        let chunk = IMAGES_PER_WEIGHT_GRADIENT_TASK;
        let chunks = s.n.div_ceil(chunk).max(1);
        let partial: Vec<Vec<f32>> = (0..s.group * chunks)
            .into_par_iter()
            .map(|task| {
                let (gi, part) = (task / chunks, task % chunks);
                let mut acc = vec![0f32; mg * k];
                let mut columns = Vec::new();
                for b in part * chunk..((part + 1) * chunk).min(s.n) {
                    let src = &xs[(b * s.c + gi * cg) * in_plane..];
                    let dy = MatRef::row_major(&ds[(b * s.m + gi * mg) * plane..], mg, plane);
                    let cols = if s.pointwise {
                        MatRef::row_major(src, cg, plane)
                    } else {
                        im2col_rows(src, cg, geo, 0..geo.oh, &mut columns);
                        MatRef::row_major(&columns, k, plane)
                    };
                    let first = b == part * chunk;
                    gemm(
                        &mut acc,
                        k,
                        dy,
                        cols.transposed(),
                        1.0,
                        !first,
                        Threads::One,
                    );
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; s.m * k];
        for (gi, dst) in dw.chunks_mut((mg * k).max(1)).enumerate() {
            for p in &partial[gi * chunks..(gi + 1) * chunks] {
                dst.iter_mut().zip(p).for_each(|(d, v)| *d += v);
            }
        }
        grads[1] = Some(Tensor::F32(array(w.shape(), dw)));
    }
    if grads_in.wants(0) {
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut((cg * in_plane).max(1))
            .enumerate()
            .for_each(|(image_group, dst)| {
                let (b, gi) = (image_group / s.group, image_group % s.group);
                let wg = MatRef::row_major(&ws[gi * mg * k..], mg, k);
                let dy = MatRef::row_major(&ds[(b * s.m + gi * mg) * plane..], mg, plane);
                if s.pointwise {
                    gemm(dst, plane, wg.transposed(), dy, 1.0, false, Threads::One);
                    return;
                }
                let mut dcols = vec![0f32; k * plane];
                gemm(
                    &mut dcols,
                    plane,
                    wg.transposed(),
                    dy,
                    1.0,
                    false,
                    Threads::One,
                );
                for (ci, block) in dcols.chunks(geo.kh * geo.kw * plane).enumerate() {
                    let dst = &mut dst[ci * in_plane..][..in_plane];
                    for_each_tap(geo, |tap, oy, out_cols, in_start| {
                        let row = &block[tap * plane + oy * geo.ow..][out_cols];
                        strided_add(&mut dst[in_start..], geo.sw, row, 1.0);
                    });
                }
            });
        grads[0] = Some(Tensor::F32(array(x.shape(), dx)));
    }
    Ok(grads)
}

/// `dst[t * stride] += w * row[t]`.
#[inline(always)]
fn strided_add(dst: &mut [f32], stride: usize, row: &[f32], w: f32) {
    if stride == 1 {
        for (d, &v) in dst[..row.len()].iter_mut().zip(row) {
            *d += w * v;
        }
        return;
    }
    for (d, &v) in dst.iter_mut().step_by(stride).zip(row) {
        *d += w * v;
    }
}

/// Images whose weight gradients one task sums before the tasks' sums are
/// added: enough parallel tasks at training batch sizes, few partial sums.
const IMAGES_PER_WEIGHT_GRADIENT_TASK: usize = 4;

/// Visits every (kernel tap, output row) whose window reads inside the
/// input: `f(tap, output row, output columns, input offset of the first
/// of those columns)`; column `t` of the range reads offset
/// `start + t * sw`.
fn for_each_tap(g: &Geometry, mut f: impl FnMut(usize, usize, std::ops::Range<usize>, usize)) {
    for i in 0..g.kh {
        for j in 0..g.kw {
            let (first, end, from) = g.column_range(j);
            if first == end {
                continue;
            }
            for oy in 0..g.oh {
                if let Some(r) = g.input_row(oy, i) {
                    f(i * g.kw + j, oy, first..end, r * g.w + from);
                }
            }
        }
    }
}

/// ConvTranspose (2-D): each input pixel scatters its kernel into the output.
/// With `output_shape`, the pads follow from it as the spec says.
pub fn conv_transpose(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let w = f32_input(cx, inputs, 1)?;
    if x.ndim() != 4 || w.ndim() != 4 {
        return cx.err(format!(
            "only 2-D transposed convolution is implemented (input rank {})",
            x.ndim()
        ));
    }
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (cw, mg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    let group = cx.int_attr("group", 1)?;
    if group < 1 || cw != c || c % group as usize != 0 {
        return cx.err(format!(
            "weights {:?} do not fit {c} input channels and group {group}",
            w.shape()
        ));
    }
    let group = group as usize;
    let (cg, m) = (c / group, mg * group);
    let ints = |name: &str, default: i64| -> Result<Vec<i64>, EvalError> {
        Ok(cx.ints_attr(name)?.unwrap_or(vec![default; 2]))
    };
    let strides = ints("strides", 1)?;
    let dilations = ints("dilations", 1)?;
    let out_pad = ints("output_padding", 0)?;
    if strides.len() != 2
        || dilations.len() != 2
        || out_pad.len() != 2
        || strides.iter().chain(&dilations).any(|&v| v < 1)
    {
        return cx.err(
            "strides, dilations and output_padding need 2 values (strides and dilations positive)",
        );
    }
    let input = [h as i64, wd as i64];
    let kernel = [kh as i64, kw as i64];
    let full: Vec<i64> = (0..2)
        .map(|d| strides[d] * (input[d] - 1) + out_pad[d] + (kernel[d] - 1) * dilations[d] + 1)
        .collect();
    let auto_pad = cx.string_attr("auto_pad", "NOTSET")?;
    let (mut begin, mut end) = (vec![0i64; 2], vec![0i64; 2]);
    let output_shape = cx.ints_attr("output_shape")?;
    if output_shape.is_some() || auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER" {
        let target: Vec<i64> = match &output_shape {
            Some(s) if s.len() >= 2 => s[s.len() - 2..].to_vec(),
            Some(_) => return cx.err("output_shape needs the 2 spatial sizes"),
            None => (0..2).map(|d| input[d] * strides[d]).collect(),
        };
        for d in 0..2 {
            let total = full[d] - target[d];
            if total < 0 {
                return cx.err(format!(
                    "output_shape {target:?} is larger than the full output {full:?}"
                ));
            }
            (begin[d], end[d]) = if auto_pad == "SAME_UPPER" {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            };
        }
    } else if let Some(p) = cx.ints_attr("pads")? {
        if p.len() != 4 || p.iter().any(|&v| v < 0) {
            return cx.err("pads need 4 non-negative values");
        }
        (begin, end) = (vec![p[0], p[1]], vec![p[2], p[3]]);
    }
    let (oh, ow) = (full[0] - begin[0] - end[0], full[1] - begin[1] - end[1]);
    if oh <= 0 || ow <= 0 {
        return cx.err("the pads remove the whole output");
    }
    let (oh, ow) = (oh as usize, ow as usize);
    let bias = match inputs.get(2).copied().flatten() {
        Some(Tensor::F32(b)) if b.len() == m => Some(b.iter().copied().collect::<Vec<f32>>()),
        Some(t) => {
            return cx.err(format!(
                "bias must be f32 with {m} values, found {}{:?}",
                t.dtype(),
                t.shape()
            ))
        }
        None => None,
    };
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    let ws = w.as_standard_layout();
    let ws = ws.as_slice().expect("standard layout");
    let mut out = vec![0f32; n * m * oh * ow];
    out.par_chunks_mut((oh * ow).max(1))
        .enumerate()
        .for_each(|(plane_i, dst)| {
            let (b, oc) = (plane_i / m, plane_i % m);
            let (g, o) = (oc / mg, oc % mg);
            for ci in 0..cg {
                let ic = g * cg + ci;
                let src = &xs[(b * c + ic) * h * wd..][..h * wd];
                let ker = &ws[(ic * mg + o) * kh * kw..][..kh * kw];
                for iy in 0..h {
                    for ix in 0..wd {
                        let v = src[iy * wd + ix];
                        for ky in 0..kh {
                            let y =
                                (iy as i64) * strides[0] + (ky as i64) * dilations[0] - begin[0];
                            if y < 0 || y >= oh as i64 {
                                continue;
                            }
                            for kx in 0..kw {
                                let xo = (ix as i64) * strides[1] + (kx as i64) * dilations[1]
                                    - begin[1];
                                if xo >= 0 && xo < ow as i64 {
                                    dst[y as usize * ow + xo as usize] += v * ker[ky * kw + kx];
                                }
                            }
                        }
                    }
                }
            }
            if let Some(bias) = &bias {
                dst.iter_mut().for_each(|d| *d += bias[oc]);
            }
        });
    Ok(vec![Tensor::F32(array(&[n, m, oh, ow], out))])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The written-out AVX dot products and the portable ones give the
    /// same lanes, bit for bit (values with whole mantissas, so that an
    /// unfused multiply-add or another order would show).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn narrow_dot_products_do_not_depend_on_the_vector_unit() {
        let Some(v3) = pulp::x86::V3::try_new() else {
            eprintln!("SKIPPED: no AVX2 here");
            return;
        };
        let mut seed = 0;
        let mut values = |count: usize| {
            seed += 1;
            super::super::test_values(count, seed)
        };
        for k in [8, 64, 1152] {
            let (r0, r1, x) = (values(k), values(k), values(k));
            let avx = dot_lanes_avx(v3, [&r0, &r1], &x);
            let portable = dot_lanes([&r0, &r1], &x);
            for (a, p) in avx.iter().flatten().zip(portable.iter().flatten()) {
                assert_eq!(a.to_bits(), p.to_bits(), "k = {k}");
            }
        }
    }
}
