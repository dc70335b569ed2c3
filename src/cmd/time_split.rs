//! `genfeed time-split`: writes the streaming protocol's two folders of a
//! RecBole folder ([`genfeed::dataset::time`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::cold_split::{borrow, file_name, read_events, write};
use genfeed::dataset::time::time_split;

/// The folders a time split writes under `--out`.
pub const TRAIN: &str = "train";
pub const STREAM: &str = "stream";

#[derive(Args)]
pub struct TimeSplitArgs {
    /// A RecBole folder with one `.inter` file and its `.item` file.
    #[arg(long)]
    data: PathBuf,
    /// Writes `OUT/train` (the interactions before the cut and the items
    /// met before it or never) and `OUT/stream` (the rest of the
    /// interactions and the whole catalogue, where the fresh items are).
    #[arg(long)]
    out: PathBuf,
    /// Share of the interactions, in time order, before the cut.
    #[arg(long, default_value_t = 0.8)]
    cut: f64,
}

pub fn run(a: TimeSplitArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.cut) {
        bail!("--cut {} is not in [0, 1]", a.cut);
    }
    let inter = super::model::inter_file(&a.data)?;
    let owned = read_events(&inter)?;
    let split = time_split(&borrow(&owned), a.cut);
    let fresh: HashSet<&str> = split.fresh.iter().map(String::as_str).collect();
    let (train_dir, stream_dir) = (a.out.join(TRAIN), a.out.join(STREAM));
    for d in [&train_dir, &stream_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let text =
        std::fs::read_to_string(&inter).with_context(|| format!("reading {}", inter.display()))?;
    let train_lines: HashSet<u64> = owned
        .iter()
        .zip(&split.train)
        .filter(|(_, &t)| t)
        .map(|(e, _)| e.3)
        .collect();
    let (mut train, mut stream) = (String::new(), String::new());
    for (line, l) in (1u64..).zip(text.lines()) {
        // The header goes to both sides.
        for (side, keep) in [
            (&mut train, line == 1 || train_lines.contains(&line)),
            (&mut stream, !train_lines.contains(&line)),
        ] {
            if keep {
                side.push_str(l);
                side.push('\n');
            }
        }
    }
    let name = file_name(&inter)?;
    write(&train_dir.join(name), &train)?;
    write(&stream_dir.join(name), &stream)?;
    let items = item_file(&inter)?;
    let catalogue =
        std::fs::read_to_string(&items).with_context(|| format!("reading {}", items.display()))?;
    let mut lines = catalogue.lines();
    let header = lines.next().unwrap_or_default();
    let id_col = header
        .split('\t')
        .position(|c| c.split(':').next() == Some("item_id"))
        .with_context(|| format!("{}: no item_id column in the header", items.display()))?;
    let mut known = format!("{header}\n");
    for l in lines {
        if !fresh.contains(l.split('\t').nth(id_col).unwrap_or_default()) {
            known.push_str(l);
            known.push('\n');
        }
    }
    write(&train_dir.join(file_name(&items)?), &known)?;
    write(&stream_dir.join(file_name(&items)?), &catalogue)?;
    eprintln!(
        "{} interactions before the cut (timestamp {}), {} after; {} items first met after it",
        train_lines.len(),
        split.cut.map_or("none".into(), |c| c.to_string()),
        owned.len() - train_lines.len(),
        split.fresh.len()
    );
    println!("{}\n{}", train_dir.display(), stream_dir.display());
    Ok(())
}

/// The `.item` file beside `inter`.
fn item_file(inter: &Path) -> anyhow::Result<PathBuf> {
    let folder = inter.parent().unwrap_or(Path::new("."));
    for entry in
        std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "item") {
            return Ok(path);
        }
    }
    bail!(
        "{} has no .item file: the fresh items' content is in it",
        folder.display()
    )
}
