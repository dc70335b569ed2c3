//! The service's configuration: one TOML file, every key optional but the
//! paths to the model artifacts.
//!
//! `configs/genfeed.toml` lists every key with its default and what it does.
//! Unknown keys are refused, so a typo fails at start-up naming the key,
//! instead of silently leaving a default in place.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::fresh;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub kafka: KafkaConfig,
    pub paths: PathsConfig,
    #[serde(default)]
    pub feed: FeedConfig,
    #[serde(default)]
    pub learning: LearningConfig,
    #[serde(default)]
    pub catalogue: CatalogueSettings,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    /// The consumer group of the interactions topic; instances in one group
    /// split its partitions.
    pub group_id: String,
    pub catalogue_topic: String,
    pub interactions_topic: String,
    pub recommendations_topic: String,
    pub dead_letter_topic: String,
    /// The changelog of user histories: compacted, keyed by user id, with
    /// as many partitions as the interactions topic. An instance that takes
    /// over a partition restores its users from it.
    pub histories_topic: String,
    pub session_timeout_ms: u64,
    /// How long a start waits for the brokers to answer and the topics to
    /// exist before it refuses to start; 0 checks once.
    pub startup_wait_ms: u64,
    /// How long a delivery may take, retries included, before the producer
    /// gives up on it (and the service tries again).
    pub message_timeout_ms: u64,
    /// The producer's `message.max.bytes`: no feed, changelog record or dead
    /// letter the service writes is larger. Set it to at most what the
    /// output topics accept; a record the broker refuses anyway becomes a
    /// dead letter, cut to fit.
    pub message_max_bytes: usize,
    pub wire: WireConfig,
    /// Passed to librdkafka as they are (security, tuning), over genfeed's
    /// own settings.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            group_id: "genfeed".into(),
            catalogue_topic: "catalogue".into(),
            interactions_topic: "interactions".into(),
            recommendations_topic: "recommendations".into(),
            dead_letter_topic: "dead-letters".into(),
            histories_topic: "histories".into(),
            session_timeout_ms: 10_000,
            startup_wait_ms: 30_000,
            message_timeout_ms: 30_000,
            message_max_bytes: 1_000_000,
            wire: WireConfig::default(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WireKind {
    #[default]
    Plain,
    Confluent,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WireConfig {
    pub format: WireKind,
    /// Confluent only: the schema id each of genfeed's current schemas is
    /// registered under. Accepted on read, used on write.
    pub catalogue_id: u32,
    pub interaction_id: u32,
    pub recommendation_id: u32,
    pub dead_letter_id: u32,
    /// Confluent only: older writer schemas to accept, id → `.avsc` file.
    pub writers: BTreeMap<String, PathBuf>,
}

impl Default for WireConfig {
    fn default() -> Self {
        WireConfig {
            format: WireKind::Plain,
            catalogue_id: 1,
            interaction_id: 2,
            recommendation_id: 3,
            dead_letter_id: 4,
            writers: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    /// redb stores (registry, histories) and index segments.
    pub state_dir: PathBuf,
    /// The frozen tokenizer artifact.
    pub tokenizer: PathBuf,
    /// The trained model (`config.json`, `model.safetensors`).
    pub model: PathBuf,
    /// The sentence encoder, needed only when catalogue events carry text
    /// instead of an embedding and the tokenizer reads text (trained on
    /// text, or a collaborative one whose content map reads text).
    #[serde(default)]
    pub text_model: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedConfig {
    pub beams: usize,
    pub top_k: usize,
    /// Leave out items the user already interacted with (the stored history).
    pub exclude_seen: bool,
    /// Interactions kept per user.
    pub history_len: usize,
    /// A user's events within this window after the first one make one feed.
    pub coalesce_ms: u64,
    /// Users per model batch at most.
    pub batch_max: usize,
    /// How long a ready user waits at most for its batch to fill.
    pub batch_wait_ms: u64,
    /// Users waiting for a feed at most; beyond it the consumer waits.
    pub max_pending: usize,
    /// Every this many ms, a pass makes a new feed for every user of the
    /// partitions held, from the same history, when no live batch waits
    /// (`service::refresh`): an idle user's feed loses the items retired
    /// since and gets the new ones. 0: feeds only when users interact.
    pub refresh_ms: u64,
    /// Users per refresh batch: a live user waits at most one.
    pub refresh_batch: usize,
    /// CPU threads of the model (candle).
    pub threads: usize,
    /// Where the model runs: the CPU, or the first CUDA GPU (a binary built
    /// with `--features cuda`; masks and candidates are then made on the
    /// GPU too).
    pub device: FeedDevice,
    /// Business rule: items that are never recommended.
    pub deny_items: Vec<String>,
    /// Where a fresh item's content, and the content of the items a
    /// history ends with, is read from.
    pub fresh_content: FreshContentKind,
    /// Prior that a user's next item is one the model never learnt (one
    /// that arrived after training): the weight of those items' content
    /// scores in the search. 0 turns them off. Unset: .1 by SID, .025 by
    /// catalogue content with an affinity (as `eval`'s defaults).
    pub fresh_weight: Option<f32>,
    /// Hold such items to this share of the feed slots (of the feeds they
    /// can enter) by moving their weight from `fresh_weight` after every
    /// feed. Unset: the weight as given.
    pub fresh_share: Option<f32>,
    /// At most this many such items in one feed.
    pub fresh_slots: usize,
    /// A feed's first this many positions are the model's: such an item
    /// goes no higher than the next one (at most to the feed's last).
    pub fresh_after: usize,
    /// How many such items get half of `fresh_weight`: n of them get
    /// `fresh_weight · n / (n + fresh_half_at)`, so the first few to arrive
    /// do not take the whole weight in every feed. 0: the weight as given.
    pub fresh_half_at: usize,
    /// How many of a user's last items their content is compared with
    /// (each older one at half the weight of the next).
    pub fresh_history: usize,
    /// Temperature of their content softmax (cosine / temperature). Unset:
    /// the one the affinity was fitted beside, else .2.
    pub fresh_temperature: Option<f32>,
    /// Fresh items competing at most: the newest (each costs every request
    /// a dot product).
    pub fresh_max: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            beams: 20,
            top_k: 10,
            exclude_seen: true,
            history_len: 50,
            coalesce_ms: 20,
            batch_max: 64,
            batch_wait_ms: 10,
            max_pending: 10_000,
            refresh_ms: 3_600_000,
            refresh_batch: 16,
            threads: 1,
            device: FeedDevice::Cpu,
            deny_items: Vec::new(),
            fresh_content: FreshContentKind::Auto,
            fresh_weight: None,
            fresh_share: None,
            fresh_slots: fresh::DEFAULT_SLOTS,
            fresh_after: fresh::DEFAULT_AFTER,
            fresh_half_at: fresh::DEFAULT_HALF_AT,
            fresh_history: fresh::DEFAULT_QUERY_ITEMS,
            fresh_temperature: None,
            fresh_max: 10_000,
        }
    }
}

/// Where fresh items' content is read from (`feed.fresh_content`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreshContentKind {
    /// `catalogue` where the model directory holds a TF-IDF weighting and an
    /// affinity fitted on it (`genfeed fit-affinity`), else `sid`.
    Auto,
    /// The tokenizer's reconstruction of each SID's content codes.
    Sid,
    /// The words of each item's catalogue event, weighted as in
    /// `fit-affinity`'s catalogue, scored with its affinity.
    Catalogue,
}

/// Where the service's model runs (`feed.device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedDevice {
    Cpu,
    Cuda,
}

/// What the service learns from the stream (`crate::service::learnt`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearningConfig {
    /// Count steps from one item to the next, and how often each item is
    /// taken, as interactions arrive, and mix them into the search.
    pub enabled: bool,
    /// A step learnt from the stream counts as this many training
    /// transitions.
    pub successor_weight: f32,
    /// The share of the counts' part of the mixture that goes to the most
    /// taken items (all of it where the last item has no successor).
    pub popularity_share: f32,
    /// Successors kept per item at most.
    pub successors_per_item: usize,
    /// How many of the most taken items are mixed in.
    pub popular_items: usize,
    /// Fresh items' content probabilities are multiplied by (1 + times
    /// taken)^this and renormalised among them; 0: content alone.
    pub fresh_popularity: f32,
    /// The counts' weight in the mixture when the model was trained without
    /// counts; a model with them keeps its own fitted weight.
    pub weight: f32,
}

