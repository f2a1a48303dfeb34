//! Range observers for calibration: each sees batches of a tensor's values
//! one at a time, holds a bounded summary (never the values), can merge
//! with another observer of the same kind (calibration split across
//! workers), and proposes a range `[min, max]` to quantize with.
//!
//! - [`MinMax`]: the extremes seen.
//! - [`MovingAverage`]: an exponential moving average of each batch's
//!   extremes (Jacob et al. 2018's activation ranges; Paddle's
//!   `moving_average_abs_max`).
//! - [`AbsHistogram`]: a 2048-bin histogram of |x| whose width doubles as
//!   larger values arrive (merging bin pairs, which is exact), from which
//!   come the percentile, entropy (TensorRT's KL-divergence search) and MSE
//!   ranges.

use rayon::prelude::*;

/// Extremes of everything observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MinMax {
    pub min: f32,
    pub max: f32,
    pub seen: u64,
}

impl MinMax {
    pub fn observe(&mut self, data: &[f32]) {
        // Blocks in parallel; extremes and counts merge exactly in any
        // order.
        let batch =
            data.par_chunks(1 << 16)
                .map(block_min_max)
                .reduce(MinMax::default, |mut a, b| {
                    a.merge(&b);
                    a
                });
        self.merge(&batch);
    }

    pub fn merge(&mut self, other: &MinMax) {
        if other.seen == 0 {
            return;
        }
        if self.seen == 0 {
            *self = other.clone();
            return;
        }
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.seen += other.seen;
    }

    pub fn range(&self) -> (f32, f32) {
        if self.seen == 0 {
            (0.0, 0.0)
        } else {
            (self.min, self.max)
        }
    }
}

/// The extremes of one block, over sixteen lanes of comparisons the
/// compiler keeps in vector registers; NaN and infinities fail `|x| < inf`
/// and are left out.
fn block_min_max(block: &[f32]) -> MinMax {
    const LANES: usize = 16;
    let (mut lo, mut hi) = ([f32::INFINITY; LANES], [f32::NEG_INFINITY; LANES]);
    let mut finite = [0u32; LANES];
    let mut chunks = block.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let x = c[l];
            let ok = x.abs() < f32::INFINITY;
            let (low, high) = if ok {
                (x, x)
            } else {
                (f32::INFINITY, f32::NEG_INFINITY)
            };
            lo[l] = if low < lo[l] { low } else { lo[l] };
            hi[l] = if high > hi[l] { high } else { hi[l] };
            finite[l] += ok as u32;
        }
    }
    for &x in chunks.remainder() {
        if x.is_finite() {
            lo[0] = lo[0].min(x);
            hi[0] = hi[0].max(x);
            finite[0] += 1;
        }
    }
    let seen: u64 = finite.iter().map(|&c| c as u64).sum();
    if seen == 0 {
        return MinMax::default();
    }
    MinMax {
        min: lo.iter().copied().fold(f32::INFINITY, f32::min),
        max: hi.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        seen,
    }
}

/// Exponential moving average of per-batch extremes:
/// `range = momentum * range + (1 - momentum) * batch_range`, starting from
/// the first batch.
#[derive(Clone, Debug, PartialEq)]
pub struct MovingAverage {
    pub momentum: f32,
    pub min: f32,
    pub max: f32,
    pub batches: u64,
}

impl MovingAverage {
    pub fn new(momentum: f32) -> MovingAverage {
        MovingAverage {
            momentum,
            min: 0.0,
            max: 0.0,
            batches: 0,
        }
    }

    pub fn observe(&mut self, batch: &[f32]) {
        let mut mm = MinMax::default();
        mm.observe(batch);
        if mm.seen == 0 {
            return;
        }
        if self.batches == 0 {
            (self.min, self.max) = (mm.min, mm.max);
        } else {
            let m = self.momentum;
            self.min = m * self.min + (1.0 - m) * mm.min;
            self.max = m * self.max + (1.0 - m) * mm.max;
        }
        self.batches += 1;
    }

