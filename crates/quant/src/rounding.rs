//! Weight rounding that minimises a layer's output error on calibration
//! data instead of each weight's own error.
//!
//! A weighted op computes `y = w . x` per output channel; quantizing `w` to
//! `q` changes its output by `(q - w) . x`, whose mean square over the data
//! is `(q - w)^T H (q - w)` with `H = E[x x^T]`, the second moment of the
//! op's input (its im2col patches for a convolution). Rounding each weight
//! to the nearest grid point minimises `|q - w|^2`, which is that error
//! only when `H` is a multiple of the identity. This is the optimal brain
//! quantizer as GPTQ computes it (Frantar et al. 2022, arXiv 2210.17323,
//! algorithm 1; the same objective as AdaRound, Nagel et al. 2020, solved
//! in closed form rather than by gradient descent): weights are quantized
//! one at a time, and each one's rounding error is spread over the weights
//! not yet quantized, in proportion to `H^-1`, so that they compensate it.
//! Inputs are visited in order of decreasing `H_ii` (the paper's
//! "act-order"), and `H` is damped by 1% of its mean diagonal, as the
//! paper does.
//!
//! Everything here is f64 and sequential per row, so the result does not
//! depend on the thread count.

use crate::{Grid, Params};
use rayon::prelude::*;

/// The running sum of `x x^T` over the input vectors of a weighted op (one
/// per output pixel of a convolution), from which `H` comes.
#[derive(Clone, Debug, PartialEq)]
pub struct SecondMoment {
    /// The length of an input vector.
    pub k: usize,
    /// `sum x x^T`, row-major `k * k`.
    pub sum: Vec<f64>,
    /// How many vectors were summed.
    pub count: u64,
}

impl SecondMoment {
    pub fn new(k: usize) -> SecondMoment {
        SecondMoment {
            k,
            sum: vec![0.0; k * k],
            count: 0,
        }
    }

    /// Adds `gram = sum x x^T` (row-major `k * k`, computed in f32 over
    /// `count` vectors of one batch).
    pub fn add_gram(&mut self, gram: &[f32], count: u64) {
        debug_assert_eq!(gram.len(), self.sum.len());
        for (s, &g) in self.sum.iter_mut().zip(gram) {
            *s += g as f64;
        }
        self.count += count;
    }

    pub fn merge(&mut self, other: &SecondMoment) {
        debug_assert_eq!(self.k, other.k);
        for (s, o) in self.sum.iter_mut().zip(&other.sum) {
            *s += o;
        }
        self.count += other.count;
    }

    /// `E[x x^T]`.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }
}

/// What [`round_rows`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundingError {
    /// `sum over rows of (q - w)^T H (q - w)` with nearest rounding.
    pub nearest: f64,
    /// The same with the rounding chosen here.
    pub chosen: f64,
}

