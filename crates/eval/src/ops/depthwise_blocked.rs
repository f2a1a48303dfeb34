//! Depthwise convolution of narrow planes, over blocks of channels, 8 to a
//! vector.
//!
//! Why a second kernel: on planes a few vectors wide, the flat runs of
//! [`super::depthwise`] compute whole vectors per tap over the padding
//! columns as well (80 lanes x 25 taps for the 49 outputs of a 7x7 plane
//! with a 5x5 kernel), after a padded copy of every plane. Here 8 channels
//! are transposed, 8x8 values at a time, into one padded plane of vectors
//! (each pixel's 8 channels side by side), and a row of output pixels takes
//! its sums in registers, one vector each, every tap's weights loaded once
//! for the row. Only the padding columns a row's taps reach are computed;
//! padding rows are skipped. The sums are transposed back into planes.
//!
//! The sums are those of the flat kernel: each starts from zero and takes
//! its taps in kernel order as fused multiply-adds. Products with the zeros
//! of the padding leave a sum unchanged (only the sign of a zero sum may
//! differ, where the flat kernel adds them and this one skips a row).

use super::conv::Geometry;
use super::depthwise::Forward;
use super::pointwise::Epilogue;
use rayon::prelude::*;
use std::cell::RefCell;

/// Channels in one vector of the blocked layout.
const LANES: usize = 8;

/// Vectors of channels per task.
const VECTORS: usize = 4;

/// Output pixels of one row whose sums are kept in registers at once.
const ROW_TILE: usize = 8;

/// Whether this kernel is the one for convolutions of geometry `g`: output
/// rows of at most 8 pixels, or strided ones under 16. Elsewhere the flat
/// kernel's runs waste little (a 14x14 plane with a 3x3 kernel computes
/// 224 lanes per tap for 196 outputs) and it needs no transposes; measured
/// per layer, one thread (see README): 7x7 outputs 1.35 times faster here,
/// stride 2 to 14x14 or 7x7 1.1 to 1.4 times, 14x14 at stride 1 0.8 to
/// 0.95 times.
pub(super) fn suits(g: &Geometry) -> bool {
    let narrow = g.ow <= 8 || (g.ow < 16 && (g.sw > 1 || g.sh > 1));
    narrow && g.oh > 0 && g.ow > 0
}

/// The forward pass of every plane into `out`, with bias, epilogue and a
/// fused Add applied to each plane as soon as it is transposed back.
pub(super) fn forward(inputs: Forward, out: &mut [f32]) {
    let Forward {
        weights,
        g,
        channels,
        ..
    } = inputs;
    let out_plane = g.oh * g.ow;
    if out.is_empty() || channels == 0 {
        return;
    }
    let taps = g.kh * g.kw;
    // Weights tap by tap, a vector of 8 channels per tap (zeros where the
    // last vector has fewer channels).
    let mut packed = vec![0f32; channels.div_ceil(LANES) * taps * LANES];
    for (c, kernel) in weights.chunks_exact(taps).take(channels).enumerate() {
        for (t, &w) in kernel.iter().enumerate() {
            packed[((c / LANES) * taps + t) * LANES + c % LANES] = w;
        }
    }
    let padded = Padded::new(g);
    // Per output row, the kernel rows inside the input (one run: the input
    // row grows with the kernel row); the padding rows would add zeros.
    let inside_rows: Vec<std::ops::Range<usize>> = (0..g.oh)
        .map(|oy| {
            let inside = |i: &usize| g.input_row(oy, *i).is_some();
            let first = (0..g.kh).find(inside).unwrap_or(g.kh);
            first..first + (first..g.kh).take_while(inside).count()
        })
        .collect();
    // Tasks are (image, block of channels): a block's planes are contiguous.
    let block = VECTORS * LANES;
    let mut tasks = Vec::new();
    let mut rest = out;
    for image in 0..rest.len() / (channels * out_plane) {
        for first in (0..channels).step_by(block) {
            let count = (channels - first).min(block);
            let (dst, tail) = rest.split_at_mut(count * out_plane);
            tasks.push((image * channels + first, dst));
            rest = tail;
        }
    }
    let simd = pulp::Arch::new();
    tasks.into_par_iter().for_each(|(first_plane, dst)| {
        SCRATCH.with(|scratch| {
            simd.dispatch(Block {
                first_plane,
                inputs,
                packed: &packed,
                padded: &padded,
                inside_rows: &inside_rows,
                dst,
                // Borrowed before dispatching: code in a closure is not
                // compiled for the vector unit.
                scratch: &mut scratch.borrow_mut(),
            })
        })
    });
}

