//! CPU compute kernels: pure functions over contiguous row-major `f32` slices.
//!
//! Shapes are validated by the callers (the executor); kernels only
//! `debug_assert!` them. Output slices must be exactly (or at least) as long as
//! the documented output shape, and never alias an input.

pub mod attention;
pub mod conv;
pub mod embed;
pub mod gemm;
pub mod layout;
pub mod norm;

// Crate-visible for the fused-kernel interpreter (`cpu::fused`), which shares its `exp`.
pub(crate) mod vmath;

#[cfg(test)]
pub(crate) mod test_util;

/// Element count below which spreading work over rayon costs more than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;