    /// Merging averages of separate streams weighs them by batch count.
    pub fn merge(&mut self, other: &MovingAverage) {
        let total = self.batches + other.batches;
        if other.batches == 0 {
            return;
        }
        let w = other.batches as f32 / total as f32;
        self.min = (1.0 - w) * self.min + w * other.min;
        self.max = (1.0 - w) * self.max + w * other.max;
        self.batches = total;
    }

    pub fn range(&self) -> (f32, f32) {
        (self.min, self.max)
    }
}

/// The histogram of one block of values (see `AbsHistogram::observe`):
/// four interleaved counters, so that runs of equal values (a ReLU6
/// saturating) do not wait on one memory cell.
/// The |x| histogram of one block at `scale` bins per unit, and the
/// block's extremes.
fn count_block(block: &[f32], scale: f32) -> (Vec<u64>, MinMax) {
    // Zeros and non-finite values go to one extra bin that is dropped: a
    // select rather than a branch, which a ReLU's zeros would make
    // unpredictable.
    let bin = |x: f32| {
        let keep = x.abs() < f32::INFINITY && x != 0.0;
        // In [0, BINS - 1] before the conversion, which is then exact and
        // needs no saturation.
        let b = (x.abs() * scale).min((BINS - 1) as f32) as u32 as usize;
        if keep {
            b
        } else {
            BINS
        }
    };
    let mut lanes = vec![[0u32; 4]; BINS + 1];
    let mut chunks = block.chunks_exact(4);
    for c in &mut chunks {
        for (lane, &x) in c.iter().enumerate() {
            lanes[bin(x)][lane] += 1;
        }
    }
    for &x in chunks.remainder() {
        lanes[bin(x)][0] += 1;
    }
    let counts = lanes[..BINS]
        .iter()
        .map(|l| l.iter().map(|&c| c as u64).sum())
        .collect();
    (counts, block_min_max(block))
}

/// Bins of the histograms, TensorRT's count.
pub const BINS: usize = 2048;

/// A histogram of the nonzero |x| over `[0, width)`, plus the signed
/// extremes.
#[derive(Clone, Debug, PartialEq)]
pub struct AbsHistogram {
    pub counts: Vec<u64>,
    /// Covered interval of |x|; a power of two times the first width, so
    /// histograms with the same start merge bin for bin.
    pub width: f32,
    pub extremes: MinMax,
}

impl Default for AbsHistogram {
    fn default() -> Self {
        AbsHistogram {
            counts: vec![0; BINS],
            width: 0.0,
            extremes: MinMax::default(),
        }
    }
}

impl AbsHistogram {
    fn bin_width(&self) -> f32 {
        self.width / BINS as f32
    }

    /// Doubles the width until `amax` fits, merging bin pairs.
    fn grow_to(&mut self, amax: f32) {
        if self.width == 0.0 {
            // The first width: the next power of two above amax, so that
            // observers started on different data still share bin edges
            // after growing.
            self.width = 2f32.powi(amax.max(f32::MIN_POSITIVE).log2().floor() as i32 + 1);
            return;
        }
        while amax >= self.width {
            for i in 0..BINS / 2 {
                self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
            }
            self.counts[BINS / 2..].fill(0);
            self.width *= 2.0;
        }
    }

    pub fn observe(&mut self, data: &[f32]) {
        // Exact zeros are left out: every grid holds 0 exactly, so they never
        // weigh on a threshold, and after a ReLU they are a spike that makes
        // the entropy search smear it over a level and pick tiny ranges.
        // Blocks counted in parallel and summed: integer counts, so the
        // result is the same whatever the split. One pass counts at the
        // current width and finds the extremes; only a batch reaching past
        // the width (the first one, or a larger one) is counted again after
        // the histogram grows.
        let count = |width: f32| {
            let scale = BINS as f32 / width;
            data.par_chunks(1 << 16)
                .map(|block| count_block(block, scale))
                .reduce(
                    || (vec![0u64; BINS], MinMax::default()),
                    |(mut a, mut ea), (b, eb)| {
                        a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                        ea.merge(&eb);
                        (a, ea)
                    },
                )
        };
        let (mut counts, extremes) = if self.width > 0.0 {
            count(self.width)
        } else {
            let mut e = MinMax::default();
            e.observe(data);
            (Vec::new(), e)
        };
        if extremes.seen == 0 {
            return;
        }
        self.extremes.merge(&extremes);
        let amax = extremes.min.abs().max(extremes.max.abs());
        if counts.is_empty() || amax >= self.width {
            self.grow_to(amax);
            counts = count(self.width).0;
        }
        for (total, c) in self.counts.iter_mut().zip(&counts) {
            *total += c;
        }
    }

