//! Depthwise convolution (one input and one output channel per group):
//! direct loops over a padded, phase-split copy of each plane, for the
//! forward pass and for both gradients; narrow planes go forward through
//! [`super::depthwise_blocked`].

use super::conv::{copy_strided, shuffles, Geometry};
use super::pointwise::{apply_maps, MapValue, Pointwise, Unchanged, ValueMap, WithValueMap};
use rayon::prelude::*;

/// What a depthwise forward pass reads: the input planes (images x
/// `channels`), each channel's kernel and bias, the epilogue, and what a
/// fused Add adds (the whole output's worth).
#[derive(Clone, Copy)]
pub(super) struct Forward<'a> {
    pub(super) src: &'a [f32],
    pub(super) weights: &'a [f32],
    pub(super) bias: Option<&'a [f32]>,
    pub(super) epilogue: &'a [Pointwise],
    pub(super) added: Option<&'a [f32]>,
    pub(super) g: &'a Geometry,
    pub(super) channels: usize,
}

/// The forward pass of every plane into `out`, with bias, epilogue and a
/// fused Add applied while each plane is in cache.
pub(super) fn forward(inputs: Forward, out: &mut [f32]) {
    if super::depthwise_blocked::suits(inputs.g) {
        super::depthwise_blocked::forward(inputs, out);
    } else {
        flat(inputs, out);
    }
}

/// [`forward`] over the padded, phase-split copy of each plane.
pub(super) fn flat(inputs: Forward, out: &mut [f32]) {
    let g = inputs.g;
    let simd = pulp::Arch::new();
    let plane = g.oh * g.ow;
    let per_task = planes_per_task(out.len(), plane);
    let layout = PaddedLayout::new(g);
    out.par_chunks_mut(per_task * plane.max(1))
        .enumerate()
        .for_each(|(t, dst)| {
            SCRATCH.with(|scratch| {
                simd.dispatch(Depthwise {
                    first_plane: t * per_task,
                    inputs,
                    layout: &layout,
                    dst,
                    // Borrowed before dispatching: code in a closure (as
                    // `with` takes) is not compiled for the vector unit.
                    scratch: &mut scratch.borrow_mut(),
                })
            })
        });
}

/// Planes of `plane` values each task takes out of `len` values: each plane
/// is independent; tasks take several small ones, so that per-task costs
/// do not dominate the 7x7 planes, but stay many enough to share out.
fn planes_per_task(len: usize, plane: usize) -> usize {
    let planes = len / plane.max(1);
    (16384 / plane.max(1))
        .min(planes / (8 * rayon::current_num_threads()))
        .max(1)
}

/// Depthwise planes `first_plane..` (plane = image * channels + channel)
/// into `dst`, each with its bias and epilogue while it is in cache; a
/// `pulp` operation, compiled once per vector unit and chosen at run time.
struct Depthwise<'a> {
    first_plane: usize,
    inputs: Forward<'a>,
    layout: &'a PaddedLayout,
    dst: &'a mut [f32],
    scratch: &'a mut Scratch,
}

impl pulp::WithSimd for Depthwise<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Forward {
            src: planes,
            weights,
            bias: biases,
            epilogue,
            added,
            g,
            channels,
        } = self.inputs;
        let (in_plane, taps) = (g.h * g.w, g.kh * g.kw);
        let out_plane = (g.oh * g.ow).max(1);
        self.scratch.prepare(g, self.layout);
        for (i, dst) in self.dst.chunks_mut(out_plane).enumerate() {
            let plane = self.first_plane + i;
            let channel = plane % channels;
            // The plane and what follows it (see `fill_padded`).
            let src = &planes[plane * in_plane..];
            let ker = &weights[channel * taps..][..taps];
            let bias = biases.map(|b| b[channel]);
            let finish = Finish {
                bias,
                epilogue,
                channel,
            };
            let layout = self.layout;
            match (added, ValueMap::new(bias, epilogue, channel)) {
                // The common epilogues are applied to each sum as it is
                // stored.
                (None, Some(map)) => map.dispatch(PlaneWithMap {
                    src,
                    ker,
                    g,
                    layout,
                    dst,
                    scratch: self.scratch,
                }),
                (None, None) => depthwise_plane(
                    src,
                    ker,
                    g,
                    layout,
                    dst,
                    self.scratch,
                    Unchanged,
                    Some(&finish),
                ),
                // The sums are not laid out as the output; the Add needs
                // them stored first.
                (Some(added), _) => {
                    depthwise_plane(src, ker, g, layout, dst, self.scratch, Unchanged, None);
                    let added = &added[plane * out_plane..][..dst.len()];
                    finish.apply(dst, Some(added));
                }
            }
        }
    }
}

