use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use tracing_subscriber::EnvFilter;

use genfeed::service::config::{Config, LogFormat};

#[derive(Args)]
pub struct RunArgs {
    /// The service's TOML config (every key is documented in
    /// `configs/genfeed.toml`).
    #[arg(long)]
    config: PathBuf,
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&a.config)?;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    genfeed::service::run(cfg)
}
