//! The one call into the `gemm` crate. Its entry point is an `unsafe fn` over
//! raw pointers and strides; this wrapper takes slices (and, for the
//! output, a mutable view, whose elements it holds exclusively), checks
//! that every element the product can read or write lies inside them, and
//! only then makes the call. Nothing else in the workspace uses `unsafe`.
#![allow(unsafe_code)]

use qgraph_ir::ndarray::{ArrayViewMut2, Axis, ShapeBuilder};
use rayon::prelude::*;

/// Columns at least per task of a one-row product shared across threads.
const ROW_PRODUCT_BLOCK: usize = 320;

/// A read-only matrix over a slice: element (r, c) is at
/// `r * row_stride + c * col_stride`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix at the start of `data`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Columns `first..first + count` of the matrix.
    pub fn columns(self, first: usize, count: usize) -> MatRef<'a> {
        assert!(first + count <= self.cols, "columns outside the matrix");
        MatRef {
            data: &self.data[(first * self.col_stride).min(self.data.len())..],
            cols: count,
            ..self
        }
    }

    pub fn transposed(self) -> MatRef<'a> {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Element (r, c).
    pub fn at(&self, r: usize, c: usize) -> f32 {
        assert!(
            r < self.rows && c < self.cols,
            "an element outside the matrix"
        );
        self.data[r * self.row_stride + c * self.col_stride]
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// One past the largest offset an element of the matrix has.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// Whether the product may split itself across the current rayon pool.
/// Either way each element is computed by the same sequence of operations
/// (the crate splits rows and columns, never the inner dimension, and its
/// blocking depends only on the shapes), so results do not depend on it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Threads {
    One,
    Pool,
}

/// `dst = alpha * a b` (or `dst += alpha * a b` with `accumulate`), where
/// `dst` is row-major `a.rows() x b.cols()` with rows `dst_row_stride` apart.
///
/// Panics when the shapes disagree or a matrix does not fit its slice: both
/// are bugs of the calling kernel, which validates the model's shapes first.
pub fn gemm(
    dst: &mut [f32],
    dst_row_stride: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    threads: Threads,
) {
    // An empty product writes nothing (and an empty slice holds no view).
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // The view checks that every row fits in the slice and that no two
    // rows overlap.
    let dst = ArrayViewMut2::from_shape((a.rows, b.cols).strides((dst_row_stride, 1)), dst)
        .expect("destination outside its slice, or its rows overlap");
    gemm_into(dst, a, b, alpha, accumulate, threads)
}