/// [`depthwise_plane`] with a [`ValueMap`] compiled for its form.
struct PlaneWithMap<'a> {
    src: &'a [f32],
    ker: &'a [f32],
    g: &'a Geometry,
    layout: &'a PaddedLayout,
    dst: &'a mut [f32],
    scratch: &'a mut Scratch,
}

impl WithValueMap for PlaneWithMap<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MapValue>(self, map: M) {
        depthwise_plane(
            self.src,
            self.ker,
            self.g,
            self.layout,
            self.dst,
            self.scratch,
            map,
            None,
        );
    }
}

/// What follows a depthwise plane's sums: its bias, then the epilogue.
struct Finish<'a> {
    bias: Option<f32>,
    epilogue: &'a [Pointwise],
    channel: usize,
}

impl Finish<'_> {
    /// A method, not a closure: closures are not compiled for the vector
    /// unit of the function that calls them.
    #[inline(always)]
    fn apply(&self, sums: &mut [f32], added: Option<&[f32]>) {
        if let Some(bv) = self.bias {
            sums.iter_mut().for_each(|v| *v += bv);
        }
        apply_maps(self.epilogue, self.channel, sums, added);
    }
}

/// A worker's buffers for depthwise planes, reused from plane to plane.
#[derive(Default)]
struct Scratch {
    /// The padded, phase-split input plane.
    padded: Vec<f32>,
    /// An output plane's gradient laid out as the sums (see
    /// [`PaddedLayout::front`]).
    wide: Vec<f32>,
    /// The geometry whose zeros `padded` and `wide` hold.
    zeroed_for: Option<Geometry>,
    /// Sums over whole vectors, before the valid columns are copied out;
    /// in the backward pass, the gradient of `padded`.
    sums: Vec<f32>,
    /// The weights of one phase's taps.
    phase_weights: Vec<f32>,
}

