//! `genfeed cold-split`: writes the cold-start protocol's copy of a RecBole
//! folder ([`genfeed::dataset::cold`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use genfeed::dataset::cold::cold_split;
use genfeed::dataset::{Interaction, InteractionReader};

/// The file that lists a cold split's cold items, one id a line.
pub const COLD_ITEMS: &str = "cold_items.txt";

#[derive(Args)]
pub struct ColdSplitArgs {
    /// A RecBole folder with one `.inter` file (and its `.item` file).
    #[arg(long)]
    data: PathBuf,
    /// The new folder: the same file names, the interactions filtered, the
    /// catalogue copied whole, and `cold_items.txt`.
    #[arg(long)]
    out: PathBuf,
    /// Share of the test items (last items of users with at least three)
    /// made cold.
    #[arg(long, default_value_t = 0.05)]
    fraction: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: ColdSplitArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.fraction) {
        bail!("--fraction {} is not in [0, 1]", a.fraction);
    }
    let inter = super::model::inter_file(&a.data)?;
    if a.out.canonicalize().ok() == a.data.canonicalize().ok() {
        bail!("--out must not be --data: the split is a new folder");
    }
    let owned = read_events(&inter)?;
    let events = borrow(&owned);
    let split = cold_split(&events, a.fraction, a.seed);
    let dropped: std::collections::HashSet<u64> = events
        .iter()
        .zip(&split.keep)
        .filter(|(_, &k)| !k)
        .map(|(e, _)| e.line)
        .collect();

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let text =
        std::fs::read_to_string(&inter).with_context(|| format!("reading {}", inter.display()))?;
    let mut out = String::with_capacity(text.len());
    for (line, l) in (1u64..).zip(text.lines()) {
        if !dropped.contains(&line) {
            out.push_str(l);
            out.push('\n');
        }
    }
    write(&a.out.join(file_name(&inter)?), &out)?;
    let folder = inter.parent().unwrap_or(Path::new("."));
    for entry in
        std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "item") {
            let to = a.out.join(file_name(&path)?);
            std::fs::copy(&path, &to)
                .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
        }
    }
    let mut list = split.cold.join("\n");
    list.push('\n');
    write(&a.out.join(COLD_ITEMS), &list)?;
    eprintln!(
        "{} cold items, {} of {} interactions dropped, {} users' test targets cold",
        split.cold.len(),
        dropped.len(),
        events.len(),
        split.cold_users
    );
    println!("{}", a.out.display());
    Ok(())
}

/// The interactions of `inter` as owned rows: user, item, timestamp, line.
pub(super) fn read_events(inter: &Path) -> anyhow::Result<Vec<(String, String, f64, u64)>> {
    let mut owned = Vec::new();
    let mut rdr = InteractionReader::from_path(inter)?;
    while let Some(i) = rdr.read()? {
        owned.push((i.user.to_string(), i.item.to_string(), i.timestamp, i.line));
    }
    Ok(owned)
}

pub(super) fn borrow(owned: &[(String, String, f64, u64)]) -> Vec<Interaction<'_>> {
    owned
        .iter()
        .map(|(user, item, timestamp, line)| Interaction {
            line: *line,
            user,
            item,
            timestamp: *timestamp,
        })
        .collect()
}

pub(super) fn file_name(path: &Path) -> anyhow::Result<&std::ffi::OsStr> {
    path.file_name()
        .with_context(|| format!("{}: no file name", path.display()))
}

pub(super) fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
