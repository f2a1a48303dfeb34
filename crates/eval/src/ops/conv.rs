//! Convolution: im2col + matrix product per group, a direct kernel for
//! depthwise convolution, and the window arithmetic shared with pooling.

use super::gemm::{gemm, MatRef, Threads};
use super::pointwise::Epilogue;
use super::{array, f32_input};
use crate::{EvalError, OpCtx};
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
    if x.ndim() != 4 || w.ndim() != 4 {
        return cx.err(format!(
            "only 2-D convolution is implemented (input rank {})",
            x.ndim()
        ));
    }
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (m, cg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    if kh == 0 || kw == 0 {
        return cx.err(format!("the kernel {:?} is empty", w.shape()));
    }
    let group = cx.int_attr("group", 1)?;
    if group < 1 || c % group as usize != 0 || m % group as usize != 0 || c / group as usize != cg {
        return cx.err(format!(
            "group {group} does not fit {c} input channels, weights {:?}",
            w.shape()
        ));
    }
    let group = group as usize;
    let mg = m / group;
    let win = window(cx, &[h, wd], Some(vec![kh, kw]), false)?;
    let (oh, ow) = (win.out[0], win.out[1]);
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
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let w = w.as_standard_layout();
    let ws = w.as_slice().expect("standard layout");
    let geometry = Geometry {
        h,
        w: wd,
        kh,
        kw,
        oh,
        ow,
        sh: win.strides[0],
        sw: win.strides[1],
        dh: win.dilations[0],
        dw: win.dilations[1],
        ph: win.pad_begin[0],
        pw: win.pad_begin[1],
    };
    let depthwise = cg == 1 && mg == 1;
    let pointwise = kh == 1
        && kw == 1
        && geometry.sh == 1
        && geometry.sw == 1
        && win.pad_begin.iter().chain(&win.pad_end).all(|&p| p == 0);
    let k = cg * kh * kw;
    let plane = oh * ow;
    let tasks = n * group;
    // One task per (image, group): their outputs are disjoint blocks. With
    // enough of them every thread has work; otherwise each matrix product
    // splits itself. The product gives the same bits either way.
    let parallel_tasks = tasks >= rayon::current_num_threads();
    let inner = if parallel_tasks {
        Threads::One
    } else {
        Threads::Pool
    };
    // The loops below are compiled for the best vector unit found at run
    // time; they are plain loads, multiplies and adds, so the values are the
    // same on every unit.
    let simd = pulp::Arch::new();
    let layout = PaddedLayout::new(&geometry);
    let task = |(task, dst): (usize, &mut [f32])| {
        let (b, g) = (task / group, task % group);
        let src = &xs[(b * c + g * cg) * h * wd..][..cg * h * wd];
        let wg = MatRef::row_major(&ws[g * mg * k..][..mg * k], mg, k);
        if depthwise {
            let ker = &ws[g * kh * kw..][..kh * kw];
            dst.fill(0.0);
            simd.dispatch(Depthwise {
                src,
                ker,
                g: &geometry,
                layout: &layout,
                dst,
            });
        } else if pointwise {
            // A 1x1 convolution without stride or padding is a product with
            // the input planes as they are.
            let rhs = MatRef::row_major(src, cg, plane);
            gemm(dst, plane, wg, rhs, 1.0, false, inner);
        } else {
            let cols = im2col(src, cg, &geometry);
            let rhs = MatRef::row_major(&cols, k, plane);
            gemm(dst, plane, wg, rhs, 1.0, false, inner);
        }
        let finish = |(oc, out_plane): (usize, &mut [f32])| {
            let channel = g * mg + oc;
            if let Some(bias) = &bias {
                let bv = bias[channel];
                out_plane.iter_mut().for_each(|v| *v += bv);
            }
            simd.dispatch(Epilogue {
                maps: cx.epilogue,
                channel,
                data: out_plane,
            });
        };
        // Per output channel; in parallel when the tasks are not.
        if parallel_tasks {
            dst.chunks_mut(plane.max(1)).enumerate().for_each(finish);
        } else {
            dst.par_chunks_mut(plane.max(1))
                .enumerate()
                .for_each(finish);
        }
    };
    // Every element is written below: products overwrite, depthwise blocks
    // start from zeros.
    let mut out = cx.buffers.take(n * m * plane);
    let block = (mg * plane).max(1);
    if parallel_tasks {
        out.par_chunks_mut(block).enumerate().for_each(task);
    } else {
        out.chunks_mut(block).enumerate().for_each(task);
    }
    Ok(vec![Tensor::F32(array(&[n, m, oh, ow], out))])
}