/// The padded plane of vectors: input pixel (r, c) at (r + ph, c + pw) of
/// `rows x cols` pixels, which cover every pixel a tap of an output reads.
#[derive(Clone, Copy)]
struct Padded {
    rows: usize,
    cols: usize,
}

impl Padded {
    fn new(g: &Geometry) -> Padded {
        Padded {
            rows: (g.h + g.ph).max((g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1),
            cols: (g.w + g.pw).max((g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1),
        }
    }

    fn len(&self) -> usize {
        self.rows * self.cols * LANES
    }
}

/// A worker's buffers, reused from block to block.
#[derive(Default)]
struct Scratch {
    /// The padded plane of one vector of channels, reused for each; the
    /// padding is zeroed once per geometry, as each vector writes only the
    /// inside.
    input: Vec<f32>,
    /// The geometry whose padding `input` holds.
    zeroed_for: Option<Geometry>,
    /// One vector's input, transposed before it is copied inside the
    /// padding: 8x8 squares need rows of many pixels, which a narrow
    /// padded row is not.
    unpadded: Vec<f32>,
    /// One vector's sums, pixel by pixel.
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One (image, block of channels): transpose in, sums, transpose out,
/// finish each plane; a `pulp` operation, compiled once per vector unit.
struct Block<'a> {
    /// Plane index (image * channels + channel) of the block's first plane.
    first_plane: usize,
    inputs: Forward<'a>,
    /// All the weights, packed (see [`forward`]).
    packed: &'a [f32],
    padded: &'a Padded,
    /// Per output row, the kernel rows inside the input.
    inside_rows: &'a [std::ops::Range<usize>],
    dst: &'a mut [f32],
    scratch: &'a mut Scratch,
}

impl pulp::WithSimd for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Forward {
            src: planes,
            bias,
            epilogue,
            added,
            g,
            channels,
            ..
        } = self.inputs;
        let (in_plane, out_plane, taps) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
        let padded = *self.padded;
        let scratch = self.scratch;
        if scratch.zeroed_for != Some(*g) {
            scratch.input.clear();
            scratch.input.resize(padded.len(), 0.0);
            scratch.zeroed_for = Some(*g);
        }
        scratch.unpadded.resize(in_plane * LANES, 0.0);
        scratch.sums.resize(out_plane * LANES, 0.0);
        let first_channel = self.first_plane % channels;
        for (v, dst) in self.dst.chunks_mut(LANES * out_plane).enumerate() {
            let count = dst.len() / out_plane;
            let plane = self.first_plane + v * LANES;
            // Lanes past `count` keep whatever they held: their sums are
            // never read.
            let src = &planes[plane * in_plane..][..count * in_plane];
            transpose(src, count, in_plane, in_plane, &mut scratch.unpadded, LANES);
            // (An empty input row leaves only padding, zeros already.)
            for (r, row) in scratch
                .unpadded
                .chunks_exact(g.w.max(1) * LANES)
                .enumerate()
            {
                let at = ((r + g.ph) * padded.cols + g.pw) * LANES;
                scratch.input[at..][..row.len()].copy_from_slice(row);
            }
            let channel = first_channel + v * LANES;
            let weights = &self.packed[(channel / LANES) * taps * LANES..][..taps * LANES];
            vector_sums(
                &scratch.input,
                weights,
                g,
                &padded,
                self.inside_rows,
                &mut scratch.sums,
            );
            transpose(&scratch.sums, out_plane, count, LANES, dst, out_plane);
            for (i, plane_out) in dst.chunks_exact_mut(out_plane).enumerate() {
                Epilogue {
                    bias: bias.map(|b| b[channel + i]),
                    maps: epilogue,
                    channel: channel + i,
                    added: added.map(|a| &a[(plane + i) * out_plane..][..out_plane]),
                    data: plane_out,
                }
                .with_simd(simd);
            }
        }
    }
}