    pub fn merge(&mut self, other: &AbsHistogram) {
        if other.extremes.seen == 0 {
            return;
        }
        if self.extremes.seen == 0 {
            *self = other.clone();
            return;
        }
        let mut other = other.clone();
        let target = self.width.max(other.width);
        self.grow_to(target * 0.75);
        other.grow_to(target * 0.75);
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.extremes.merge(&other.extremes);
    }

    /// The range for an |x| threshold: `[-t, t]`, or `[0, t]` when nothing
    /// negative was seen.
    fn range_for(&self, t: f32) -> (f32, f32) {
        if self.extremes.min >= 0.0 {
            (0.0, t.min(self.extremes.max))
        } else {
            (-t, t)
        }
    }

    /// The smallest |x| threshold below which `percent` of the values lie.
    pub fn percentile(&self, percent: f64) -> (f32, f32) {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return (0.0, 0.0);
        }
        let want = (total as f64 * percent / 100.0).ceil() as u64;
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                return self.range_for((i + 1) as f32 * self.bin_width());
            }
        }
        self.range_for(self.width)
    }

    /// TensorRT's entropy calibration: the threshold whose clipped and
    /// `levels`-level quantized distribution has the least KL divergence
    /// from the observed one (levels: 128 for int8, the positive half).
    pub fn entropy(&self, levels: usize) -> (f32, f32) {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return (0.0, 0.0);
        }
        let levels = levels.clamp(2, BINS);
        let mut best = (f64::INFINITY, BINS);
        for i in levels..=BINS {
            // P: the first i bins, the outliers folded into the last.
            let mut p: Vec<f64> = self.counts[..i].iter().map(|&c| c as f64).collect();
            let outliers: u64 = self.counts[i..].iter().sum();
            p[i - 1] += outliers as f64;
            if p.iter().sum::<f64>() == 0.0 {
                continue;
            }
            // Q: the first i bins merged into `levels` groups, each group's
            // mass spread evenly over its non-empty bins.
            let mut q = vec![0f64; i];
            for g in 0..levels {
                let start = g * i / levels;
                let end = ((g + 1) * i / levels).max(start + 1).min(i);
                let mass: f64 = self.counts[start..end].iter().map(|&c| c as f64).sum();
                let nonzero = self.counts[start..end].iter().filter(|&&c| c > 0).count();
                if nonzero == 0 {
                    continue;
                }
                for (qb, &c) in q[start..end].iter_mut().zip(&self.counts[start..end]) {
                    if c > 0 {
                        *qb = mass / nonzero as f64;
                    }
                }
            }
            let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
            if qs == 0.0 {
                continue;
            }
            let mut kl = 0.0;
            for b in 0..i {
                if p[b] == 0.0 {
                    continue;
                }
                let pb = p[b] / ps;
                // A bin Q leaves empty where P has mass: smoothed.
                let qb = (q[b] / qs).max(1e-12);
                kl += pb * (pb / qb).ln();
            }
            if kl < best.0 {
                best = (kl, i);
            }
        }
        self.range_for((best.1 as f32 + 0.5) * self.bin_width())
    }

    /// The threshold that minimises the expected squared error of
    /// quantizing the observed values onto a grid of `steps` steps over
    /// `[0, t]` (per side): rounding noise `step^2 / 12` inside, clipping
    /// error outside.
    pub fn mse(&self, steps: usize) -> (f32, f32) {
        if self.counts.iter().all(|&c| c == 0) {
            return (0.0, 0.0);
        }
        let bw = self.bin_width() as f64;
        let mut best = (f64::INFINITY, BINS);
        for i in 1..=BINS {
            let t = i as f64 * bw;
            let err = self.expected_error(t, t / steps.max(1) as f64);
            if err < best.0 {
                best = (err, i);
            }
        }
        self.range_for(best.1 as f32 * self.bin_width())
    }

    /// The summed squared error the observed values get from a grid of
    /// spacing `step` clipped at `threshold` (per side): rounding noise
    /// `step^2 / 12` inside, the distance to the threshold outside.
    pub fn expected_error(&self, threshold: f64, step: f64) -> f64 {
        let bw = self.bin_width() as f64;
        let mut err = 0.0;
        for (b, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let x = (b as f64 + 0.5) * bw;
            let e = if x > threshold {
                (x - threshold) * (x - threshold)
            } else {
                step * step / 12.0
            };
            err += c as f64 * e;
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_like(n: usize, seed: u64) -> Vec<f32> {
        // Sum of uniforms: bell-shaped, deterministic.
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..n)
            .map(|_| (0..6).map(|_| next()).sum::<f32>() - 3.0)
            .collect()
    }

    #[test]
    fn min_max_merges_like_one_stream() {
        let data = gaussian_like(1000, 1);
        let mut whole = MinMax::default();
        whole.observe(&data);
        let (mut a, mut b) = (MinMax::default(), MinMax::default());
        a.observe(&data[..300]);
        b.observe(&data[300..]);
        a.merge(&b);
        assert_eq!(a, whole);
        assert_eq!(MinMax::default().range(), (0.0, 0.0));
    }

    #[test]
    fn moving_average_follows_the_recent_batches() {
        let mut ma = MovingAverage::new(0.9);
        ma.observe(&[-1.0, 1.0]);
        ma.observe(&[-2.0, 3.0]);
        let (lo, hi) = ma.range();
        assert!(
            (lo - -1.1).abs() < 1e-6 && (hi - 1.2).abs() < 1e-6,
            "{lo} {hi}"
        );
    }

    #[test]
    fn histograms_grow_exactly_and_merge_like_one_stream() {
        let data = gaussian_like(20000, 7);
        let mut whole = AbsHistogram::default();
        whole.observe(&data);
        let (mut a, mut b) = (AbsHistogram::default(), AbsHistogram::default());
        // Small values first, then large ones: `a` must grow.
        let (small, large): (Vec<f32>, Vec<f32>) = data.iter().partition(|x| x.abs() < 0.5);
        a.observe(&small);
        a.observe(&large);
        b.observe(&large);
        b.observe(&small);
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.width, whole.width);
        assert_eq!(a.counts, whole.counts);
        let (mut c, mut d) = (AbsHistogram::default(), AbsHistogram::default());
        c.observe(&small);
        d.observe(&large);
        c.merge(&d);
        assert_eq!(c.counts, whole.counts);
        assert_eq!(c.counts.iter().sum::<u64>(), 20000);
    }

    #[test]
    fn percentile_entropy_and_mse_clip_outliers_but_keep_the_bulk() {
        let mut data = gaussian_like(50000, 3);
        data.push(40.0); // one far outlier
        let mut h = AbsHistogram::default();
        h.observe(&data);
        let (_, p999) = h.percentile(99.99);
        let (_, ent) = h.entropy(128);
        for (name, t) in [("percentile", p999), ("entropy", ent)] {
            assert!(t > 1.0 && t < 10.0, "{name}: {t}");
        }
        // MSE weighs the outlier's clipping error against the rounding
        // noise of 50000 values: for 127 steps the optimum solves
        // 50000 t / (127^2 * 12) = 40 - t, t = 31.8.
        let (_, mse) = h.mse(127);
        assert!((mse - 31.8).abs() < 0.1, "mse: {mse}");
        // Without it, MSE clips only the thinnest tail.
        let mut bulk = AbsHistogram::default();
        bulk.observe(&data[..50000]);
        let (_, t) = bulk.mse(127);
        assert!(
            t > 2.0 && t <= bulk.extremes.max.max(-bulk.extremes.min),
            "{t}"
        );
        let (lo, hi) = h.percentile(100.0);
        assert!(hi >= 40.0 && lo <= -40.0, "{lo} {hi}");
        // Non-negative data gives a one-sided range.
        let mut relu = AbsHistogram::default();
        relu.observe(&data.iter().map(|x| x.max(0.0)).collect::<Vec<_>>());
        assert_eq!(relu.mse(255).0, 0.0);
    }
}