/// The sizes of one 2-D convolution: input plane, kernel, output plane,
/// strides, dilations and leading pads.
struct Geometry {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    ph: usize,
    pw: usize,
}

impl Geometry {
    /// The input row read by output row `y` at kernel row `i`, if inside.
    fn input_row(&self, y: usize, i: usize) -> Option<usize> {
        (y * self.sh + i * self.dh)
            .checked_sub(self.ph)
            .filter(|&r| r < self.h)
    }

    /// For kernel column `j`: output column `x` reads input column
    /// `x * sw + j * dw - pw`. Splitting the input row into `sw` phases
    /// (`phase[t] = row[t * sw + p]`), that is element `x + shift` of phase
    /// `p`. Returns (p, shift, first x, end x) with every read inside.
    fn column_span(&self, j: usize) -> (usize, isize, usize, usize) {
        let sw = self.sw as isize;
        let offset = (j * self.dw) as isize - self.pw as isize;
        let phase = offset.rem_euclid(sw);
        let shift = offset.div_euclid(sw);
        let phase_len = (self.w as isize - phase + sw - 1).div_euclid(sw);
        let first = (-shift).clamp(0, self.ow as isize) as usize;
        let end = (phase_len - shift).clamp(0, self.ow as isize) as usize;
        (phase as usize, shift, first, end.max(first))
    }
}

/// Splits each row of `plane` into its `stride` phases, one after the
/// other: row r's phase p holds `plane[r][p], plane[r][p + stride], ...`.
/// With stride 1 this is the plane itself.
fn phases(plane: &[f32], g: &Geometry) -> Vec<f32> {
    let mut out = Vec::with_capacity(plane.len());
    for row in plane.chunks(g.w.max(1)) {
        for p in 0..g.sw {
            out.extend(row.iter().skip(p).step_by(g.sw));
        }
    }
    out
}

/// The start of phase `p` of row `r` in the output of [`phases`].
fn phase_start(g: &Geometry, r: usize, p: usize) -> usize {
    let before: usize = (0..p).map(|q| (g.w - q).div_ceil(g.sw)).sum();
    r * g.w + before
}

/// [`depthwise_plane`] as a `pulp` operation, compiled once per vector
/// unit and chosen at run time.
struct Depthwise<'a> {
    src: &'a [f32],
    ker: &'a [f32],
    g: &'a Geometry,
    layout: &'a PaddedLayout,
    dst: &'a mut [f32],
}

impl pulp::WithSimd for Depthwise<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        depthwise_plane(self.src, self.ker, self.g, self.layout, self.dst);
    }
}

/// A depthwise convolution of one plane. The plane is first copied with
/// its zero padding, each row split into its `sw` phases (phase p holds
/// columns p, p + sw, ...), so that every tap of an output row reads a
/// contiguous run without bounds tests, which the compiler vectorises; a tap
/// over padding adds a product with zero, which leaves the sum unchanged.
/// Each output receives its taps in kernel order.
#[inline(always)]
fn depthwise_plane(src: &[f32], ker: &[f32], g: &Geometry, layout: &PaddedLayout, dst: &mut [f32]) {
    SCRATCH.with(|scratch| {
        let mut padded = scratch.borrow_mut();
        depthwise_plane_in(src, ker, g, layout, dst, &mut padded);
    });
}