/// The sums of one vector of channels for every output pixel, into `sums`
/// (pixel by pixel, a vector each), a tile of up to [`ROW_TILE`] pixels of
/// a row at a time.
#[inline(always)]
fn vector_sums(
    input: &[f32],
    weights: &[f32],
    g: &Geometry,
    padded: &Padded,
    inside: &[std::ops::Range<usize>],
    sums: &mut [f32],
) {
    let v3 = super::conv::shuffles();
    for oy in 0..g.oh {
        let rows = inside[oy].clone();
        let mut x0 = 0;
        while x0 < g.ow {
            let tile = (g.ow - x0).min(ROW_TILE);
            let out = &mut sums[(oy * g.ow + x0) * LANES..][..tile * LANES];
            let at = Tile {
                input,
                weights,
                g,
                padded,
                oy,
                x0,
                rows: rows.clone(),
                v3,
            };
            at.row_sums(tile, out);
            x0 += tile;
        }
    }
}

/// Where a tile of output pixels reads.
struct Tile<'a> {
    input: &'a [f32],
    weights: &'a [f32],
    g: &'a Geometry,
    padded: &'a Padded,
    oy: usize,
    x0: usize,
    /// The kernel rows inside the input.
    rows: std::ops::Range<usize>,
    /// The AVX2 unit, where there is one (see [`Tile::sums_avx`]).
    v3: super::conv::Shuffles,
}

impl Tile<'_> {
    /// The sums of `pixels` pixels (1 to [`ROW_TILE`]), compiled for each
    /// count.
    #[inline(always)]
    fn row_sums(&self, pixels: usize, out: &mut [f32]) {
        match pixels {
            8 => self.sums::<8>(out),
            7 => self.sums::<7>(out),
            6 => self.sums::<6>(out),
            5 => self.sums::<5>(out),
            4 => self.sums::<4>(out),
            3 => self.sums::<3>(out),
            2 => self.sums::<2>(out),
            _ => self.sums::<1>(out),
        }
    }

    /// `P` pixels' sums, each a vector kept in a register, for stride 1 or
    /// 2 compiled with the stride known (`SW`), any other as 0.
    #[inline(always)]
    fn sums<const P: usize>(&self, out: &mut [f32]) {
        match self.g.sw {
            1 => self.sums_strided::<P, 1>(out),
            2 => self.sums_strided::<P, 2>(out),
            _ => self.sums_strided::<P, 0>(out),
        }
    }

    #[inline(always)]
    fn sums_strided<const P: usize, const SW: usize>(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = self.v3 {
            return self.sums_avx::<P, SW>(v3, out);
        }
        let g = self.g;
        let sw = if SW == 0 { g.sw } else { SW };
        // The values a tap reads for the P pixels: one run, sliced once,
        // so that indexing into it needs no checks.
        let span = ((P - 1) * sw + 1) * LANES;
        let mut acc = [[0f32; LANES]; P];
        for i in self.rows.clone() {
            let row = &self.input[(self.oy * g.sh + i * g.dh) * self.padded.cols * LANES..]
                [..self.padded.cols * LANES];
            let kernel_row = &self.weights[i * g.kw * LANES..][..g.kw * LANES];
            for (j, w) in kernel_row.chunks_exact(LANES).enumerate() {
                let w: [f32; LANES] = w.try_into().expect("a tap's vector");
                let run = &row[(self.x0 * sw + j * g.dw) * LANES..][..span];
                for (p, acc) in acc.iter_mut().enumerate() {
                    let x = &run[p * sw * LANES..][..LANES];
                    for l in 0..LANES {
                        acc[l] = w[l].mul_add(x[l], acc[l]);
                    }
                }
            }
        }
        for (o, acc) in out.chunks_exact_mut(LANES).zip(&acc) {
            o.copy_from_slice(acc);
        }
    }

    /// [`Tile::sums_strided`] in AVX registers, written out: the compiler
    /// does not keep the arrays above in registers for every `P` and `SW`.
    /// The same fused multiply-adds in the same order.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn sums_avx<const P: usize, const SW: usize>(&self, v3: pulp::x86::V3, out: &mut [f32]) {
        use pulp::{cast, f32x8};
        let g = self.g;
        let sw = if SW == 0 { g.sw } else { SW };
        let span = ((P - 1) * sw + 1) * LANES;
        let vector = |values: &[f32]| -> f32x8 {
            let values: [f32; LANES] = values[..LANES].try_into().expect("a vector");
            cast(values)
        };
        let mut acc = [v3.splat_f32x8(0.0); P];
        for i in self.rows.clone() {
            let row = &self.input[(self.oy * g.sh + i * g.dh) * self.padded.cols * LANES..]
                [..self.padded.cols * LANES];
            let kernel_row = &self.weights[i * g.kw * LANES..][..g.kw * LANES];
            for (j, w) in kernel_row.chunks_exact(LANES).enumerate() {
                let w = vector(w);
                let run = &row[(self.x0 * sw + j * g.dw) * LANES..][..span];
                for (p, acc) in acc.iter_mut().enumerate() {
                    *acc = v3.mul_add_f32x8(w, vector(&run[p * sw * LANES..]), *acc);
                }
            }
        }
        for (o, acc) in out.chunks_exact_mut(LANES).zip(acc) {
            o.copy_from_slice(&cast::<f32x8, [f32; LANES]>(acc));
        }
    }
}