/// Rounds `rows` (row-major, `rows.len() / k` rows of `k` weights, one row
/// per output channel) onto `grid` with `params[r]` (or `params[0]` for
/// every row), minimising each row's `(q - w)^T H (q - w)` greedily as
/// GPTQ does. `h` is `E[x x^T]` (row-major `k * k`). The rows are replaced
/// by their dequantized values, which quantize back exactly with the same
/// parameters. Fails only when `H` cannot be factored even after more
/// damping (then nothing is changed).
pub fn round_rows(
    rows: &mut [f32],
    k: usize,
    h: &[f64],
    params: &[Params],
    grid: Grid,
) -> Result<RoundingError, String> {
    if k == 0 || !rows.len().is_multiple_of(k) || h.len() != k * k {
        return Err(format!(
            "{} weights and a {}-element second moment do not make rows of {k}",
            rows.len(),
            h.len()
        ));
    }
    let n_rows = rows.len() / k;
    if params.len() != n_rows && params.len() != 1 {
        return Err(format!("{} parameters for {n_rows} rows", params.len()));
    }
    let order = act_order(h, k);
    let Factors { u, r } = inverse_factor(h, k, &order)?;
    let param = |r: usize| params[if params.len() == 1 { 0 } else { r }];
    let errors: Vec<(f64, f64)> = rows
        .par_chunks_mut(k)
        .enumerate()
        .map(|(row_index, row)| {
            let p = param(row_index);
            // The row in visiting order, in f64, updated as we go.
            let original: Vec<f64> = order.iter().map(|&i| row[i] as f64).collect();
            let mut w = original.clone();
            let mut q = vec![0f64; k];
            // Each step's error e adds e^2 to (w - q)^T H (w - q) (H
            // damped): GPTQ's loss, so the total comes for free.
            let mut e_chosen = 0.0;
            for i in 0..k {
                q[i] = p.fake_quantize(w[i] as f32, grid) as f64;
                let e = (w[i] - q[i]) / u[i * k + i];
                e_chosen += e * e;
                let ui = &u[i * k..(i + 1) * k];
                for (wj, &uij) in w[i + 1..].iter_mut().zip(&ui[i + 1..]) {
                    *wj -= e * uij;
                }
            }
            let nearest: Vec<f64> = original
                .iter()
                .map(|&v| p.fake_quantize(v as f32, grid) as f64)
                .collect();
            let e_near = quadratic(&r, k, &original, &nearest);
            // Greedy rounding is almost always better; where it is not,
            // nearest rounding is kept.
            let best = if e_chosen <= e_near { &q } else { &nearest };
            for (&i, &v) in order.iter().zip(best) {
                row[i] = v as f32;
            }
            (e_near, e_chosen.min(e_near))
        })
        .collect();
    Ok(RoundingError {
        nearest: errors.iter().map(|e| e.0).sum(),
        chosen: errors.iter().map(|e| e.1).sum(),
    })
}

/// Input indices by decreasing `H_ii` (ties by index).
fn act_order(h: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]).then(a.cmp(&b)));
    order
}

/// `(w - q)^T H (w - q) = |R^T (w - q)|^2` for `H = R R^T`, `R` upper
/// triangular (row-major): `k^2 / 2` multiply-adds.
fn quadratic(r: &[f64], k: usize, w: &[f64], q: &[f64]) -> f64 {
    let mut rt_d = vec![0f64; k];
    for i in 0..k {
        let d = w[i] - q[i];
        for (acc, &rij) in rt_d[i..].iter_mut().zip(&r[i * k + i..(i + 1) * k]) {
            *acc += rij * d;
        }
    }
    rt_d.iter().map(|v| v * v).sum()
}

/// The dot product over eight lanes, which the compiler keeps in vector
/// registers (one running sum cannot be reordered into them).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// The factors GPTQ reads, for `H` in visiting order and damped: `U` upper
/// triangular with `U^T U = H^-1`, and `R = U^-1` (`H = R R^T`).
struct Factors {
    u: Vec<f64>,
    r: Vec<f64>,
}

/// The upper triangular `U` with `U^T U = H^-1` (row-major) for `H`
/// permuted into `order` and damped, which GPTQ's update reads row by row.
///
/// With `J` the reversal, the Cholesky factor `L` of `J H J` gives
/// `H = R R^T` for the upper triangular `R = J L J`, so `H^-1 = U^T U` with
/// `U = R^-1 = J L^-1 J`: one factorisation and one triangular inverse.
fn inverse_factor(h: &[f64], k: usize, order: &[usize]) -> Result<Factors, String> {
    let mut hp = vec![0f64; k * k];
    for (a, &i) in order.iter().enumerate() {
        for (b, &j) in order.iter().enumerate() {
            hp[a * k + b] = h[i * k + j];
        }
    }
    // An input that was always zero has no say: give it a unit diagonal.
    for i in 0..k {
        if hp[i * k + i] <= 0.0 || !hp[i * k + i].is_finite() {
            for j in 0..k {
                hp[i * k + j] = 0.0;
                hp[j * k + i] = 0.0;
            }
            hp[i * k + i] = 1.0;
        }
    }
    let mean_diag = (0..k).map(|i| hp[i * k + i]).sum::<f64>() / k as f64;
    let mut damping = 0.01 * mean_diag;
    for _ in 0..6 {
        let mut reversed = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                reversed[i * k + j] = hp[(k - 1 - i) * k + (k - 1 - j)];
            }
            reversed[i * k + i] += damping;
        }
        if let Some(l) = cholesky(&reversed, k) {
            let l_inv = lower_inverse(&l, k);
            let reverse = |m: &[f64]| {
                let mut out = vec![0f64; k * k];
                for i in 0..k {
                    for j in 0..k {
                        out[i * k + j] = m[(k - 1 - i) * k + (k - 1 - j)];
                    }
                }
                out
            };
            return Ok(Factors {
                u: reverse(&l_inv),
                r: reverse(&l),
            });
        }
        damping *= 10.0;
    }
    Err("the input's second moment is not positive definite, even damped".into())
}

