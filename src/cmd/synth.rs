use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use genfeed::synth::{generate, SynthConfig};

#[derive(Args)]
pub struct SynthArgs {
    /// Directory to write NAME.item and NAME.inter into.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "synth")]
    name: String,
    #[arg(long, default_value_t = 2000)]
    items: usize,
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long, default_value_t = 40)]
    topics: usize,
    /// Also write an `embedding:float_seq` column of this width.
    #[arg(long, default_value_t = 0)]
    embedding_dim: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Time-ordered mode: one stream of interleaved users with positions as
    /// timestamps, in which this many new items (the last ids) arrive
    /// between half and 95% of the way, half of them becoming hits; cut it
    /// with `genfeed time-split`.
    #[arg(long, default_value_t = 0)]
    late_items: usize,
}

pub fn run(a: SynthArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.items > 0 && a.topics > 0,
        "--items and --topics must be positive"
    );
    anyhow::ensure!(
        a.late_items < a.items,
        "--late-items ({}) must leave some of the --items ({}) to start from",
        a.late_items,
        a.items
    );
    let cfg = SynthConfig {
        name: a.name,
        items: a.items,
        users: a.users,
        topics: a.topics,
        embedding_dim: a.embedding_dim,
        seed: a.seed,
        late_items: a.late_items,
        ..SynthConfig::default()
    };
    let files = generate(&a.out, &cfg).with_context(|| format!("writing {}", a.out.display()))?;
    println!("{}\n{}", files.items.display(), files.inter.display());
    Ok(())
}