/// `dst[c * ld_dst + r] = src[r * ld_src + c]` for `r < rows`, `c < cols`:
/// 8x8 squares through vector shuffles where the unit has them, the edges
/// one by one.
#[inline(always)]
fn transpose(src: &[f32], rows: usize, cols: usize, ld_src: usize, dst: &mut [f32], ld_dst: usize) {
    let (rows8, cols8) = (rows - rows % 8, cols - cols % 8);
    let mut squares_done = false;
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        for r0 in (0..rows8).step_by(8) {
            for c0 in (0..cols8).step_by(8) {
                transpose_8x8(
                    v3,
                    &src[r0 * ld_src + c0..],
                    ld_src,
                    &mut dst[c0 * ld_dst + r0..],
                    ld_dst,
                );
            }
        }
        squares_done = true;
    }
    for r in 0..rows {
        // The squares' values, unless they were done above; then the
        // columns right of them and the rows below them.
        let from = if squares_done && r < rows8 { cols8 } else { 0 };
        for c in from..cols {
            dst[c * ld_dst + r] = src[r * ld_src + c];
        }
    }
}

/// An 8x8 transpose in AVX registers: unpack pairs, shuffle quads, swap
/// halves (24 shuffles for 64 values). No closures: they would not be
/// compiled for the vector unit, and each shuffle would become a call.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose_8x8(v3: pulp::x86::V3, src: &[f32], ld_src: usize, dst: &mut [f32], ld_dst: usize) {
    use core::arch::x86_64::__m256;
    use pulp::bytemuck::cast;
    let avx = v3.avx;
    let mut r = [cast::<[f32; 8], __m256>([0.0; 8]); 8];
    for (i, row) in r.iter_mut().enumerate() {
        let values: [f32; 8] = src[i * ld_src..][..8].try_into().expect("a row of 8");
        *row = cast(values);
    }
    let t0 = avx._mm256_unpacklo_ps(r[0], r[1]);
    let t1 = avx._mm256_unpackhi_ps(r[0], r[1]);
    let t2 = avx._mm256_unpacklo_ps(r[2], r[3]);
    let t3 = avx._mm256_unpackhi_ps(r[2], r[3]);
    let t4 = avx._mm256_unpacklo_ps(r[4], r[5]);
    let t5 = avx._mm256_unpackhi_ps(r[4], r[5]);
    let t6 = avx._mm256_unpacklo_ps(r[6], r[7]);
    let t7 = avx._mm256_unpackhi_ps(r[6], r[7]);
    let u = [
        avx._mm256_shuffle_ps::<0x44>(t0, t2),
        avx._mm256_shuffle_ps::<0xEE>(t0, t2),
        avx._mm256_shuffle_ps::<0x44>(t1, t3),
        avx._mm256_shuffle_ps::<0xEE>(t1, t3),
        avx._mm256_shuffle_ps::<0x44>(t4, t6),
        avx._mm256_shuffle_ps::<0xEE>(t4, t6),
        avx._mm256_shuffle_ps::<0x44>(t5, t7),
        avx._mm256_shuffle_ps::<0xEE>(t5, t7),
    ];
    for k in 0..4 {
        let first: [f32; 8] = cast(avx._mm256_permute2f128_ps::<0x20>(u[k], u[k + 4]));
        let second: [f32; 8] = cast(avx._mm256_permute2f128_ps::<0x31>(u[k], u[k + 4]));
        dst[k * ld_dst..][..8].copy_from_slice(&first);
        dst[(k + 4) * ld_dst..][..8].copy_from_slice(&second);
    }
}

