//! A guard around one librdkafka function that crashes the process when a
//! topic the service reads is deleted.
//!
//! librdkafka 2.12.1 (rdkafka's bundled copy) turns the leader hints of a
//! fetch response into a metadata update that names each topic by its id
//! alone, with a null name. A topic whose id is zero is then looked up by
//! that null name, and `strcmp` dereferences it: a segfault in
//! `rd_kafka_metadata_cache_find`. tansu answers fetches for a deleted topic
//! that way, so deleting any topic the service reads (interactions,
//! catalogue, histories) killed it with signal 11.
//!
//! The binary is linked with `--wrap=rd_kafka_metadata_cache_find`
//! (`build.rs`): librdkafka's calls from its other files come here, and a
//! null name finds no cache entry, which the caller already handles (it
//! logs "Topic (null) not found in cache" and skips the topic). Patching the
//! C source would mean vendoring the whole crate for a one-line check.

use std::ffi::{c_char, c_int, c_void};

extern "C" {
    fn __real_rd_kafka_metadata_cache_find(
        rk: *mut c_void,
        topic: *const c_char,
        valid: c_int,
    ) -> *mut c_void;
}

/// `rd_kafka_metadata_cache_find`, with a null topic found nowhere.
///
/// # Safety
/// Called by librdkafka only, with its own arguments.
#[no_mangle]
pub unsafe extern "C" fn __wrap_rd_kafka_metadata_cache_find(
    rk: *mut c_void,
    topic: *const c_char,
    valid: c_int,
) -> *mut c_void {
    if topic.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: the arguments are librdkafka's own, passed on unchanged.
    unsafe { __real_rd_kafka_metadata_cache_find(rk, topic, valid) }
}