impl Scratch {
    /// Zeroes `padded` and `wide` once per worker and geometry: each plane
    /// overwrites only the inside, the same places for every plane, so the
    /// padding stays zero.
    #[inline(always)]
    fn prepare(&mut self, g: &Geometry, layout: &PaddedLayout) {
        if self.zeroed_for == Some(*g) {
            return;
        }
        self.padded.clear();
        self.padded.resize(layout.len + LANES, 0.0);
        self.wide.clear();
        self.wide
            .resize(layout.front + layout.phase_len + LANES, 0.0);
        self.zeroed_for = Some(*g);
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Where a plane goes in its padded, phase-split copy; the same for every
/// plane of one convolution, so computed once.
///
/// The padded plane is cut into `sh x sw` phase planes: phase (p, q) holds
/// padded rows p, p + sh, ... and of those the columns q, q + sw, ... Tap
/// (i, j) of output (y, x) reads padded element (y sh + i dh, x sw + j dw),
/// which is element (y + i dh / sh, x + j dw / sw) of phase
/// (i dh % sh, j dw % sw). Every phase plane is `cols` wide, so that element
/// sits at `offsets[tap] + y * cols + x`: one flat run per tap covers the
/// whole output plane, whatever the stride, and only `cols - ow` columns
/// per row are computed and discarded.
struct PaddedLayout {
    /// Values in all phase planes together.
    len: usize,
    /// Width of every phase plane.
    cols: usize,
    /// Row copies: `count` input values from `from`, every sw-th, go to
    /// `to` onwards.
    copies: Vec<RowCopy>,
    /// Where tap (i, j) of output (0, 0) is.
    offsets: Vec<usize>,
    /// Values in one phase plane.
    phase_len: usize,
    /// The phases some tap reads, with their taps.
    phases: Vec<Phase>,
    /// The largest offset of a tap inside its phase: the zeros an output
    /// gradient plane gets in front in `Scratch::wide`, so that the
    /// backward pass reads it at every tap's offset back from a phase's
    /// start.
    front: usize,
}

/// One phase plane and the taps that read it, in kernel order.
struct Phase {
    start: usize,
    taps: Vec<usize>,
    /// Each tap's offset from `start`.
    offsets: Vec<usize>,
}

#[derive(Clone, Copy)]
struct RowCopy {
    to: usize,
    from: usize,
    count: usize,
}

impl PaddedLayout {
    fn new(g: &Geometry) -> PaddedLayout {
        let (oh, ow) = (g.oh.max(1), g.ow.max(1));
        let rows = oh + ((g.kh - 1) * g.dh) / g.sh;
        let cols = ow + ((g.kw - 1) * g.dw) / g.sw;
        let phase_len = rows * cols;
        let phase_start = |p: usize, q: usize| (p * g.sw + q) * phase_len;
        // Only the phases some tap reads are filled.
        let mut row_phases: Vec<usize> = (0..g.kh).map(|i| (i * g.dh) % g.sh).collect();
        let mut col_phases: Vec<usize> = (0..g.kw).map(|j| (j * g.dw) % g.sw).collect();
        row_phases.sort_unstable();
        row_phases.dedup();
        col_phases.sort_unstable();
        col_phases.dedup();
        let mut copies = Vec::new();
        for &p in &row_phases {
            for &q in &col_phases {
                // Phase column t is padded column q + t sw, input column
                // q + t sw - pw: the first t inside, and how many are.
                let first = g.pw.saturating_sub(q).div_ceil(g.sw);
                let Some(from) = (q + first * g.sw).checked_sub(g.pw) else {
                    continue;
                };
                let count = cols
                    .saturating_sub(first)
                    .min(g.w.saturating_sub(from).div_ceil(g.sw));
                if count == 0 {
                    continue;
                }
                for t in 0..rows {
                    let Some(r) = (p + t * g.sh).checked_sub(g.ph).filter(|&r| r < g.h) else {
                        continue;
                    };
                    copies.push(RowCopy {
                        to: phase_start(p, q) + t * cols + first,
                        from: r * g.w + from,
                        count,
                    });
                }
            }
        }
        // `copy_strided` relies on this order.
        debug_assert!(copies.windows(2).all(|c| c[0].to + c[0].count <= c[1].to));
        let offsets: Vec<usize> = (0..g.kh)
            .flat_map(|i| {
                (0..g.kw).map(move |j| {
                    phase_start((i * g.dh) % g.sh, (j * g.dw) % g.sw)
                        + ((i * g.dh) / g.sh) * cols
                        + (j * g.dw) / g.sw
                })
            })
            .collect();
        let mut phases: Vec<Phase> = Vec::new();
        for (tap, &offset) in offsets.iter().enumerate() {
            let (i, j) = (tap / g.kw, tap % g.kw);
            let start = phase_start((i * g.dh) % g.sh, (j * g.dw) % g.sw);
            let at = match phases.iter().position(|p| p.start == start) {
                Some(at) => at,
                None => {
                    phases.push(Phase {
                        start,
                        taps: Vec::new(),
                        offsets: Vec::new(),
                    });
                    phases.len() - 1
                }
            };
            phases[at].taps.push(tap);
            phases[at].offsets.push(offset - start);
        }
        let front = phases.iter().flat_map(|p| p.offsets.iter().copied()).max();
        PaddedLayout {
            len: g.sh * g.sw * phase_len,
            cols,
            copies,
            offsets,
            phase_len,
            phases,
            front: front.unwrap_or(0),
        }
    }
}

/// A depthwise convolution of one plane: `map` applied to each sum as it
/// is computed, then `finish` (when given) to the sums, before they are
/// stored. The plane is first copied inside its zero padding, split into
/// phases (see [`PaddedLayout`]; `scratch.padded`, zeroed by the caller),
/// so that every tap reads one contiguous run without bounds tests, which
/// the compiler vectorises; a tap over padding adds a product with zero,
/// which leaves the sum unchanged. Each output receives its taps in kernel
/// order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane<M: MapValue>(
    src: &[f32],
    ker: &[f32],
    g: &Geometry,
    layout: &PaddedLayout,
    dst: &mut [f32],
    scratch: &mut Scratch,
    map: M,
    finish: Option<&Finish>,
) {
    let Scratch { padded, sums, .. } = scratch;
    fill_padded(src, g, layout, padded);
    // The sums are taken over whole vectors, into `sums`, then the valid
    // columns are copied out: no scalar tail loops, which dominate small
    // planes.
    if g.oh == 0 || g.ow == 0 {
        return;
    }
    let cols = layout.cols;
    let len = ((g.oh - 1) * cols + g.ow).next_multiple_of(LANES);
    sums.resize(len, 0.0);
    depthwise_sums(&mut sums[..len], ker, g, &padded[..], &layout.offsets, map);
    if let Some(finish) = finish {
        finish.apply(&mut sums[..len], None);
    }
    for (y, drow) in dst.chunks_exact_mut(g.ow).enumerate() {
        drow.copy_from_slice(&sums[y * cols..][..g.ow]);
    }
}

/// The widest vector (in f32 lanes) the sums are rounded up to; the padded
/// copy has this much slack at its end for the discarded lanes to read.
const LANES: usize = 16;

/// `out[x] = map(sum over taps k of ker[k] * src[offsets[k] + x])`, the
/// taps in kernel order (kernel row, then column), starting from zero, each
/// a fused multiply-add: one instruction instead of a multiply and an add.
#[inline(always)]
fn depthwise_sums<M: MapValue>(
    out: &mut [f32],
    ker: &[f32],
    g: &Geometry,
    src: &[f32],
    offsets: &[usize],
    map: M,
) {
    let n = out.len();
    let tap = |k: usize| &src[offsets[k]..][..n];
    match (g.kh, g.kw) {
        (3, 3) => kernel_taps::<9, M>(out, ker, std::array::from_fn(tap), map),
        (5, 5) => kernel_taps::<25, M>(out, ker, std::array::from_fn(tap), map),
        _ => {
            out.fill(0.0);
            for (k, &wv) in ker[..g.kh * g.kw].iter().enumerate() {
                for (d, s) in out.iter_mut().zip(tap(k)) {
                    *d = wv.mul_add(*s, *d);
                }
            }
            out.iter_mut().for_each(|x| *x = map.map(*x));
        }
    }
}

/// Outputs per block of [`kernel_taps`]: four vectors of 16 lanes, whose
/// sums are independent chains the processor overlaps (one chain waits
/// for each add before the next).
const TAP_BLOCK: usize = 64;

/// A whole kernel of `K` taps, each sum kept in a register: `d = 0; d =
/// fma(w[0], t[0][x], d); d = fma(w[1], t[1][x], d); ...`, in tap order;
/// `map` is applied before the store.
#[inline(always)]
fn kernel_taps<const K: usize, M: MapValue>(out: &mut [f32], w: &[f32], t: [&[f32]; K], map: M) {
    let n = out.len();
    let w: &[f32; K] = w[..K].try_into().expect("K weights");
    let whole = n - n % TAP_BLOCK;
    for x0 in (0..whole).step_by(TAP_BLOCK) {
        // Four accumulators of one vector each, kept in registers.
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
        for k in 0..K {
            let wk = w[k];
            let tk: &[f32; TAP_BLOCK] = t[k][x0..x0 + TAP_BLOCK].try_into().expect("a block");
            for l in 0..16 {
                a0[l] = wk.mul_add(tk[l], a0[l]);
                a1[l] = wk.mul_add(tk[16 + l], a1[l]);
                a2[l] = wk.mul_add(tk[32 + l], a2[l]);
                a3[l] = wk.mul_add(tk[48 + l], a3[l]);
            }
        }
        let o: &mut [f32; TAP_BLOCK] = (&mut out[x0..x0 + TAP_BLOCK]).try_into().expect("a block");
        for l in 0..16 {
            o[l] = map.map(a0[l]);
            o[16 + l] = map.map(a1[l]);
            o[32 + l] = map.map(a2[l]);
            o[48 + l] = map.map(a3[l]);
        }
    }
    // The rest a vector at a time (callers round lengths up to whole
    // vectors), then one by one.
    let vectors = n - n % 16;
    for x0 in (whole..vectors).step_by(16) {
        let mut acc = [0f32; 16];
        for k in 0..K {
            let wk = w[k];
            let tk: &[f32; 16] = t[k][x0..x0 + 16].try_into().expect("a vector");
            for l in 0..16 {
                acc[l] = wk.mul_add(tk[l], acc[l]);
            }
        }
        for (o, a) in out[x0..x0 + 16].iter_mut().zip(acc) {
            *o = map.map(a);
        }
    }
    for x in vectors..n {
        let mut acc = 0.0;
        for k in 0..K {
            acc = w[k].mul_add(t[k][x], acc);
        }
        out[x] = map.map(acc);
    }
}

/// Copies an input plane inside its padding, split into phases (see
/// [`PaddedLayout`]). `src` starts at the plane and may go on past it: a
/// stride-2 copy reads whole vectors, up to 15 values past a row.
#[inline(always)]
fn fill_padded(src: &[f32], g: &Geometry, layout: &PaddedLayout, padded: &mut [f32]) {
    let shuffles = shuffles();
    // The copies go in increasing order of `to` (see `PaddedLayout::new`).
    for &RowCopy { to, from, count } in &layout.copies {
        copy_strided(shuffles, src, from, g.sw, padded, to, count);
    }
}

/// Copies an output plane's gradient into `wide` after `layout.front`
/// zeros, its rows `cols` apart as the sums of [`depthwise_plane`] are: the
/// columns past `ow` and everything after the last row stay zero.
#[inline(always)]
fn fill_wide(dy: &[f32], g: &Geometry, layout: &PaddedLayout, wide: &mut [f32]) {
    for (y, row) in dy.chunks_exact(g.ow.max(1)).take(g.oh).enumerate() {
        wide[layout.front + y * layout.cols..][..row.len()].copy_from_slice(row);
    }
}

/// The gradient of every depthwise weight (`channels` x taps): per channel,
/// over the images in order, the sum over outputs (y, x) of `dy[y, x] *
/// padded[offsets[tap] + y * cols + x]` for each tap. With the output
/// gradient laid out `cols` wide (zeros past `ow`), that is one flat dot
/// product per tap over the whole plane. Each channel is one task, so the sums do not depend on
/// the thread count.
pub(super) fn weight_gradient(
    xs: &[f32],
    ds: &[f32],
    g: &Geometry,
    images: usize,
    channels: usize,
) -> Vec<f32> {
    let simd = pulp::Arch::new();
    let layout = PaddedLayout::new(g);
    let per_channel: Vec<Vec<f64>> = (0..channels)
        .into_par_iter()
        .map(|channel| {
            SCRATCH.with(|scratch| {
                simd.dispatch(WeightGradient {
                    xs,
                    ds,
                    g,
                    layout: &layout,
                    images,
                    channels,
                    channel,
                    scratch: &mut scratch.borrow_mut(),
                })
            })
        })
        .collect();
    per_channel
        .into_iter()
        .flat_map(|taps| taps.into_iter().map(|v| v as f32))
        .collect()
}

struct WeightGradient<'a> {
    xs: &'a [f32],
    ds: &'a [f32],
    g: &'a Geometry,
    layout: &'a PaddedLayout,
    images: usize,
    channels: usize,
    channel: usize,
    scratch: &'a mut Scratch,
}

