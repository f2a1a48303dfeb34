//! Recycled f32 buffers. Large activations freed by one node are handed to
//! a later node's kernel instead of going back to the system: a fresh
//! allocation of tens of megabytes costs a page fault per 4 KiB on first
//! touch, which at batch 32 took longer than the convolutions themselves.
//! The pool lives as long as its evaluator, so repeated runs (calibration,
//! benchmarks) allocate nothing once warm; it holds at most the buffers one
//! run frees, and at most `MAX_BUFFERS` of them.

use qgraph_ir::Tensor;
use std::sync::Mutex;

/// Buffers smaller than this (64 KiB) come from the allocator as usual.
const MIN_LEN: usize = 1 << 14;
const MAX_BUFFERS: usize = 64;

#[derive(Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

impl BufferPool {
    /// A buffer of `len` elements whose values are unspecified (left over
    /// from an earlier use): for kernels that write every element.
    pub fn take(&self, len: usize) -> Vec<f32> {
        if len >= MIN_LEN {
            if let Ok(mut free) = self.free.lock() {
                // The smallest buffer that fits, if it is not wastefully large.
                let best = free
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 2 * len)
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    let mut buf = free.swap_remove(i);
                    buf.resize(len, 0.0);
                    return buf;
                }
            }
        }
        vec![0.0; len]
    }

    /// Keeps the storage of a tensor no one reads any more.
    pub fn recycle(&self, tensor: Tensor) {
        let Tensor::F32(a) = tensor else { return };
        if a.len() < MIN_LEN || !a.is_standard_layout() {
            return;
        }
        let (buf, offset) = a.into_raw_vec_and_offset();
        if offset != Some(0) {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            free.push(buf);
            if free.len() > MAX_BUFFERS {
                // Drop the smallest: the large ones are the costly ones.
                let smallest = free
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                free.swap_remove(smallest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::ndarray::{ArrayD, IxDyn};

    #[test]
    fn a_recycled_buffer_is_reused_for_a_tensor_of_similar_size() {
        let pool = BufferPool::default();
        let big = vec![1.5f32; MIN_LEN * 2];
        let ptr = big.as_ptr();
        pool.recycle(Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[2, MIN_LEN]), big).unwrap(),
        ));
        // Too small a request for that buffer: a fresh one.
        let small = pool.take(MIN_LEN - 1);
        assert_ne!(small.as_ptr(), ptr);
        let again = pool.take(MIN_LEN + 5);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), MIN_LEN + 5);
        assert_eq!(pool.take(MIN_LEN * 2).len(), MIN_LEN * 2);
    }
}