impl Default for LearningConfig {
    fn default() -> Self {
        LearningConfig {
            enabled: true,
            successor_weight: 1.0,
            popularity_share: 0.1,
            successors_per_item: 64,
            popular_items: 100,
            fresh_popularity: 1.0,
            weight: 0.2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogueSettings {
    /// Catalogue events applied per publish at most.
    pub batch_max: usize,
    /// How long an applied event waits at most before it is published.
    pub publish_ms: u64,
    /// Overlay changes that trigger a background merge of the index.
    pub merge_threshold: usize,
    /// How long an interaction whose item is not in the catalogue yet waits
    /// for it before it is a dead letter; 0 dead-letters it at once.
    pub item_wait_ms: u64,
    /// Interactions waiting at most; beyond it an unknown item is a dead
    /// letter at once.
    pub item_wait_max: usize,
}

impl Default for CatalogueSettings {
    fn default() -> Self {
        CatalogueSettings {
            batch_max: 1024,
            publish_ms: 20,
            merge_threshold: 65_536,
            item_wait_ms: 2_000,
            item_wait_max: 10_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serves `/metrics`, `/healthz`, `/readyz`. Port 0 picks a free port
    /// (logged, and written to `state_dir/http.addr`).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter (`RUST_LOG` overrides it).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of a user or item id at most; a longer one is a dead letter.
    pub id_bytes: usize,
    /// Bytes of one text field of an item (title, description, brand, a
    /// retire reason), or of all its categories or all its attributes
    /// together, at most; more is a dead letter.
    pub text_bytes: usize,
    /// How long a stop (SIGTERM, SIGINT) waits for pending feeds and
    /// deliveries before it commits what was acknowledged and exits.
    pub drain_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            id_bytes: 256,
            text_bytes: 65_536,
            drain_ms: 20_000,
        }
    }
}

impl LimitsConfig {
    pub fn record(&self) -> crate::contract::Limits {
        crate::contract::Limits {
            id_bytes: self.id_bytes,
            text_bytes: self.text_bytes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {key}: {why}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        why: String,
    },
}

impl Config {
    /// Reads and checks a config file. Relative paths in it are relative to
    /// the file's directory, so a config works from any working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        cfg.check().map_err(|(key, why)| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            why,
        })?;
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.paths.state_dir);
        fix(&mut self.paths.tokenizer);
        fix(&mut self.paths.model);
        if let Some(p) = self.paths.text_model.as_mut() {
            fix(p);
        }
        for p in self.kafka.wire.writers.values_mut() {
            fix(p);
        }
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let f = &self.feed;
        let positive = [
            ("feed.beams", f.beams),
            ("feed.top_k", f.top_k),
            ("feed.history_len", f.history_len),
            ("feed.batch_max", f.batch_max),
            ("feed.max_pending", f.max_pending),
            ("feed.refresh_batch", f.refresh_batch),
            ("feed.threads", f.threads),
            ("feed.fresh_slots", f.fresh_slots),
            ("feed.fresh_history", f.fresh_history),
            ("catalogue.batch_max", self.catalogue.batch_max),
            ("limits.id_bytes", self.limits.id_bytes),
            ("limits.text_bytes", self.limits.text_bytes),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if let Some(w) = f.fresh_weight.filter(|w| !(0.0..1.0).contains(w)) {
            return Err(("feed.fresh_weight", format!("{w} is not in [0, 1)")));
        }
        if let Some(s) = f.fresh_share.filter(|s| !(*s > 0.0 && *s < 1.0)) {
            return Err(("feed.fresh_share", format!("{s} is not in (0, 1)")));
        }
        let l = &self.learning;
        for (key, v) in [
            ("learning.successor_weight", l.successor_weight),
            ("learning.fresh_popularity", l.fresh_popularity),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err((key, format!("{v} is not a number ≥ 0")));
            }
        }
        for (key, v) in [
            ("learning.popularity_share", l.popularity_share),
            ("learning.weight", l.weight),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err((key, format!("{v} is not in [0, 1)")));
            }
        }
        if l.successors_per_item == 0 {
            return Err(("learning.successors_per_item", "must be at least 1".into()));
        }
        if let Some(t) = f.fresh_temperature.filter(|t| !(*t > 0.0 && t.is_finite())) {
            return Err((
                "feed.fresh_temperature",
                format!("{t} is not a positive number"),
            ));
        }
        let rows = f.beams.saturating_mul(f.batch_max);
        if rows > SEARCH_ROWS {
            return Err((
                "feed.beams",
                format!(
                    "{} beams for each of {} users (feed.batch_max) are {rows} search rows, \
                     more than {SEARCH_ROWS}: every row holds a decoder cache and a row of \
                     logits at each step",
                    f.beams, f.batch_max
                ),
            ));
        }
        if f.top_k > f.beams {
            return Err((
                "feed.top_k",
                format!("{} items cannot come from {} beams", f.top_k, f.beams),
            ));
        }
        // Every output must fit in one message whatever the ids: a feed (a
        // user id twice, key and field, and top_k item ids) and a history
        // changelog record (a user id, and an item id and its length an
        // item), with room to spare.
        let id = self.limits.id_bytes;
        let feed = 2 * id + f.top_k * (id + 64);
        let history = id + 13 + (id + 4) * f.history_len;
        let needed = feed.max(history) + 4096;
        if self.kafka.message_max_bytes < needed {
            return Err((
                "kafka.message_max_bytes",
                format!(
                    "{} bytes cannot hold a feed of {} items or a history of {} with ids of up \
                     to {id} bytes (limits.id_bytes); it needs at least {needed}",
                    self.kafka.message_max_bytes, f.top_k, f.history_len,
                ),
            ));
        }
        if self.kafka.properties.contains_key("message.max.bytes") {
            return Err((
                "kafka.properties",
                "\"message.max.bytes\" is kafka.message_max_bytes: set it there, where the \
                 service checks its outputs against it"
                    .into(),
            ));
        }
        for id in self.kafka.wire.writers.keys() {
            if id.parse::<u32>().is_err() {
                return Err(("kafka.wire.writers", format!("{id:?} is not a schema id")));
            }
        }
        let topics = [
            ("kafka.catalogue_topic", &self.kafka.catalogue_topic),
            ("kafka.interactions_topic", &self.kafka.interactions_topic),
            (
                "kafka.recommendations_topic",
                &self.kafka.recommendations_topic,
            ),
            ("kafka.dead_letter_topic", &self.kafka.dead_letter_topic),
            ("kafka.histories_topic", &self.kafka.histories_topic),
        ];
        for (key, t) in topics {
            if t.is_empty() {
                return Err((key, "must not be empty".into()));
            }
        }
        Ok(())
    }
}