/// The lower triangular `L` with `L L^T = a` (row-major), or `None` when
/// `a` is not positive definite. Row by row (Cholesky-Banachiewicz):
/// `k^3 / 6` multiply-adds, a fraction of a second at `k` in the
/// thousands.
fn cholesky(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; k * k];
    for i in 0..k {
        let (above, rest) = l.split_at_mut(i * k);
        let row_i = &mut rest[..k];
        for j in 0..=i {
            let row_j = if j < i {
                &above[j * k..j * k + j]
            } else {
                &row_i[..j]
            };
            let s = a[i * k + j] - dot(&row_i[..j], row_j);
            if j == i {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                row_i[i] = s.sqrt();
            } else {
                row_i[j] = s / above[j * k + j];
            }
        }
    }
    Some(l)
}

/// The inverse of a lower triangular matrix (row-major), column by column
/// (each column an independent forward substitution).
fn lower_inverse(l: &[f64], k: usize) -> Vec<f64> {
    let columns: Vec<Vec<f64>> = (0..k)
        .into_par_iter()
        .map(|c| {
            // Solve L x = e_c; x is zero above c.
            let mut x = vec![0f64; k];
            x[c] = 1.0 / l[c * k + c];
            for i in c + 1..k {
                let s = dot(&l[i * k + c..i * k + i], &x[c..i]);
                x[i] = -s / l[i * k + i];
            }
            x
        })
        .collect();
    let mut inv = vec![0f64; k * k];
    for (c, col) in columns.iter().enumerate() {
        for i in c..k {
            inv[i * k + c] = col[i];
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RangeMode;

    fn int8_params(rows: &[f32], k: usize) -> Vec<Params> {
        rows.chunks(k)
            .map(|r| {
                let m = r.iter().fold(0f32, |a, v| a.max(v.abs()));
                Params::from_range(-m, m, grid(8), RangeMode::Symmetric).unwrap()
            })
            .collect()
    }

    fn grid(bits: u8) -> Grid {
        Grid {
            bits,
            signed: true,
            narrow: true,
        }
    }

    /// A small deterministic generator (no dependency for tests).
    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn correlated_moment(k: usize, n: usize, seed: &mut u64) -> Vec<f64> {
        // Inputs sharing a common component, plus a mean: H far from I.
        let mut m = SecondMoment::new(k);
        for _ in 0..n {
            let common = lcg(seed);
            let x: Vec<f32> = (0..k)
                .map(|_| (0.5 + common + 0.3 * lcg(seed)) as f32)
                .collect();
            let gram: Vec<f32> = (0..k * k).map(|i| x[i / k] * x[i % k]).collect();
            m.add_gram(&gram, 1);
        }
        m.mean()
    }

    #[test]
    fn identity_moment_gives_nearest_rounding() {
        let k = 5;
        let mut seed = 7;
        let w: Vec<f32> = (0..3 * k).map(|_| lcg(&mut seed) as f32).collect();
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            h[i * k + i] = 1.0;
        }
        let params = int8_params(&w, k);
        let mut rounded = w.clone();
        round_rows(&mut rounded, k, &h, &params, grid(8)).unwrap();
        for (r, (a, b)) in rounded.chunks(k).zip(w.chunks(k)).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert_eq!(*x, params[r].fake_quantize(*y, grid(8)));
            }
        }
    }

    #[test]
    fn output_error_falls_below_nearest_rounding_and_values_stay_on_the_grid() {
        for (k, bits) in [(9, 8), (24, 4), (40, 3)] {
            let mut seed = k as u64;
            let h = correlated_moment(k, 200, &mut seed);
            let w: Vec<f32> = (0..8 * k).map(|_| lcg(&mut seed) as f32).collect();
            let params: Vec<Params> = w
                .chunks(k)
                .map(|r| {
                    let m = r.iter().fold(0f32, |a, v| a.max(v.abs()));
                    Params::from_range(-m, m, grid(bits), RangeMode::Symmetric).unwrap()
                })
                .collect();
            let mut rounded = w.clone();
            let e = round_rows(&mut rounded, k, &h, &params, grid(bits)).unwrap();
            assert!(
                e.chosen < 0.8 * e.nearest,
                "k={k} bits={bits}: {} vs nearest {}",
                e.chosen,
                e.nearest
            );
            for (r, row) in rounded.chunks(k).enumerate() {
                for &v in row {
                    let q = params[r].quantize(v, grid(bits));
                    assert_eq!(params[r].dequantize(q), v, "off the grid");
                }
            }
            // The reported error is the damped quadratic error of what was
            // written.
            let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
            let chosen: f64 = rounded
                .chunks(k)
                .zip(w.chunks(k))
                .map(|(q, w)| {
                    let d: Vec<f64> = (0..k).map(|i| (w[i] - q[i]) as f64).collect();
                    let mut total = 0.0;
                    for a in 0..k {
                        for b in 0..k {
                            let damp = if a == b { 0.01 * mean_diag } else { 0.0 };
                            total += d[a] * (h[a * k + b] + damp) * d[b];
                        }
                    }
                    total
                })
                .sum();
            assert!(
                (chosen - e.chosen).abs() <= 1e-6 * e.chosen,
                "{chosen} vs {}",
                e.chosen
            );
        }
    }

    #[test]
    fn factor_inverts_the_damped_moment() {
        let k = 6;
        let mut seed = 3;
        let h = correlated_moment(k, 50, &mut seed);
        let order: Vec<usize> = (0..k).collect();
        let Factors { u, r } = inverse_factor(&h, k, &order).unwrap();
        let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        let mut hd = h.clone();
        for i in 0..k {
            hd[i * k + i] += 0.01 * mean_diag;
        }
        // U upper triangular, and (U^T U) H = I.
        for i in 0..k {
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0);
            }
        }
        for i in 0..k {
            for j in 0..k {
                let hinv_row_i: Vec<f64> = (0..k)
                    .map(|c| (0..k).map(|m| u[m * k + i] * u[m * k + c]).sum())
                    .collect();
                let v: f64 = (0..k).map(|c| hinv_row_i[c] * hd[c * k + j]).sum();
                assert!((v - (i == j) as u8 as f64).abs() < 1e-8, "{i},{j}: {v}");
                // R R^T = H.
                let rr: f64 = (0..k).map(|c| r[i * k + c] * r[j * k + c]).sum();
                assert!((rr - hd[i * k + j]).abs() < 1e-9, "{i},{j}: {rr}");
            }
        }
    }

    #[test]
    fn dead_inputs_and_bad_shapes() {
        // An input that is always zero: its weight rounds to nearest.
        let k = 3;
        let h = vec![1.0, 0.5, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0];
        let mut w = vec![0.3f32, -0.7, 0.123];
        let params = int8_params(&w, k);
        round_rows(&mut w, k, &h, &params, grid(8)).unwrap();
        assert_eq!(w[2], params[0].fake_quantize(0.123, grid(8)));
        assert!(round_rows(&mut [0.0; 4], 3, &h, &params, grid(8)).is_err());
        assert!(round_rows(&mut [0.0; 3], 3, &[1.0], &params, grid(8)).is_err());
    }
}