#[cfg(test)]
mod tests {
    use super::super::pointwise::Pointwise;
    use super::*;

    fn values(count: usize, seed: f32) -> Vec<f32> {
        super::super::test_values(count, u64::from(seed.to_bits()))
    }

    /// (h, w, kernel, stride, dilation, pads (top, left)); the output
    /// size as ONNX computes it with the same pads after.
    fn geometry(
        h: usize,
        w: usize,
        k: [usize; 2],
        s: [usize; 2],
        d: [usize; 2],
        p: [usize; 2],
    ) -> Geometry {
        let out = |n: usize, k: usize, s: usize, d: usize, p: usize| {
            (n + 2 * p - (k - 1) * d - 1) / s + 1
        };
        Geometry {
            h,
            w,
            kh: k[0],
            kw: k[1],
            oh: out(h, k[0], s[0], d[0], p[0]),
            ow: out(w, k[1], s[1], d[1], p[1]),
            sh: s[0],
            sw: s[1],
            dh: d[0],
            dw: d[1],
            ph: p[0],
            pw: p[1],
        }
    }

    /// The same values as the flat kernel, bit for bit, with each kind of
    /// epilogue: none, the one-pass map (batch normalization and a clamp),
    /// and one that is not (an Add and a map after it).
    #[test]
    fn gives_the_flat_kernels_bits() {
        let cases = [
            geometry(7, 7, [5, 5], [1, 1], [1, 1], [2, 2]),
            geometry(7, 7, [3, 3], [1, 1], [1, 1], [1, 1]),
            geometry(14, 14, [5, 5], [2, 2], [1, 1], [2, 2]),
            geometry(13, 11, [3, 3], [2, 1], [1, 2], [1, 2]),
            geometry(9, 6, [5, 3], [1, 2], [2, 1], [3, 0]),
            geometry(3, 4, [3, 3], [2, 2], [1, 1], [0, 0]),
            geometry(1, 1, [3, 3], [1, 1], [1, 1], [1, 1]),
        ];
        for (n, g) in cases.iter().enumerate() {
            assert!(suits(g), "case {n} takes the blocked kernel");
            for (images, channels) in [(1, 45), (2, 8), (1, 3)] {
                let taps = g.kh * g.kw;
                let planes = images * channels;
                let src = values(planes * g.h * g.w, n as f32);
                let weights = values(channels * taps, 10.0 + n as f32);
                let bias = values(channels, 20.0);
                let added = values(planes * g.oh * g.ow, 30.0);
                let batch_norm = Pointwise::ChannelAffine {
                    scale: values(channels, 40.0),
                    shift: values(channels, 50.0),
                };
                let clip = Pointwise::Clip { lo: -0.5, hi: 0.75 };
                let epilogues: [(&[Pointwise], Option<&[f32]>); 3] = [
                    (&[], None),
                    (&[batch_norm.clone(), clip.clone()], None),
                    (&[Pointwise::AddInput, Pointwise::HardSwish], Some(&added)),
                ];
                for (epilogue, added) in epilogues {
                    let inputs = Forward {
                        src: &src,
                        weights: &weights,
                        bias: Some(&bias),
                        epilogue,
                        added,
                        g,
                        channels,
                    };
                    let run = |kernel: fn(Forward, &mut [f32])| {
                        let mut out = vec![f32::NAN; planes * g.oh * g.ow];
                        kernel(inputs, &mut out);
                        out
                    };
                    let blocked = run(forward);
                    let flat = run(super::super::depthwise::flat);
                    for (at, (b, f)) in blocked.iter().zip(&flat).enumerate() {
                        // `==`: a zero sum's sign may differ (see above).
                        assert!(
                            b == f,
                            "case {n}, {channels} channels, output {at}: {b} against {f}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn transposes_any_shape_exactly() {
        for (rows, cols) in [(1, 1), (8, 8), (13, 49), (32, 196), (49, 20), (3, 17)] {
            let (ld_src, ld_dst) = (cols + 3, rows + 5);
            let src: Vec<f32> = (0..rows * ld_src).map(|i| i as f32).collect();
            let mut dst = vec![-1.0; cols * ld_dst];
            transpose(&src, rows, cols, ld_src, &mut dst, ld_dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * ld_dst + r],
                        src[r * ld_src + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
            // The slack at the end of each destination row is not written.
            for c in 0..cols {
                assert!(dst[c * ld_dst + rows..][..ld_dst - rows]
                    .iter()
                    .all(|&v| v == -1.0));
            }
        }
    }

    /// The written-out AVX sums and the portable ones give the same bits,
    /// for every tile width and strides 1, 2 and 3.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_unit_changes_no_sum() {
        let Some(v3) = pulp::x86::V3::try_new() else {
            eprintln!("SKIPPED: no AVX2 here");
            return;
        };
        for stride in [1, 2, 3] {
            let g = geometry(9, 30, [3, 5], [1, stride], [1, 1], [1, 2]);
            let padded = Padded::new(&g);
            let input = values(padded.len(), stride as f32);
            let weights = values(g.kh * g.kw * LANES, 7.0);
            for p in 1..=ROW_TILE {
                let tile = |v3| Tile {
                    input: &input,
                    weights: &weights,
                    g: &g,
                    padded: &padded,
                    oy: 3,
                    x0: 1,
                    rows: 0..g.kh,
                    v3,
                };
                let (mut avx, mut portable) = (vec![0.0; p * LANES], vec![0.0; p * LANES]);
                tile(Some(v3)).row_sums(p, &mut avx);
                tile(None).row_sums(p, &mut portable);
                assert!(
                    avx.iter()
                        .zip(&portable)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "stride {stride}, {p} pixels"
                );
            }
        }
    }

    #[test]
    fn padded_plane_covers_every_tap() {
        // 7x7 input, 5x3 kernel, stride (2, 1), dilation (1, 2), pads 2.
        let g = Geometry {
            h: 7,
            w: 7,
            kh: 5,
            kw: 3,
            oh: 4,
            ow: 7,
            sh: 2,
            sw: 1,
            dh: 1,
            dw: 2,
            ph: 2,
            pw: 2,
        };
        let p = Padded::new(&g);
        // The last output row reads padded row 6 + 4; the last column
        // padded column 6 + 4.
        assert_eq!((p.rows, p.cols), (11, 11));
    }
}
