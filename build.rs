//! Links the `genfeed` binary with one librdkafka function wrapped: see
//! `src/librdkafka_guard.rs` for why. `--wrap` is a GNU ld / lld option,
//! hence Linux only.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bin=genfeed=-Wl,--wrap=rd_kafka_metadata_cache_find");
    }
}