thread_local! {
    /// Each worker's padded plane, reused from plane to plane.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where a plane goes in its padded, phase-split copy; the same for every
/// plane of one convolution, so computed once.
struct PaddedLayout {
    rows: usize,
    cols: usize,
    /// Per phase: (to, from, count): `count` input columns from `from`,
    /// every sw-th, go to `to` in the padded row.
    copies: Vec<(usize, usize, usize)>,
    /// Where tap j of an output row starts in its padded row.
    tap_start: Vec<usize>,
}

impl PaddedLayout {
    fn new(g: &Geometry) -> PaddedLayout {
        // The padded extent the windows reach.
        let rows = g.oh.saturating_sub(1) * g.sh + (g.kh - 1) * g.dh + 1;
        let cols = g.ow.saturating_sub(1) * g.sw + (g.kw - 1) * g.dw + 1;
        let phase_len = |p: usize| cols.saturating_sub(p).div_ceil(g.sw);
        let mut phase_start = vec![0usize; g.sw];
        for p in 1..g.sw {
            phase_start[p] = phase_start[p - 1] + phase_len(p - 1);
        }
        // Padded column p + t * sw is input column p + t * sw - pw.
        let copies = (0..g.sw)
            .filter_map(|p| {
                let first = g.pw.saturating_sub(p).div_ceil(g.sw);
                let from = (p + first * g.sw).checked_sub(g.pw)?;
                let count = phase_len(p)
                    .saturating_sub(first)
                    .min(g.w.saturating_sub(from).div_ceil(g.sw));
                Some((phase_start[p] + first, from, count))
            })
            .collect();
        let tap_start = (0..g.kw)
            .map(|j| phase_start[(j * g.dw) % g.sw] + (j * g.dw) / g.sw)
            .collect();
        PaddedLayout {
            rows,
            cols,
            copies,
            tap_start,
        }
    }
}

#[inline(always)]
fn depthwise_plane_in(
    src: &[f32],
    ker: &[f32],
    g: &Geometry,
    layout: &PaddedLayout,
    dst: &mut [f32],
    padded: &mut Vec<f32>,
) {
    let (rows, cols) = (layout.rows, layout.cols);
    let (copies, tap_start) = (&layout.copies, &layout.tap_start);
    padded.clear();
    padded.resize(rows * cols, 0.0);
    for (pr, row) in padded.chunks_exact_mut(cols).enumerate() {
        let Some(r) = pr.checked_sub(g.ph).filter(|&r| r < g.h) else {
            continue;
        };
        let input = &src[r * g.w..][..g.w];
        for &(to, from, count) in copies {
            let out = &mut row[to..][..count];
            if g.sw == 1 {
                out.copy_from_slice(&input[from..][..count]);
            } else {
                for (t, d) in out.iter_mut().enumerate() {
                    *d = input[from + t * g.sw];
                }
            }
        }
    }
    let n = g.ow;
    let row_at = |y: usize, i: usize| &padded[(y * g.sh + i * g.dh) * cols..][..cols];
    if g.kh == 3 && g.kw == 3 {
        let t = [tap_start[0], tap_start[1], tap_start[2]];
        for y in 0..g.oh {
            let rows = [row_at(y, 0), row_at(y, 1), row_at(y, 2)];
            kernel_3x3(&mut dst[y * n..][..n], ker, rows, t);
        }
        return;
    }
    for y in 0..g.oh {
        let drow = &mut dst[y * g.ow..][..g.ow];
        for i in 0..g.kh {
            let row = &padded[(y * g.sh + i * g.dh) * cols..][..cols];
            let w = &ker[i * g.kw..][..g.kw];
            let n = g.ow;
            let tap = |j: usize| &row[tap_start[j]..][..n];
            match g.kw {
                3 => kernel_row3(drow, w, tap(0), tap(1), tap(2)),
                5 => kernel_row5(drow, w, [tap(0), tap(1), tap(2), tap(3), tap(4)]),
                _ => {
                    for (j, &wv) in w.iter().enumerate() {
                        for (d, s) in drow.iter_mut().zip(&row[tap_start[j]..]) {
                            *d += wv * s;
                        }
                    }
                }
            }
        }
    }
}

/// A whole 3x3 kernel over one output row, the sum kept in a register:
/// `d += w[0] * r0[t0]; d += w[1] * r0[t1]; ...`, the order of the
/// row-by-row loop (kernel row, then column).
#[inline(always)]
fn kernel_3x3(out: &mut [f32], w: &[f32], rows: [&[f32]; 3], t: [usize; 3]) {
    let n = out.len();
    let w: &[f32; 9] = w[..9].try_into().expect("9 weights");
    let tap = |i: usize, j: usize| &rows[i][t[j]..][..n];
    let (a0, a1, a2) = (tap(0, 0), tap(0, 1), tap(0, 2));
    let (b0, b1, b2) = (tap(1, 0), tap(1, 1), tap(1, 2));
    let (c0, c1, c2) = (tap(2, 0), tap(2, 1), tap(2, 2));
    for x in 0..n {
        let mut acc = out[x];
        acc += w[0] * a0[x];
        acc += w[1] * a1[x];
        acc += w[2] * a2[x];
        acc += w[3] * b0[x];
        acc += w[4] * b1[x];
        acc += w[5] * b2[x];
        acc += w[6] * c0[x];
        acc += w[7] * c1[x];
        acc += w[8] * c2[x];
        out[x] = acc;
    }
}

/// One kernel row of 3 taps added to an output row, the sum kept in a
/// register: `d += w0 * a; d += w1 * b; d += w2 * c`, the order of a
/// tap-by-tap loop.
#[inline(always)]
fn kernel_row3(out: &mut [f32], w: &[f32], a: &[f32], b: &[f32], c: &[f32]) {
    let n = out.len();
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let (w0, w1, w2) = (w[0], w[1], w[2]);
    for x in 0..n {
        let mut acc = out[x];
        acc += w0 * a[x];
        acc += w1 * b[x];
        acc += w2 * c[x];
        out[x] = acc;
    }
}

/// [`kernel_row3`] for 5 taps.
#[inline(always)]
fn kernel_row5(out: &mut [f32], w: &[f32], t: [&[f32]; 5]) {
    let n = out.len();
    let (t0, t1, t2, t3, t4) = (&t[0][..n], &t[1][..n], &t[2][..n], &t[3][..n], &t[4][..n]);
    let (w0, w1, w2, w3, w4) = (w[0], w[1], w[2], w[3], w[4]);
    for x in 0..n {
        let mut acc = out[x];
        acc += w0 * t0[x];
        acc += w1 * t1[x];
        acc += w2 * t2[x];
        acc += w3 * t3[x];
        acc += w4 * t4[x];
        out[x] = acc;
    }
}

/// im2col: one row per (channel, ky, kx), one column per output pixel,
/// zeros where the window reads padding.
fn im2col(src: &[f32], channels: usize, g: &Geometry) -> Vec<f32> {
    let plane = g.oh * g.ow;
    let mut cols = vec![0f32; channels * g.kh * g.kw * plane];
    let spans: Vec<_> = (0..g.kw).map(|j| g.column_span(j)).collect();
    for (ci, block) in cols.chunks_mut((g.kh * g.kw * plane).max(1)).enumerate() {
        let input = &src[ci * g.h * g.w..][..g.h * g.w];
        let split;
        let rows = if g.sw == 1 {
            input
        } else {
            split = phases(input, g);
            &split[..]
        };
        for i in 0..g.kh {
            for (j, &(p, shift, first, end)) in spans.iter().enumerate() {
                let row = &mut block[(i * g.kw + j) * plane..][..plane];
                for (y, drow) in row.chunks_mut(g.ow.max(1)).enumerate() {
                    let Some(r) = g.input_row(y, i) else { continue };
                    let start = (phase_start(g, r, p) as isize + first as isize + shift) as usize;
                    drow[first..end].copy_from_slice(&rows[start..][..end - first]);
                }
            }
        }
    }
    cols
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