/// As [`gemm`], into a matrix view: `dst = alpha * a b` (or `+=`), where
/// `dst` may be a block of a larger matrix (a few columns of each row).
pub fn gemm_into(
    mut dst: ArrayViewMut2<f32>,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    threads: Threads,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions of a matrix product");
    assert_eq!(dst.dim(), (m, n), "destination shape of a matrix product");
    assert!(a.extent() <= a.data.len(), "left operand outside its slice");
    assert!(
        b.extent() <= b.data.len(),
        "right operand outside its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // The crate takes a one-row product (a batch of one through a fully
    // connected layer) as a matrix-vector product on one thread; its
    // columns are shared out here instead, one block per thread. The
    // crate's matrix-vector kernels (taken when one operand is contiguous
    // along k, or the right one along its rows, and k > 2) compute each
    // column alone, in the same order of k whatever the block, so the
    // split changes no bits; every block is wider than 256 columns, where
    // the crate would switch to another kernel.
    let matrix_vector = k > 2 && ((b.row_stride == 1 && a.col_stride == 1) || b.col_stride == 1);
    if threads == Threads::Pool && m == 1 && matrix_vector && n >= 2 * ROW_PRODUCT_BLOCK {
        // At least ROW_PRODUCT_BLOCK columns each, the last taking the
        // rest: fixed blocks of 320 had left 1000 columns as three tasks for
        // two threads, one of them taking two.
        let parts = rayon::current_num_threads().clamp(1, n / ROW_PRODUCT_BLOCK);
        let width = n / parts;
        let mut blocks = Vec::new();
        let mut rest = dst;
        let mut first = 0;
        while blocks.len() + 1 < parts {
            let (block, tail) = rest.split_at(Axis(1), width);
            blocks.push((first, block));
            first += width;
            rest = tail;
        }
        blocks.push((first, rest));
        blocks.into_par_iter().for_each(|(first, block)| {
            let columns = block.ncols();
            gemm_into(
                block,
                a,
                b.columns(first, columns),
                alpha,
                accumulate,
                Threads::One,
            )
        });
        return;
    }
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::Pool => gemm::Parallelism::Rayon(0),
    };
    let (dst_row_stride, dst_col_stride) = (dst.strides()[0], dst.strides()[1]);
    // SAFETY: the view holds its `m x n` elements at these strides
    // exclusively (ndarray's invariant for a mutable view), so the product
    // writes only them and they alias neither operand; the asserts above
    // put every element of the operands inside their slices, and their
    // strides are non-negative and fit isize because the extents fit in
    // slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride,
            dst_row_stride,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef, b: MatRef) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for r in 0..a.rows {
            for c in 0..b.cols {
                let mut s = 0f64;
                for i in 0..a.cols {
                    s += a.data[r * a.row_stride + i * a.col_stride] as f64
                        * b.data[i * b.row_stride + c * b.col_stride] as f64;
                }
                out[r * b.cols + c] = s as f32;
            }
        }
        out
    }

    #[test]
    fn products_match_a_naive_loop_for_odd_shapes_and_transposes() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 3, 129), (5, 300, 1)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 13) % 7) as f32 - 3.0).collect();
            let am = MatRef::row_major(&a, m, k);
            let bt = MatRef::row_major(&b, n, k).transposed();
            for bm in [MatRef::row_major(&b, k, n), bt] {
                let want = naive(am, bm);
                for threads in [Threads::One, Threads::Pool] {
                    let mut got = vec![7f32; m * n];
                    gemm(&mut got, n, am, bm, 1.0, false, threads);
                    assert_eq!(got, want, "{m}x{k}x{n}");
                    gemm(&mut got, n, am, bm, 2.0, true, threads);
                    let three: Vec<f32> = want.iter().map(|v| 3.0 * v).collect();
                    assert_eq!(got, three, "{m}x{k}x{n} accumulated");
                }
            }
        }
    }

    #[test]
    fn one_row_products_shared_across_threads_equal_one_thread_bit_for_bit() {
        let (k, n) = (700, 1000);
        // A 1000-class classifier: three blocks, the last 360 wide.
        let a: Vec<f32> = (0..k)
            .map(|i| ((i * 37) % 101) as f32 / 17.0 - 3.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 13) % 97) as f32 / 29.0 - 1.5)
            .collect();
        let am = MatRef::row_major(&a, 1, k);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for bm in [
            MatRef::row_major(&b, k, n),
            MatRef::row_major(&b, n, k).transposed(),
        ] {
            let mut one = vec![0f32; n];
            gemm(&mut one, n, am, bm, 1.5, false, Threads::One);
            let mut shared = vec![7f32; n];
            pool.install(|| gemm(&mut shared, n, am, bm, 1.5, false, Threads::Pool));
            assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                shared.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    #[should_panic(expected = "rows overlap")]
    fn overlapping_destination_rows_are_refused() {
        let a = [1f32; 4];
        let mut d = [0f32; 4];
        gemm(
            &mut d,
            1,
            MatRef::row_major(&a, 2, 2),
            MatRef::row_major(&a, 2, 2),
            1.0,
            false,
            Threads::One,
        );
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn a_matrix_larger_than_its_slice_is_refused() {
        let a = [1f32; 5];
        let mut d = [0f32; 4];
        gemm(
            &mut d,
            2,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&a, 3, 2),
            1.0,
            false,
            Threads::One,
        );
    }
}