impl pulp::WithSimd for WeightGradient<'_> {
    type Output = Vec<f64>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<f64> {
        let (g, layout) = (self.g, self.layout);
        let mut sums = vec![0f64; layout.offsets.len()];
        if g.oh == 0 || g.ow == 0 {
            return sums;
        }
        self.scratch.prepare(g, layout);
        let (in_plane, out_plane) = (g.h * g.w, g.oh * g.ow);
        let n = ((g.oh - 1) * layout.cols + g.ow).next_multiple_of(LANES);
        for image in 0..self.images {
            let plane = image * self.channels + self.channel;
            let Scratch { padded, wide, .. } = &mut *self.scratch;
            fill_padded(&self.xs[plane * in_plane..], g, layout, padded);
            fill_wide(&self.ds[plane * out_plane..][..out_plane], g, layout, wide);
            let dy = &wide[layout.front..][..n];
            for (sum, &offset) in sums.iter_mut().zip(&layout.offsets) {
                *sum += dot(dy, &padded[offset..][..n]) as f64;
            }
        }
        sums
    }
}

/// `sum(a[x] * b[x])` in 32 lanes (four vectors of independent fused
/// multiply-adds), the lanes added in order at the end, then the rest.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let mut blocks_a = a.chunks_exact(32);
    let mut blocks_b = b.chunks_exact(32);
    for (av, bv) in (&mut blocks_a).zip(&mut blocks_b) {
        let av: &[f32; 32] = av.try_into().expect("a block");
        let bv: &[f32; 32] = bv.try_into().expect("a block");
        for l in 0..32 {
            acc[l] = av[l].mul_add(bv[l], acc[l]);
        }
    }
    let rest = blocks_a
        .remainder()
        .iter()
        .zip(blocks_b.remainder())
        .fold(0f32, |sum, (&x, &y)| x.mul_add(y, sum));
    acc.iter().sum::<f32>() + rest
}

