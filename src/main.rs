//! The `genfeed` command line.

mod cmd;
#[cfg(target_os = "linux")]
mod librdkafka_guard;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = cmd::Cli::parse();
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            ExitCode::from(2)
        }
    }
}

/// Prints an error and its causes, each once. Many of the crate's errors
/// quote their source in their own message (so a log line that shows only
/// the top error still says everything), which would otherwise print every
/// such source twice.
fn report(err: &anyhow::Error) {
    let mut said = err.to_string();
    eprintln!("error: {said}");
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !said.contains(&cause) {
            eprintln!("  caused by: {cause}");
        }
        said = cause;
    }
}

/// Tensor code frees and reallocates buffers of the same large sizes every
/// step. glibc's defaults serve those with fresh `mmap`s and hand them back
/// on free, so the kernel zeroes new pages each time: a third of training
/// time went to `clear_page` before this. Raising the thresholds keeps freed
/// buffers in the heap for reuse.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}