/// Beams of one model batch at most (`feed.beams × feed.batch_max`). The
/// search holds a decoder cache and a row of logits per beam: at TIGER's
/// dimensions 65,536 rows are about 3 GiB of cache, which a GPU holds and a
/// CPU still runs; a careless `beams = 100000` would take the memory of the
/// host before the first feed instead of being refused by name.
const SEARCH_ROWS: usize = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    const PATHS: &str = "[paths]\nstate_dir = \"s\"\ntokenizer = \"t\"\nmodel = \"m\"\n";

    #[test]
    fn defaults_fill_what_is_left_out_and_paths_are_relative_to_the_file() {
        let cfg = load(PATHS).unwrap();
        assert_eq!(cfg.feed.beams, 20);
        assert_eq!(cfg.kafka.wire.format, WireKind::Plain);
        assert!(cfg.paths.model.is_absolute());
        assert!(cfg.paths.model.ends_with("m"));
    }

    #[test]
    fn the_documented_config_shows_the_defaults_and_the_deploy_one_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg = Config::load(&root.join("configs/genfeed.toml")).unwrap();
        assert_eq!(cfg.kafka, KafkaConfig::default());
        assert_eq!(cfg.feed, FeedConfig::default());
        assert_eq!(cfg.learning, LearningConfig::default());
        assert_eq!(cfg.catalogue, CatalogueSettings::default());
        assert_eq!(cfg.http, HttpConfig::default());
        assert_eq!(cfg.log, LogConfig::default());
        assert_eq!(cfg.limits, LimitsConfig::default());
        let deployed = Config::load(&root.join("deploy/genfeed.toml")).unwrap();
        assert_eq!(deployed.feed, FeedConfig::default());
        assert_eq!(deployed.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = load(&format!("{PATHS}[feed]\nbeam = 3\n")).unwrap_err();
        assert!(err.to_string().contains("beam"), "{err}");
        let err = load(&format!("{PATHS}[feed]\ndevice = \"gpu\"\n")).unwrap_err();
        assert!(err.to_string().contains("device"), "{err}");
        let cuda = load(&format!("{PATHS}[feed]\ndevice = \"cuda\"\n")).unwrap();
        assert_eq!(cuda.feed.device, FeedDevice::Cuda);
        let err = load(&format!("{PATHS}[feed]\nbeams = 5\ntop_k = 10\n")).unwrap_err();
        assert!(err.to_string().contains("feed.top_k"), "{err}");
        let err = load(&format!("{PATHS}[feed]\nbeams = 100000\n")).unwrap_err();
        assert!(err.to_string().contains("feed.beams"), "{err}");
        let wide = load(&format!("{PATHS}[feed]\nbeams = 1024\nbatch_max = 64\n")).unwrap();
        assert_eq!(wide.feed.beams * wide.feed.batch_max, SEARCH_ROWS);
        let err = load(&format!("{PATHS}[feed]\nbeams = 1024\nbatch_max = 65\n")).unwrap_err();
        assert!(err.to_string().contains("feed.batch_max"), "{err}");
        let err = load(&format!("{PATHS}[kafka]\nmessage_max_bytes = 6000\n")).unwrap_err();
        assert!(err.to_string().contains("kafka.message_max_bytes"), "{err}");
        let err = load(&format!(
            "{PATHS}[kafka.properties]\n\"message.max.bytes\" = \"5000000\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("kafka.message_max_bytes"), "{err}");
        let err = load(&format!("{PATHS}[learning]\npopularity_share = 1\n")).unwrap_err();
        assert!(
            err.to_string().contains("learning.popularity_share"),
            "{err}"
        );
        let err = load(&format!("{PATHS}[limits]\nid_bytes = 0\n")).unwrap_err();
        assert!(err.to_string().contains("limits.id_bytes"), "{err}");
        let err = load(&format!("{PATHS}[feed]\nfresh_history = 0\n")).unwrap_err();
        assert!(err.to_string().contains("feed.fresh_history"), "{err}");
        for share in ["0", "1", "nan"] {
            let err = load(&format!("{PATHS}[feed]\nfresh_share = {share}\n")).unwrap_err();
            assert!(err.to_string().contains("feed.fresh_share"), "{err}");
        }
        let err = load("[feed]\nbeams = 5\n").unwrap_err();
        assert!(err.to_string().contains("paths"), "{err}");
    }
}