/// The gradient of every input plane of a depthwise convolution, into `dx`
/// (zeros on entry). The forward pass sums, for each tap, a run of the
/// padded plane starting at the tap's offset; so the padded plane's
/// gradient at position `p` of a phase is the sum over that phase's taps of
/// `w[tap] * dy_wide[p - offset]`: the same fused multiply-adds as the
/// forward pass, read back from each offset (`Scratch::wide` holds the
/// zeros in front that this reads). The inside is then copied out, the
/// reverse of the forward's row copies; inputs no tap reads keep zero.
pub(super) fn input_gradient(
    ds: &[f32],
    weights: &[f32],
    g: &Geometry,
    channels: usize,
    dx: &mut [f32],
) {
    let simd = pulp::Arch::new();
    let layout = PaddedLayout::new(g);
    let in_plane = (g.h * g.w).max(1);
    let per_task = planes_per_task(dx.len(), in_plane);
    dx.par_chunks_mut(per_task * in_plane)
        .enumerate()
        .for_each(|(t, dst)| {
            SCRATCH.with(|scratch| {
                simd.dispatch(InputGradient {
                    first_plane: t * per_task,
                    channels,
                    ds,
                    weights,
                    g,
                    layout: &layout,
                    dst,
                    scratch: &mut scratch.borrow_mut(),
                })
            })
        });
}

