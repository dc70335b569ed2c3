//! Views of a CPU tensor's storage as `f32` slices, for the fused kernels
//! (the serving-time prefix scores here, the AdamW step in
//! [`crate::train::optim`]), which read and write storage in place.

use candle_core::{CpuStorage, Layout};

/// The contiguous `f32` elements of a CPU tensor's storage.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: needs contiguous f32 tensors"),
    }
}

/// [`f32s`], writable.
pub(crate) fn f32s_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: needs contiguous f32 tensors"),
    }
}