struct InputGradient<'a> {
    first_plane: usize,
    channels: usize,
    ds: &'a [f32],
    weights: &'a [f32],
    g: &'a Geometry,
    layout: &'a PaddedLayout,
    dst: &'a mut [f32],
    scratch: &'a mut Scratch,
}

impl pulp::WithSimd for InputGradient<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (g, layout) = (self.g, self.layout);
        if g.oh == 0 || g.ow == 0 {
            return;
        }
        self.scratch.prepare(g, layout);
        let (in_plane, out_plane, taps) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
        let run = layout.phase_len.next_multiple_of(LANES);
        let Scratch {
            wide,
            sums,
            phase_weights,
            ..
        } = &mut *self.scratch;
        sums.resize(layout.len + LANES, 0.0);
        for (i, dst) in self.dst.chunks_mut(in_plane.max(1)).enumerate() {
            let plane = self.first_plane + i;
            let ker = &self.weights[(plane % self.channels) * taps..][..taps];
            fill_wide(&self.ds[plane * out_plane..][..out_plane], g, layout, wide);
            for phase in &layout.phases {
                phase_weights.clear();
                phase_weights.extend(phase.taps.iter().map(|&k| ker[k]));
                let reads = |k: usize| &wide[layout.front - phase.offsets[k]..][..run];
                let out = &mut sums[phase.start..][..run];
                match phase.taps.len() {
                    9 => kernel_taps::<9, _>(
                        out,
                        phase_weights,
                        std::array::from_fn(reads),
                        Unchanged,
                    ),
                    4 => kernel_taps::<4, _>(
                        out,
                        phase_weights,
                        std::array::from_fn(reads),
                        Unchanged,
                    ),
                    2 => kernel_taps::<2, _>(
                        out,
                        phase_weights,
                        std::array::from_fn(reads),
                        Unchanged,
                    ),
                    1 => kernel_taps::<1, _>(
                        out,
                        phase_weights,
                        std::array::from_fn(reads),
                        Unchanged,
                    ),
                    25 => kernel_taps::<25, _>(
                        out,
                        phase_weights,
                        std::array::from_fn(reads),
                        Unchanged,
                    ),
                    _ => {
                        out.fill(0.0);
                        for (k, &wv) in phase_weights.iter().enumerate() {
                            for (d, s) in out.iter_mut().zip(reads(k)) {
                                *d = wv.mul_add(*s, *d);
                            }
                        }
                    }
                }
            }
            for &RowCopy { to, from, count } in &layout.copies {
                let grads = &sums[to..][..count];
                match g.sw {
                    1 => dst[from..][..count].copy_from_slice(grads),
                    sw => {
                        for (d, &v) in dst[from..].iter_mut().step_by(sw).zip(grads) {
                            *d = v;
                        }
                    }
                }
            }
        }
    }
}
