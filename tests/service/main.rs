//! The service against a real Kafka-protocol broker (tansu): live feeds,
//! retirement, new items, poison messages, crashes and rebalances.
//!
//! The catalogue here is kept smaller than the beam (at most 20 live items,
//! 20 beams, 20 items per feed), so that a feed must hold *every* live item
//! the user has not seen: what each feed contains is then known exactly,
//! whatever the (tiny, briefly trained) model prefers.

mod harness;
mod learnt;

use std::collections::{BTreeSet, HashMap};

use genfeed::contract::Recommendation;
use harness::{feeds_answering, At, Bed, Framing, Output, Service};

const FEED: &str = "beams = 20\ntop_k = 20\ncoalesce_ms = 5\nbatch_wait_ms = 5";

/// The items a feed must hold: the live ones the user has not seen.
fn expected(live: &BTreeSet<String>, seen: &[String]) -> BTreeSet<String> {
    live.iter().filter(|i| !seen.contains(i)).cloned().collect()
}

fn items_of(f: &Recommendation) -> BTreeSet<String> {
    f.items.iter().map(|i| i.item_id.clone()).collect()
}

/// The fixture's first `n` items, upserted.
fn upsert_first(bed: &Bed, n: usize) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for (id, v) in bed.fixture.items.iter().take(n) {
        bed.input.upsert(id, v.clone());
        live.insert(id.clone());
    }
    live
}

/// `users` users taking two of `ids` each: what each took, and where each
/// one's last interaction went.
fn two_items_each(
    input: &harness::Input,
    ids: &[String],
    users: usize,
) -> (HashMap<String, Vec<String>>, HashMap<String, At>) {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut last = HashMap::new();
    for u in 0..users {
        let user = format!("user-{u}");
        for k in 0..2 {
            let item = &ids[(u * 3 + k * 5) % ids.len()];
            last.insert(user.clone(), input.interaction(&user, item));
            seen.entry(user.clone()).or_default().push(item.clone());
        }
    }
    (seen, last)
}

#[test]
fn feeds_hold_live_items_only_retired_ones_never_return_and_new_ones_join() {
    let bed = Bed::new("live", 3, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    let mut live = upsert_first(&bed, 15);
    let mut svc = Service::start(&bed.config("a", FEED));
    svc.wait_metric("genfeed_live_items", |v| v == 15.0);

    // Round 1: 30 users, two items each.
    let ids: Vec<String> = live.iter().cloned().collect();
    let (mut seen, last) = two_items_each(input, &ids, 30);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    for (user, feed) in &got {
        assert_eq!(items_of(feed), expected(&live, &seen[user]), "{user}");
        let scores: Vec<f32> = feed.items.iter().map(|i| i.score).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    }

    // Retire three items, the last by a tombstone (compaction will drop
    // its records, so an instance started later never sees it); once the
    // service has processed them, no feed may hold them.
    let retired: Vec<String> = live.iter().take(3).cloned().collect();
    for id in &retired[..2] {
        input.retire(id);
    }
    input.tombstone(&t.catalogue, Some(&retired[2]));
    for id in &retired {
        live.remove(id);
    }
    svc.wait_metric("genfeed_live_items", |v| v == 12.0);
    // A brand-new item, never seen in training, with content next to an
    // existing item's.
    let mut v = f.items[20].1.clone();
    v[0] += 1e-3;
    input.upsert("brand-new", v);
    live.insert("brand-new".into());
    svc.wait_metric("genfeed_live_items", |v| v == 13.0);

    let mut last = HashMap::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let item = &ids[5 + u % 5];
        last.insert(user.clone(), input.interaction(&user, item));
        seen.get_mut(&user).unwrap().push(item.clone());
    }
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    for (user, feed) in &got {
        let items = items_of(feed);
        for r in &retired {
            assert!(!items.contains(r), "{user} got retired {r}");
        }
        assert!(items.contains("brand-new"), "{user}: {items:?}");
        assert_eq!(items, expected(&live, &seen[user]), "{user}");
    }

    // A retired item comes back with its content: live again, under a SID
    // whose content codes are its content's (whether or not its old SID was
    // released meanwhile).
    let back = &retired[0];
    let content = &f.items.iter().find(|(id, _)| id == back).unwrap().1;
    input.upsert(back, content.clone());
    live.insert(back.clone());
    svc.wait_metric("genfeed_live_items", |v| v == 14.0);
    let tokenizer = genfeed::tokenizer::FrozenTokenizer::load(&f.tokenizer).unwrap();
    let codes = tokenizer.content_codes(back, content).unwrap().codes;
    let mut last = HashMap::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        last.insert(user.clone(), input.interaction(&user, &ids[5]));
        seen.get_mut(&user).unwrap().push(ids[5].clone());
    }
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    let mut returned = 0;
    for (user, feed) in &got {
        assert_eq!(items_of(feed), expected(&live, &seen[user]), "{user}");
        if let Some(ranked) = feed.items.iter().find(|i| &i.item_id == back) {
            assert_eq!(ranked.sid[..codes.len()], codes[..], "{user}");
            returned += 1;
        }
    }
    assert!(returned > 0, "no unseen user got the returning item");
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// Each user's latest feed in `feeds`.
fn latest(feeds: &[Recommendation]) -> HashMap<&str, &Recommendation> {
    feeds.iter().map(|f| (f.user_id.as_str(), f)).collect()
}

/// A user who does nothing new still gets feeds that follow the catalogue:
/// the refresh pass (`feed.refresh_ms`) feeds every user again from the
/// same history, so an idle user's latest feed loses an item retired after
/// it and gains one that arrived after it. A refreshed feed names the
/// user's last interaction as its trigger and answers no event: nothing is
/// dead-lettered, and the stop is clean.
#[test]
fn an_idle_users_feed_is_refreshed_without_retired_items_and_with_new_ones() {
    let bed = Bed::new("refresh", 2, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    let mut live = upsert_first(&bed, 15);
    let feed = format!("{FEED}\nrefresh_ms = 300\nrefresh_batch = 4");
    let mut svc = Service::start(&bed.config("a", &feed));
    svc.wait_metric("genfeed_live_items", |v| v == 15.0);

    let ids: Vec<String> = live.iter().cloned().collect();
    let (seen, last) = two_items_each(input, &ids, 12);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    let retired = &ids[13];
    assert!(seen.values().all(|s| !s.contains(retired)));
    assert!(got.values().all(|f| items_of(f).contains(retired)));

    // No user interacts again: only a refresh can bring their feeds up to
    // the catalogue.
    input.retire(retired);
    live.remove(retired);
    let mut v = f.items[20].1.clone();
    v[0] += 1e-3;
    input.upsert("brand-new", v);
    live.insert("brand-new".into());
    svc.wait_metric("genfeed_live_items", |v| v == 15.0);
    out.read_until(
        Framing::Plain,
        &mut feeds,
        |feeds| {
            let latest = latest(feeds);
            last.keys().all(|u| {
                latest
                    .get(u.as_str())
                    .is_some_and(|f| items_of(f) == expected(&live, &seen[u]))
            })
        },
        "every user's latest feed without the retired item and with the new one",
    );
    for (user, feed) in latest(&feeds) {
        let at = &last[user];
        assert_eq!(
            (feed.trigger.partition, feed.trigger.offset),
            (at.partition, at.offset),
            "{user}: a refresh names the last interaction"
        );
    }
    assert!(svc.metric("genfeed_feeds_refreshed_total").unwrap() >= 12.0);
    let (_, metrics) = svc.get("/metrics").unwrap();
    let dead: f64 = metrics
        .lines()
        .filter_map(|l| {
            l.strip_prefix("genfeed_dead_letters_total{")?
                .rsplit_once(' ')?
                .1
                .parse::<f64>()
                .ok()
        })
        .sum();
    assert_eq!(dead, 0.0, "{metrics}");
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// Compaction leaves of an item retired long ago its retire (or tombstone)
/// alone. An instance that starts from such a topic keeps the item as a
/// retired one, as an instance that read its upserts does: its interactions
/// go into histories instead of costing a dead letter on every new
/// instance, and when it comes back, users who saw it are not offered it.
#[test]
fn a_retire_whose_upserts_were_compacted_away_keeps_the_item_known() {
    let bed = Bed::new("compacted", 1, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..10);
    // Not training items: those the registry knows from the start.
    let gone = &"gone-long-ago".to_string();
    input.retire(gone);
    input.tombstone(&t.catalogue, Some("gone-too"));
    let mut svc = Service::start(&bed.config("a", FEED));
    assert_eq!(
        svc.metric("genfeed_catalogue_retired_unseen_total"),
        Some(2.0)
    );
    assert_eq!(svc.metric("genfeed_live_items"), Some(10.0));

    let mut live: BTreeSet<String> = f.items[..10].iter().map(|(id, _)| id.clone()).collect();
    let (first, second) = (&f.items[0].0, &f.items[1].0);
    input.interaction("u", gone);
    let last = HashMap::from([
        ("u".to_string(), input.interaction("u", first)),
        ("v".to_string(), input.interaction("v", first)),
    ]);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    for user in ["u", "v"] {
        assert_eq!(
            items_of(&got[user]),
            expected(&live, std::slice::from_ref(first)),
            "{user}"
        );
    }
    let unknown = "genfeed_dead_letters_total{reason=\"unknown_item\"}";
    assert_eq!(svc.metric(unknown), Some(0.0), "{}", svc.log_text());
    assert_eq!(svc.metric("genfeed_interactions_waited_total"), Some(0.0));

    // It comes back: v, who never saw it, gets it; u does not.
    let mut content = f.items[20].1.clone();
    content[0] += 1e-3;
    input.upsert(gone, content);
    live.insert(gone.clone());
    svc.wait_metric("genfeed_live_items", |v| v == 11.0);
    let last = HashMap::from([
        ("u".to_string(), input.interaction("u", second)),
        ("v".to_string(), input.interaction("v", second)),
    ]);
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    assert_eq!(
        items_of(&got["u"]),
        expected(&live, &[gone.clone(), first.clone(), second.clone()])
    );
    assert_eq!(
        items_of(&got["v"]),
        expected(&live, &[first.clone(), second.clone()])
    );
    assert!(items_of(&got["v"]).contains(gone));
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// A producer that does not key the catalogue by item id spreads an item's
/// events over partitions whose offsets say nothing about each other: a
/// retire read after the item's upsert is applied whatever its offset, and
/// stays applied across a restart.
#[test]
fn an_items_events_spread_over_catalogue_partitions_are_applied_in_the_order_read() {
    let bed = Bed::new("unkeyed", 1, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    let mut live: BTreeSet<String> = BTreeSet::new();
    // Partition 0 runs ten offsets ahead of partition 1.
    for (id, v) in f.items.iter().take(10) {
        input.upsert_to(0, id, v.clone());
        live.insert(id.clone());
    }
    let config = bed.config("a", FEED);
    let mut svc = Service::start(&config);
    svc.wait_metric("genfeed_live_items", |v| v == 10.0);
    let gone = f.items[9].0.clone();
    let retired_at = input.retire_to(1, &gone);
    assert!(retired_at.offset < 9, "{retired_at:?}");
    live.remove(&gone);
    // Two new items after the retire on its partition: once both are live,
    // the retire was read (9 + 2 live; 12 if it were taken for a replay).
    for (id, v) in &f.items[10..12] {
        input.upsert_to(1, id, v.clone());
        live.insert(id.clone());
    }
    svc.wait_metric("genfeed_live_items", |v| v >= 11.0);

    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut round = |seen: &mut HashMap<String, Vec<String>>, k: usize| {
        let mut last = HashMap::new();
        for u in 0..10 {
            let user = format!("user-{u}");
            let item = &f.items[(u + k) % 9].0;
            last.insert(user.clone(), input.interaction(&user, item));
            seen.entry(user).or_default().push(item.clone());
        }
        for (user, feed) in feeds_answering(&out, Framing::Plain, &mut feeds, &last) {
            assert_eq!(items_of(&feed), expected(&live, &seen[&user]), "{user}");
        }
    };
    round(&mut seen, 0);
    assert!(svc.stop().success(), "{}", svc.log_text());
    let log = svc.log_all();
    assert!(
        log.lines()
            .any(|l| l.contains("more than one partition") && l.contains(&gone)),
        "no warning names {gone}:\n{log}"
    );

    let mut svc = Service::start(&config);
    assert_eq!(svc.metric("genfeed_live_items"), Some(11.0));
    round(&mut seen, 1);
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// A restore that takes a while (a long changelog partition) runs off the
/// async runtime: `/healthz` answers while it goes on, `/readyz` says not
/// ready until it is done, and then every record was read.
#[test]
fn a_long_restore_does_not_stop_healthz_and_ready_waits_for_it() {
    const RECORDS: usize = 200_000;
    let bed = Bed::new("restore", 1, Framing::Plain);
    let input = &bed.input;
    bed.upsert_items(..15);
    input.changelog_records(RECORDS);
    let mut svc = Service::spawn(&bed.config("a", FEED));
    svc.wait_for(
        |s| s.log_all().contains("partitions assigned").then_some(()),
        "the partitions' assignment",
    );
    let health = svc.get("/healthz").map(|(code, _)| code);
    let ready = svc.get("/readyz").map(|(code, _)| code);
    assert!(
        !svc.log_all().contains("restore done"),
        "the restore was over before /healthz was asked; the test needs a longer changelog"
    );
    assert_eq!(health, Some(200));
    assert_eq!(ready, Some(503));
    svc.wait_for(
        |s| s.get("/readyz").filter(|(code, _)| *code == 200),
        "readiness after the restore",
    );
    assert_eq!(
        svc.metric("genfeed_changelog_restored_total"),
        Some(RECORDS as f64)
    );
    assert!(svc.stop().success());
}

/// An item that arrives after training reaches the feed of the user whose
/// history it fits, by its content alone and with no retraining, ahead of
/// what the model knows; an unrelated newcomer does not.
#[test]
fn a_fresh_item_reaches_the_feed_of_the_user_it_fits_without_retraining() {
    let bed = Bed::new("fresh", 1, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..15);
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    };
    // The user's last item, and the known item least like it.
    let (last, near) = &f.items[3];
    let (_, far) = f.items[..15]
        .iter()
        .min_by(|a, b| cos(&a.1, near).total_cmp(&cos(&b.1, near)))
        .unwrap();
    input.upsert("fresh-near", near.clone());
    input.upsert("fresh-far", far.clone());
    // The weight as given: at the default half two fresh items get 9% of it.
    let feed = "beams = 20\ntop_k = 3\ncoalesce_ms = 5\nbatch_wait_ms = 5\nfresh_weight = 0.5\nfresh_after = 1\nfresh_half_at = 0";
    let mut svc = Service::start(&bed.config("a", feed));
    assert_eq!(svc.metric("genfeed_live_items"), Some(17.0));
    assert_eq!(svc.metric("genfeed_fresh_items"), Some(2.0));
    input.interaction("u", &f.items[7].0);
    let at = HashMap::from([("u".to_string(), input.interaction("u", last))]);
    let out = Output::new(&t.recommendations, 1);
    let got = feeds_answering(&out, Framing::Plain, &mut Vec::new(), &at);
    let ids: Vec<&str> = got["u"].items.iter().map(|i| i.item_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    // Its score would put it first (the unit tests measure that); the
    // feed's first position is kept for the model's best.
    assert!(!ids[0].starts_with("fresh"), "{ids:?}");
    assert_eq!(ids[1], "fresh-near", "{ids:?}");
    assert!(!ids.contains(&"fresh-far"), "{ids:?}");
    assert!(svc.stop().success());

    // The key reaches the fresh set (which items it keeps: the unit tests).
    let mut svc = Service::start(&bed.config("b", &format!("{feed}\nfresh_max = 1")));
    assert_eq!(svc.metric("genfeed_fresh_items"), Some(1.0));
    assert!(svc.stop().success());
}

/// Where the model directory holds a TF-IDF weighting (`fit-affinity`
/// writes it), fresh items are scored by the words of their catalogue
/// events, not by their SIDs: the newcomer that shares the user's last
/// item's words reaches the feed, the one that shares only its embedding
/// does not. The words are kept with the registry: after a restart, which
/// reads none of the earlier catalogue events again, a new user whose
/// last item is the same gets the same newcomer. Items read while the
/// model had no weighting, or another one, have their words weighed anew
/// when it comes: the catalogue is read again once.
#[test]
fn fresh_items_are_scored_by_their_catalogue_words_across_a_restart() {
    use genfeed::contract::ItemUpsert;

    let bed = Bed::new("words", 1, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    let words = |i: usize| format!("w{i} g{}", i % 3);
    // The training catalogue's words, weighed once into the model's copy.
    let catalogue = bed.dir.path().join("words.item");
    let mut text = String::from("item_id:token\tattributes:token_seq\n");
    for (i, (id, _)) in f.items[..15].iter().enumerate() {
        text.push_str(&format!("{id}\t{}\n", words(i)));
    }
    std::fs::write(&catalogue, text).unwrap();
    let model = bed.dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(&f.model).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
    }
    let items = genfeed::dataset::read_items(&catalogue).unwrap();
    genfeed::embed::tfidf::TfIdf::fit(&items, 64)
        .save(&model)
        .unwrap();
    let upsert = |id: &str, embedding: &[f32], words: String| {
        input.upsert_item(ItemUpsert {
            item_id: id.into(),
            attributes: [("attributes".to_string(), words)].into(),
            embedding: Some(embedding.to_vec()),
            ..Default::default()
        })
    };
    for (i, (id, v)) in f.items[..15].iter().enumerate() {
        upsert(id, v, words(i));
    }
    let (last, near) = &f.items[3];
    // Item 8's words share nothing with item 3's ("w8 g2" against "w3 g0").
    upsert("fresh-embedding", near, words(8));
    upsert("fresh-words", &f.items[8].1, words(3));
    // Dead-lettered on the first read, not on the re-reads.
    input.raw(&t.catalogue, "junk", b"\x07garbage");
    let undecodable = "genfeed_dead_letters_total{reason=\"undecodable\"}";
    let feed = "beams = 20\ntop_k = 3\ncoalesce_ms = 5\nbatch_wait_ms = 5\nfresh_weight = 0.5\nfresh_after = 1\nfresh_half_at = 0";
    // Asked for by name where the model has no weighting: a clear refusal.
    let refused = bed.config("none", &format!("{feed}\nfresh_content = \"catalogue\""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_genfeed"))
        .args(["run", "--config", refused.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("feed.fresh_content") && err.contains("content-tfidf.json"),
        "{err}"
    );
    let cfg = bed.config("a", feed);
    // First without a weighting: fresh items scored by their SIDs, no
    // words stored.
    let mut svc = Service::start(&cfg);
    assert_eq!(svc.metric("genfeed_catalogue_events_total"), Some(18.0));
    assert_eq!(svc.metric(undecodable), Some(1.0));
    assert!(svc.stop().success());
    let text = std::fs::read_to_string(&cfg).unwrap();
    let moved = text.replace(
        &format!("model = \"{}\"", f.model.display()),
        &format!("model = \"{}\"", model.display()),
    );
    assert_ne!(text, moved);
    std::fs::write(&cfg, moved).unwrap();
    let feed_of = |user: &str| {
        input.interaction(user, &f.items[7].0);
        let at = HashMap::from([(user.to_string(), input.interaction(user, last))]);
        let out = Output::new(&t.recommendations, 2);
        let got = feeds_answering(&out, Framing::Plain, &mut Vec::new(), &at);
        let ids: Vec<String> = got[user].items.iter().map(|i| i.item_id.clone()).collect();
        ids
    };
    // With it, the catalogue is read again for the words; then not.
    let weighed = |user: &str, events: f64| {
        let mut svc = Service::start(&cfg);
        assert_eq!(svc.metric("genfeed_catalogue_events_total"), Some(events));
        assert_eq!(svc.metric(undecodable), Some(0.0));
        assert_eq!(svc.metric("genfeed_fresh_items"), Some(2.0));
        let ids = feed_of(user);
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert_eq!(ids[1], "fresh-words", "{ids:?}");
        assert!(!ids.contains(&"fresh-embedding".to_string()), "{ids:?}");
        assert!(svc.stop().success());
    };
    weighed("u", 18.0);
    weighed("v", 0.0);
    // Another fit hashes the words to other buckets: weighed anew.
    genfeed::embed::tfidf::TfIdf::fit(&items, 96)
        .save(&model)
        .unwrap();
    weighed("w", 18.0);
    weighed("x", 0.0);
}

/// Ready means the whole catalogue written before start-up is read and
/// decodable, not that the topic went quiet; the end markers that tell where
/// it ends are skipped, not dead-lettered, on this start and the next.
#[test]
fn ready_means_the_catalogue_written_before_start_is_all_read_on_every_start() {
    let bed = Bed::new("ready", 2, Framing::Plain);
    let f = bed.fixture;
    bed.upsert_items(..150);
    let cfg = bed.config("a", FEED);
    let undecodable = "genfeed_dead_letters_total{reason=\"undecodable\"}";
    let mut svc = Service::start(&cfg);
    assert_eq!(svc.metric("genfeed_live_items"), Some(150.0));
    assert_eq!(svc.metric("genfeed_catalogue_events_total"), Some(150.0));
    assert!(svc.stop().success());

    bed.upsert_items(150..);
    let mut svc = Service::start(&cfg);
    assert_eq!(svc.metric("genfeed_live_items"), Some(f.items.len() as f64));
    assert_eq!(
        svc.metric("genfeed_catalogue_events_total"),
        Some((f.items.len() - 150) as f64),
        "a restart reads only what came after the stored offsets"
    );
    assert_eq!(svc.metric(undecodable), Some(0.0));
    assert!(svc.stop().success());
}

#[test]
fn poison_messages_are_dead_lettered_with_a_reason_and_processing_goes_on() {
    use genfeed::contract::DeadLetter;

    let bed = Bed::new("poison", 1, Framing::Confluent);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..10);
    // Records that are not histories in the histories topic, as anyone who
    // can write to it can put there: the restore and the learnt counts
    // skip each, with a line per quiet period, not per record.
    const NOT_HISTORIES: usize = 40;
    for k in 0..NOT_HISTORIES {
        input.raw(&t.histories, &format!("g{k}"), b"\xffnot a history");
    }
    let mut svc = Service::start(&bed.config("a", FEED));
    svc.wait_metric("genfeed_live_items", |v| v == 10.0);

    let item = &f.items[0].0;
    let mut poison: Vec<(String, At, &str)> = Vec::new();
    let mut push =
        |topic: &str, at: At, reason: &'static str| poison.push((topic.to_string(), at, reason));
    // Catalogue: wrong dimension, NaN, all zeros.
    push(
        &t.catalogue,
        input.upsert("short", vec![0.5; 3]),
        "bad_embedding",
    );
    let mut nan = f.items[30].1.clone();
    nan[2] = f32::NAN;
    push(&t.catalogue, input.upsert("nan", nan), "bad_embedding");
    let zeros = vec![0.0; f.items[30].1.len()];
    push(&t.catalogue, input.upsert("zeros", zeros), "bad_embedding");
    // A tombstone that names no item, and an empty value, which is not a
    // tombstone.
    push(
        &t.catalogue,
        input.tombstone(&t.catalogue, None),
        "undecodable",
    );
    push(
        &t.catalogue,
        input.raw(&t.catalogue, item, b""),
        "undecodable",
    );
    // Interactions: garbage, an unknown schema id, a datum missing its last
    // field, an unknown item, an empty user id.
    push(
        &t.interactions,
        input.raw(&t.interactions, "x", b"\x07garbage bytes"),
        "undecodable",
    );
    let mut framed = vec![0, 0, 0, 0, 99];
    framed.extend_from_slice(b"\x02u\x02i\x02");
    push(
        &t.interactions,
        input.raw(&t.interactions, "x", &framed),
        "unknown_schema",
    );
    let mut truncated = vec![0, 0, 0, 0, 2];
    truncated.extend_from_slice(b"\x04u1\x04i1\x02"); // no timestamp
    push(
        &t.interactions,
        input.raw(&t.interactions, "x", &truncated),
        "undecodable",
    );
    let good_user_before = input.interaction("good-1", item);
    push(
        &t.interactions,
        input.interaction("u2", "no-such-item"),
        "unknown_item",
    );
    let mut empty = vec![0, 0, 0, 0, 2];
    empty.extend_from_slice(b"\x00\x04i1\x02\x02");
    push(
        &t.interactions,
        input.raw(&t.interactions, "x", &empty),
        "invalid_record",
    );
    // Keyed by another id than its user's, as a careless producer writes
    // it: applied (counted and logged, so it shows).
    let good_user_after = input.interaction_keyed("good-2", item, "x");

    let dlq = Output::new(&t.dead_letters, 1);
    let mut letters: Vec<DeadLetter> = Vec::new();
    dlq.read_until(
        Framing::Confluent,
        &mut letters,
        |l| l.len() >= poison.len(),
        "dead letters",
    );
    assert_eq!(letters.len(), poison.len());
    for (topic, at, reason) in &poison {
        let l = letters
            .iter()
            .find(|l| {
                &l.source_topic == topic && l.partition == at.partition && l.offset == at.offset
            })
            .unwrap_or_else(|| panic!("no dead letter for {topic} {at:?} ({reason})"));
        assert!(l.reason.starts_with(reason), "{} for {reason}", l.reason);
        // The empty records' raw is their (absent or empty) value.
        assert_eq!(
            l.raw.is_empty(),
            l.reason.contains("tombstone"),
            "{}",
            l.reason
        );
    }
    let by_reason = |r: &str| {
        letters
            .iter()
            .find(|l| l.reason.starts_with(r))
            .unwrap()
            .reason
            .clone()
    };
    assert!(by_reason("bad_embedding").contains("\"embedding\""));
    let zeros = letters
        .iter()
        .find(|l| l.reason.contains("\"zeros\""))
        .unwrap();
    assert!(zeros.reason.contains("all zeros"), "{}", zeros.reason);
    assert!(by_reason("unknown_schema").contains("99"));
    assert!(by_reason("undecodable: empty").contains("tombstone"));
    assert!(by_reason("undecodable: a tombstone").contains("no key"));
    let unknown = letters
        .iter()
        .find(|l| l.reason.contains("no-such-item"))
        .unwrap();
    assert!(unknown.reason.contains("item_id"), "{}", unknown.reason);
    assert!(unknown.reason.contains("waited"), "{}", unknown.reason);

    // The good messages around the poison were served.
    let out = Output::new(&t.recommendations, 2);
    let last = HashMap::from([
        ("good-1".to_string(), good_user_before),
        ("good-2".to_string(), good_user_after),
    ]);
    let got = feeds_answering(&out, Framing::Confluent, &mut Vec::new(), &last);
    assert_eq!(got.len(), 2);
    assert_eq!(svc.metric("genfeed_interactions_miskeyed_total"), Some(1.0));
    assert!(svc
        .log_text()
        .contains("key the interactions' records by user_id"));
    assert_eq!(
        svc.metric("genfeed_dead_letters_total{reason=\"bad_embedding\"}"),
        Some(3.0),
        "{:?}",
        svc.log_text()
    );
    assert_eq!(svc.metric("genfeed_live_items"), Some(10.0));
    let log = svc.log_text();
    assert!(
        log.contains(&format!("skipped={NOT_HISTORIES}")),
        "the restore read the records that are not histories: {log}"
    );
    svc.wait_for(
        |s| s.log_text().contains("not counted").then_some(()),
        "the learnt counts to read the records that are not histories",
    );
    let log = svc.log_text();
    for line in ["skipping a changelog record", "not counted"] {
        let lines = log.matches(line).count();
        assert!((1..=2).contains(&lines), "{lines} lines {line:?}: {log}");
    }
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// Items and interactions are separate topics: an interaction can come
/// before its item. It waits for the item's catalogue event and is then
/// applied, and its user's later interactions wait behind it, so the
/// history keeps their order; other users go on meanwhile.
/// Producers compress their batches as they are configured to, and a batch
/// the service's client cannot decompress is worse than a poison message:
/// it is not a record, so it cannot be dead-lettered, and the client
/// fetches it again and again, stalling its partition for good. Every codec
/// a Kafka producer offers is read: one user per codec on one partition,
/// zstd's first, so a stall behind it would starve the rest. The user ids
/// are long (within the 256 bytes allowed) and repetitive so that each
/// batch really is compressed (librdkafka sends a batch plain where
/// compressing would not shrink it).
#[test]
fn interactions_in_batches_of_every_compression_codec_are_read() {
    let bed = Bed::new("codecs", 1, Framing::Plain);
    let (f, t) = (bed.fixture, &bed.topics);
    bed.upsert_items(..15);
    let mut svc = Service::start(&bed.config("a", "coalesce_ms = 5\nbatch_wait_ms = 5"));
    let mut last = HashMap::new();
    for codec in ["zstd", "lz4", "snappy", "gzip", "none"] {
        let user = format!("{codec}-{}", "u".repeat(200));
        let at = bed
            .input
            .compressed(codec)
            .interaction(&user, &f.items[1].0);
        last.insert(user, at);
    }
    let out = Output::new(&t.recommendations, 2);
    let got = feeds_answering(&out, Framing::Plain, &mut Vec::new(), &last);
    assert_eq!(got.len(), 5);
    assert_eq!(svc.metric("genfeed_consumer_errors_total"), Some(0.0));
    assert!(svc.stop().success());
}

#[test]
fn an_interaction_that_comes_before_its_item_waits_for_it_and_keeps_its_order() {
    let bed = Bed::new("early", 1, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..10);
    // An hour: only the item's publish can send it on within the test.
    let cfg = bed.config_adding("a", FEED, "[catalogue]", "item_wait_ms = 3600000");
    let mut svc = Service::start(&cfg);
    svc.wait_metric("genfeed_live_items", |v| v == 10.0);

    let (late, known) = (&f.items[12].0, &f.items[0].0);
    input.interaction("u", late);
    svc.wait_metric("genfeed_interactions_waiting", |v| v == 1.0);
    let u_last = input.interaction("u", known);
    let v_last = input.interaction("v", &f.items[1].0);
    let out = Output::new(&t.recommendations, 1);
    let mut feeds = Vec::new();
    let v_only = HashMap::from([("v".to_string(), v_last)]);
    feeds_answering(&out, Framing::Plain, &mut feeds, &v_only);
    assert!(
        feeds.iter().all(|r| r.user_id == "v"),
        "u's wait for the item"
    );
    assert_eq!(svc.metric("genfeed_interactions_waiting"), Some(2.0));

    input.upsert(late, f.items[12].1.clone());
    let u_only = HashMap::from([("u".to_string(), u_last)]);
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &u_only);
    let live: BTreeSet<String> = f.items[..10]
        .iter()
        .chain([&f.items[12]])
        .map(|(id, _)| id.clone())
        .collect();
    // Both are in the history: the feed leaves out both items.
    assert_eq!(
        items_of(&got["u"]),
        expected(&live, &[late.clone(), known.clone()])
    );
    assert_eq!(svc.metric("genfeed_interactions_waited_total"), Some(2.0));
    assert_eq!(svc.metric("genfeed_interactions_waiting"), Some(0.0));
    assert_eq!(
        svc.metric("genfeed_interactions_replayed_total"),
        Some(0.0),
        "the later one was not applied first"
    );
    assert_eq!(
        svc.metric("genfeed_dead_letters_total{reason=\"unknown_item\"}"),
        Some(0.0)
    );
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// Interactions waiting for their item belong to their partition: when a
/// second instance joins, every partition is revoked (eager rebalancing)
/// and handed out again. The instance that loses one drops its waiting
/// interactions (its new owner reads them again from the last commit,
/// which is before them); one that gets its own partition back
/// reads them again, and the copies it still holds keep their place. Either
/// way, when the item comes, each user gets a feed, each interaction is
/// applied once, and nothing is dead-lettered.
#[test]
fn interactions_waiting_for_their_item_survive_a_rebalance() {
    let bed = Bed::new("wait-moves", 4, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..10);
    let cfg = |name| bed.config_adding(name, FEED, "[catalogue]", "item_wait_ms = 3600000");
    let mut a = Service::start(&cfg("a"));
    a.wait_metric("genfeed_assigned_partitions", |v| v == 4.0);
    let late = &f.items[12].0;
    let users: Vec<String> = (0..16).map(|k| format!("w{k}")).collect();
    let mut last = HashMap::new();
    for u in &users {
        last.insert(u.clone(), input.interaction(u, late));
    }
    let parts: BTreeSet<i32> = last.values().map(|at| at.partition).collect();
    assert!(parts.len() >= 2, "users on one partition: {parts:?}");
    a.wait_metric("genfeed_interactions_waiting", |v| v == 16.0);

    let mut b = Service::start(&cfg("b"));
    b.wait_metric("genfeed_assigned_partitions", |v| v >= 1.0);
    a.wait_metric("genfeed_assigned_partitions", |v| (1.0..4.0).contains(&v));
    // Each waiting interaction is counted where it waits, once: the one
    // that lost partitions no longer counts theirs.
    const WAITING: &str = "genfeed_interactions_waiting";
    a.wait_for(
        |a| (a.metric(WAITING)? + b.metric(WAITING)? == 16.0).then_some(()),
        "the two instances' waiting interactions to add up to 16",
    );
    input.upsert(late, f.items[12].1.clone());
    let out = Output::new(&t.recommendations, 2);
    let got = feeds_answering(&out, Framing::Plain, &mut Vec::new(), &last);
    let live: BTreeSet<String> = f.items[..10]
        .iter()
        .chain([&f.items[12]])
        .map(|(id, _)| id.clone())
        .collect();
    for u in &users {
        assert_eq!(
            items_of(&got[u]),
            expected(&live, std::slice::from_ref(late)),
            "{u}"
        );
    }
    for s in [&mut a, &mut b] {
        s.wait_metric("genfeed_interactions_waiting", |v| v == 0.0);
        assert_eq!(
            s.metric("genfeed_dead_letters_total{reason=\"unknown_item\"}"),
            Some(0.0)
        );
        // Applied once: a second copy would be dropped as a replay.
        assert_eq!(s.metric("genfeed_interactions_replayed_total"), Some(0.0));
    }
    assert!(a.stop().success(), "{}", a.log_text());
    assert!(b.stop().success(), "{}", b.log_text());
}

/// A histories store that cannot write (a full disk; here a file-size
/// limit, which fails writes the same way) is not the fault of the
/// interactions in flight, and would fail every one after them: the service
/// stops with the store's error instead of dead-lettering them all, and a
/// restart with room answers every interaction, none lost.
#[test]
fn a_store_that_cannot_write_stops_the_service_and_a_restart_loses_nothing() {
    let bed = Bed::new("disk-full", 2, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..15);
    let cfg = bed.config("a", FEED);
    let mut svc = Service::start(&cfg);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let mut last = HashMap::new();
    let wave = |last: &mut HashMap<String, At>, from: usize, n: usize| {
        for k in from..from + n {
            let u = format!("u{k}");
            last.insert(u.clone(), input.interaction(&u, &f.items[k % 15].0));
        }
    };
    wave(&mut last, 0, 20);
    feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    // The histories file may not grow: new users soon need it to.
    let histories = svc.state.join("histories/histories.redb");
    svc.limit_file_size(std::fs::metadata(&histories).unwrap().len());
    let mut users = 20;
    while svc.running() && users < 10_000 {
        wave(&mut last, users, 200);
        users += 200;
    }
    let status = svc.exited();
    let log = svc.log_all();
    assert!(!log.contains("dead letter"), "{log}");
    assert_eq!(status.code(), Some(2), "{log}");
    // The feed worker or the consumer's appends, whichever writes first.
    assert!(log.contains("File too large"), "{log}");
    let error = &log[log.rfind("\nerror: ").unwrap()..];
    assert!(error.contains("histories.redb"), "{log}");

    let mut svc = Service::start(&cfg);
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    assert_eq!(got.len(), users);
    assert_eq!(
        svc.metric("genfeed_dead_letters_total{reason=\"feed_failed\"}"),
        Some(0.0)
    );
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// Deleting a topic the service reads crashed it: librdkafka looked a
/// fetch response's topic up by a null name (`src/librdkafka_guard.rs`).
/// Now the service lives through it, and reads the topic once it is made
/// again.
#[test]
fn a_topic_deleted_under_the_service_and_made_again_is_read_again() {
    let bed = Bed::new("remade", 2, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..10);
    let mut svc = Service::start(&bed.config("a", FEED));
    svc.wait_metric("genfeed_assigned_partitions", |v| v == 2.0);
    harness::delete_topic(&t.interactions);
    svc.wait_for(
        |s| s.log_all().contains("not found in cache").then_some(()),
        "the fetch response that named the deleted topic by a null name",
    );
    harness::create_topic(&t.interactions, 2);
    let out = Output::new(&t.recommendations, 2);
    let mut last = HashMap::new();
    for k in 0..8 {
        let u = format!("r{k}");
        last.insert(u.clone(), input.interaction(&u, &f.items[k].0));
    }
    let got = feeds_answering(&out, Framing::Plain, &mut Vec::new(), &last);
    assert_eq!(got.len(), 8);
    assert!(svc.stop().success(), "{}", svc.log_text());
}

#[test]
fn oversized_messages_cost_one_dead_letter_each_cut_to_fit_and_the_service_goes_on() {
    use genfeed::contract::{DeadLetter, ItemUpsert};

    let bed = Bed::new("oversize", 1, Framing::Confluent);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..10);
    // Outputs of at most 64 KiB: every oversized input below is larger.
    let max = 65_536;
    let cfg = bed.config_adding(
        "a",
        FEED,
        "session_timeout_ms = 6000",
        &format!("message_max_bytes = {max}"),
    );
    let mut svc = Service::start(&cfg);
    svc.wait_metric("genfeed_live_items", |v| v == 10.0);

    let item = &f.items[0].0;
    let big = 300_000;
    let good_before = input.interaction("good-1", item);
    // A valid interaction whose user id is 300 kB: it would be a key, a
    // history and a feed no output topic takes.
    let long_user = input.interaction(&"u".repeat(big), item);
    // 300 kB of garbage: its dead letter cannot carry it whole.
    let garbage: Vec<u8> = (0..big).map(|i| (1 + i * 7 % 251) as u8).collect();
    let junk = input.raw(&t.interactions, "x", &garbage);
    // An item whose title is 300 kB.
    let long_title = input.upsert_item(ItemUpsert {
        item_id: "long-title".into(),
        title: Some("t".repeat(big)),
        embedding: Some(f.items[20].1.clone()),
        ..Default::default()
    });
    let good_after = input.interaction("good-2", item);

    let dlq = Output::new(&t.dead_letters, 1);
    let mut letters: Vec<DeadLetter> = Vec::new();
    dlq.read_until(
        Framing::Confluent,
        &mut letters,
        |l| l.len() >= 3,
        "dead letters",
    );
    assert_eq!(letters.len(), 3, "{letters:?}");
    let letter = |topic: &str, at: At| {
        letters
            .iter()
            .find(|l| {
                l.source_topic == topic && l.partition == at.partition && l.offset == at.offset
            })
            .unwrap_or_else(|| panic!("no dead letter for {topic} {at:?}"))
    };
    let user = letter(&t.interactions, long_user);
    assert!(user.reason.starts_with("too_large"), "{}", user.reason);
    assert!(user.reason.contains("user_id"), "{}", user.reason);
    assert!(
        user.reason.contains(&format!("{big} bytes")),
        "{}",
        user.reason
    );
    let title = letter(&t.catalogue, long_title);
    assert!(title.reason.starts_with("too_large"), "{}", title.reason);
    assert!(title.reason.contains("change.title"), "{}", title.reason);
    let junk = letter(&t.interactions, junk);
    assert!(junk.reason.starts_with("undecodable"), "{}", junk.reason);
    // Every letter was cut to fit and says so; what it keeps is the start
    // of the input as it came.
    for l in [user, title, junk] {
        assert!(
            l.raw.len() < max && !l.raw.is_empty(),
            "{} bytes",
            l.raw.len()
        );
        assert!(
            l.reason.contains(&format!("raw cut to {} of", l.raw.len())),
            "{}",
            l.reason
        );
    }
    assert_eq!(junk.raw[..], garbage[..junk.raw.len()]);
    assert!(
        junk.reason.ends_with(&format!("of {big} bytes")),
        "{}",
        junk.reason
    );

    // The service went on: the users before and after were served, and
    // nothing else is in the catalogue.
    let out = Output::new(&t.recommendations, 2);
    let last = HashMap::from([
        ("good-1".to_string(), good_before),
        ("good-2".to_string(), good_after),
    ]);
    let got = feeds_answering(&out, Framing::Confluent, &mut Vec::new(), &last);
    assert_eq!(got.len(), 2);
    assert_eq!(
        svc.metric("genfeed_dead_letters_total{reason=\"too_large\"}"),
        Some(2.0)
    );
    assert_eq!(svc.metric("genfeed_live_items"), Some(10.0));
    assert!(svc.stop().success(), "{}", svc.log_text());
    // Every offset was committed, the dead letters' too: after a restart
    // only what comes next is read (one partition, read in order).
    let mut again = Service::start(&cfg);
    let next = input.interaction("good-3", item);
    let last = HashMap::from([("good-3".to_string(), next)]);
    assert_eq!(
        feeds_answering(&out, Framing::Confluent, &mut Vec::new(), &last).len(),
        1
    );
    assert_eq!(again.metric("genfeed_interaction_events_total"), Some(1.0));
    assert!(again.stop().success(), "{}", again.log_text());
}

/// The interactions of `users` users, `per_user` each, as (user, item).
fn wave(f: &harness::Fixture, users: usize, per_user: usize, seed: usize) -> Vec<(String, String)> {
    (0..per_user)
        .flat_map(|k| {
            (0..users).map(move |u| {
                let item = &f.items[(u * 7 + k * 3 + seed) % 15].0;
                (format!("user-{u}"), item.clone())
            })
        })
        .collect()
}

#[test]
fn kill_9_mid_stream_then_restart_loses_no_interaction() {
    use genfeed::catalogue::{Catalogue, CatalogueConfig};
    use genfeed::service::histories::Histories;
    use genfeed::tokenizer::FrozenTokenizer;

    let bed = Bed::new("crash", 2, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..15);
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    let mut last: HashMap<String, At> = HashMap::new();
    let mut send = |events: Vec<(String, String)>| {
        for (user, item) in events {
            last.insert(user.clone(), input.interaction(&user, &item));
            sent.entry(user).or_default().push(item);
        }
    };
    send(wave(f, 40, 3, 0));
    let cfg = bed.config("a", FEED);
    let mut svc = Service::start(&cfg);
    svc.wait_metric("genfeed_feeds_total", |v| v >= 1.0);
    svc.kill9();
    send(wave(f, 40, 2, 1));

    let mut svc = Service::start(&cfg);
    let out = Output::new(&t.recommendations, 2);
    let got = feeds_answering(&out, Framing::Plain, &mut Vec::new(), &last);
    assert_eq!(got.len(), 40);
    assert!(svc.stop().success(), "{}", svc.log_text());

    // Every interaction is in its user's history exactly once, in order.
    let tokenizer = std::sync::Arc::new(FrozenTokenizer::load(&f.tokenizer).unwrap());
    let state = bed.dir.path().join("a");
    let (catalogue, _) =
        Catalogue::open(tokenizer, &CatalogueConfig::new(state.join("catalogue"))).unwrap();
    let histories = Histories::open(&state.join("histories"), 50).unwrap();
    let mut ords = Vec::new();
    for (user, items) in &sent {
        histories.get(user, &mut ords).unwrap();
        let want: Vec<u32> = items
            .iter()
            .map(|i| catalogue.registry().get(i).unwrap().unwrap().ord)
            .collect();
        assert_eq!(ords, want, "{user}");
    }
}

/// A producer that does not key interactions by user spreads a user's over
/// partitions. After kill -9 the service reads them again from the last
/// commit (here: none), and each must be taken for the replay it is on its
/// own partition. With one position per user, those on another partition
/// than the last were appended again. An instance that starts empty takes
/// the history from the changelog, whose records are on three partitions
/// and are read in any order between them: the newest must win, with the
/// positions it was applied up to, or the replays are appended again (or
/// an older record put back, losing items).
#[test]
fn a_users_interactions_on_several_partitions_are_each_held_once_after_kill_9() {
    use genfeed::catalogue::{Catalogue, CatalogueConfig};
    use genfeed::service::histories::Histories;
    use genfeed::tokenizer::FrozenTokenizer;

    let bed = Bed::new("spread", 3, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..15);
    let cfg = bed.config_adding(
        "a",
        FEED,
        "listen = \"127.0.0.1:0\"",
        "[kafka.properties]\n\"auto.commit.interval.ms\" = \"3600000\"",
    );
    let mut svc = Service::start(&cfg);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let items: Vec<&str> = f.items[..9].iter().map(|(id, _)| id.as_str()).collect();
    // One at a time, each answered (so applied and on disk) before the next.
    for (k, item) in items.iter().enumerate() {
        let at = input.interaction_to(k as i32 % 3, "spread", item);
        feeds_answering(
            &out,
            Framing::Plain,
            &mut feeds,
            &HashMap::from([("spread".to_string(), at)]),
        );
    }
    svc.kill9();

    let mut svc = Service::start(&cfg);
    svc.wait_metric("genfeed_interaction_events_total", |v| v >= 9.0);
    assert!(svc.stop().success(), "{}", svc.log_text());

    let held = |state: &std::path::Path| {
        let tokenizer = std::sync::Arc::new(FrozenTokenizer::load(&f.tokenizer).unwrap());
        let (catalogue, _) =
            Catalogue::open(tokenizer, &CatalogueConfig::new(state.join("catalogue"))).unwrap();
        let histories = Histories::open(&state.join("histories"), 50).unwrap();
        let mut ords = Vec::new();
        histories.get("spread", &mut ords).unwrap();
        let sent: Vec<u32> = items
            .iter()
            .map(|i| catalogue.registry().get(i).unwrap().unwrap().ord)
            .collect();
        (ords, sent)
    };
    let (ords, sent) = held(&bed.dir.path().join("a"));
    assert_eq!(ords, sent);

    // Another group: it reads every interaction again after the restore.
    let cfg = bed.config_adding(
        "b",
        FEED,
        "listen = \"127.0.0.1:0\"",
        "[kafka.properties]\n\"auto.commit.interval.ms\" = \"3600000\"",
    );
    rewrite(
        &cfg,
        &[("group_id", format!("group_id = \"{}-b\"", t.group))],
    );
    let mut svc = Service::start(&cfg);
    svc.wait_metric("genfeed_interaction_events_total", |v| v >= 9.0);
    assert!(svc.stop().success(), "{}", svc.log_text());
    let (ords, sent) = held(&bed.dir.path().join("b"));
    assert_eq!(ords, sent);
}

/// A clean stop commits every answered interaction, also those a feed
/// answered together (a user's events within `coalesce_ms`): the next start
/// reads none of them again. It used to read the whole topic again, and
/// feed every user anew, whenever one feed had answered two interactions
/// of a partition.
#[test]
fn a_clean_restart_reads_no_answered_interaction_again() {
    let bed = Bed::new("commit", 2, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..15);
    let cfg = bed.config("a", FEED);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    // Each round is written before the service starts: read as a backlog,
    // a user's three interactions come within `coalesce_ms`.
    let send = |seed: usize| -> HashMap<String, At> {
        wave(f, 20, 3, seed)
            .into_iter()
            .map(|(user, item)| {
                let at = input.interaction(&user, &item);
                (user, at)
            })
            .collect()
    };
    let last = send(0);
    let mut svc = Service::start(&cfg);
    assert_eq!(
        feeds_answering(&out, Framing::Plain, &mut feeds, &last).len(),
        20
    );
    let coalesced = svc.metric("genfeed_feeds_total").unwrap();
    assert!(coalesced < 60.0, "no feed answered two interactions");
    assert!(svc.stop().success(), "{}", svc.log_text());

    // Once the new round is answered, a replay would have been read: each
    // partition is read in order.
    let last = send(1);
    let mut svc = Service::start(&cfg);
    assert_eq!(
        feeds_answering(&out, Framing::Plain, &mut feeds, &last).len(),
        20
    );
    assert_eq!(svc.metric("genfeed_interactions_replayed_total"), Some(0.0));
    assert_eq!(svc.metric("genfeed_interaction_events_total"), Some(60.0));
    assert!(svc.stop().success(), "{}", svc.log_text());
}

#[test]
fn two_instances_split_the_partitions_and_a_rebalance_loses_nothing() {
    let bed = Bed::new("group", 4, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    let live: BTreeSet<String> = f.items[..15].iter().map(|(id, _)| id.clone()).collect();
    bed.upsert_items(..15);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    // Every user's feed must leave out everything the user saw, on
    // whichever instance: histories follow their partitions.
    let mut round = |seed: usize| {
        let mut last = HashMap::new();
        for (user, item) in wave(f, 40, 2, seed) {
            last.insert(user.clone(), input.interaction(&user, &item));
            seen.entry(user).or_default().push(item);
        }
        let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
        for (user, feed) in &got {
            assert_eq!(items_of(feed), expected(&live, &seen[user]), "{user}");
        }
        got.len()
    };

    let mut a = Service::start(&bed.config("a", FEED));
    a.wait_metric("genfeed_assigned_partitions", |v| v == 4.0);
    assert_eq!(round(0), 40);

    let mut b = Service::start(&bed.config("b", FEED));
    b.wait_metric("genfeed_assigned_partitions", |v| v >= 1.0);
    a.wait_metric("genfeed_assigned_partitions", |v| (1.0..4.0).contains(&v));
    let feeds_of = |s: &Service| s.metric("genfeed_feeds_total").unwrap();
    let before = (feeds_of(&a), feeds_of(&b));
    assert_eq!(round(1), 40);
    let after = (feeds_of(&a), feeds_of(&b));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "both serve: {before:?} → {after:?}"
    );

    assert!(a.stop().success(), "{}", a.log_text());
    b.wait_metric("genfeed_assigned_partitions", |v| v == 4.0);
    assert_eq!(round(2), 40);
    assert!(b.stop().success(), "{}", b.log_text());

    // After a clean stop its own histories are trusted: the restart reads
    // none of the changelog back, and still knows everything seen.
    let mut b = Service::start(&bed.config("b", FEED));
    b.wait_metric("genfeed_assigned_partitions", |v| v == 4.0);
    assert_eq!(b.metric("genfeed_changelog_restored_total"), Some(0.0));
    assert_eq!(round(3), 40);
    assert!(b.stop().success(), "{}", b.log_text());
}

/// An instance numbers items in the order it read the catalogue: one that
/// read it as it grew and one that starts after compaction reordered it
/// number them differently. A history handed from one to the other through
/// the changelog must still name the same items.
#[test]
fn a_history_handed_to_an_instance_that_numbers_items_otherwise_keeps_its_items() {
    let bed = Bed::new("numbering", 1, Framing::Plain);
    let (f, t, input) = (bed.fixture, &bed.topics, &bed.input);
    bed.upsert_items(..10);
    // Two new items: a feed offers one fresh item at most (feed.fresh_*).
    let new: Vec<(String, Vec<f32>)> = (0..2)
        .map(|k| {
            let mut v = f.items[20 + k].1.clone();
            v[0] += 1e-3;
            (format!("new-{k}"), v)
        })
        .collect();
    for (id, v) in &new {
        input.upsert(id, v.clone());
    }
    // The catalogue instance b reads holds the same items, the new ones in
    // the reverse order.
    let mut reordered = t.clone();
    reordered.catalogue = format!("{}-reordered", t.catalogue);
    harness::create_topic(&reordered.catalogue, 1);
    let other = harness::Input::new(&reordered, Framing::Plain);
    for (id, v) in f.items[..10].iter().chain(new.iter().rev()) {
        other.upsert(id, v.clone());
    }
    let mut live: BTreeSet<String> = f.items[..10].iter().map(|(id, _)| id.clone()).collect();
    live.extend(new.iter().map(|(id, _)| id.clone()));

    let mut a = Service::start(&bed.config("a", FEED));
    a.wait_metric("genfeed_assigned_partitions", |v| v == 1.0);
    let seen = [new[0].0.clone(), f.items[1].0.clone(), f.items[0].0.clone()];
    input.interaction("u", &seen[0]);
    let last = HashMap::from([("u".to_string(), input.interaction("u", &seen[1]))]);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    assert_eq!(items_of(&got["u"]), expected(&live, &seen[..2]));
    assert!(a.stop().success(), "{}", a.log_text());

    let cfg = bed.config("b", FEED);
    rewrite(
        &cfg,
        &[(
            "catalogue_topic",
            format!("catalogue_topic = \"{}\"", reordered.catalogue),
        )],
    );
    let mut b = Service::start(&cfg);
    b.wait_metric("genfeed_assigned_partitions", |v| v == 1.0);
    let last = HashMap::from([("u".to_string(), input.interaction("u", &seen[2]))]);
    let got = feeds_answering(&out, Framing::Plain, &mut feeds, &last);
    assert_eq!(
        items_of(&got["u"]),
        expected(&live, &seen),
        "{}",
        b.log_text()
    );
    assert!(b.stop().success(), "{}", b.log_text());
}

/// Rewrites the config's lines that start with a key of `lines` to the
/// line given for it.
fn rewrite(cfg: &std::path::Path, lines: &[(&str, String)]) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let changed: Vec<&str> = text
        .lines()
        .map(|l| match lines.iter().find(|(key, _)| l.starts_with(key)) {
            Some((_, line)) => line.as_str(),
            None => l,
        })
        .collect();
    std::fs::write(cfg, changed.join("\n")).unwrap();
}

/// [`rewrite`]s the config, runs `genfeed run` on it, and returns its exit
/// code and stderr (for configs the service must refuse).
fn refused(cfg: &std::path::Path, lines: &[(&str, String)]) -> (Option<i32>, String) {
    rewrite(cfg, lines);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_genfeed"))
        .args(["run", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unreachable_brokers_and_missing_or_misfit_topics_are_refused_at_start() {
    let bed = Bed::new("misfit", 3, Framing::Plain);
    let t = &bed.topics;
    let cases = [
        (
            "histories_topic",
            format!("histories_topic = \"{}\"", t.dead_letters),
            "kafka.histories_topic",
            "partitions",
        ),
        (
            "recommendations_topic",
            format!("recommendations_topic = \"{}-nowhere\"", t.recommendations),
            "kafka.recommendations_topic",
            "does not exist",
        ),
        (
            "brokers",
            "brokers = \"127.0.0.1:1\"".to_string(),
            "kafka.brokers",
            "no metadata from 127.0.0.1:1",
        ),
    ];
    for (field, line, key, why) in cases {
        let cfg = bed.config("a", FEED);
        let (code, err) = refused(&cfg, &[(field, line)]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(key) && err.contains(why), "{err}");
        // Brokers and topics were waited for, a misfit is not.
        assert_eq!(
            err.contains("waited 1000 ms for the brokers and topics"),
            why != "partitions",
            "{err}"
        );
    }
}

/// A service started before its broker waits for it, and the errors its
/// consumers were handed while the broker was away do not end it: it loads
/// and becomes ready on the broker that came.
#[test]
fn a_start_before_its_broker_waits_for_it_then_becomes_ready() {
    let bed = Bed::new("early", 2, Framing::Plain);
    let port = harness::free_port();
    let cfg = bed.config("a", FEED);
    rewrite(
        &cfg,
        &[
            ("brokers", format!("brokers = \"127.0.0.1:{port}\"")),
            (
                "startup_wait_ms",
                format!("startup_wait_ms = {}", harness::PATIENCE.as_millis()),
            ),
        ],
    );
    let mut svc = Service::spawn(&cfg);
    svc.wait_for(
        |s| {
            s.log_all()
                .contains("waiting for the brokers and topics")
                .then_some(())
        },
        "the wait for the broker",
    );
    let own = harness::OwnBroker::start(port);
    own.create_topics(&bed.topics, 2);
    svc.wait_for(
        |s| s.get("/readyz").filter(|(code, _)| *code == 200),
        "readiness",
    );
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// A broker that loses its logs under the running service (tansu keeps
/// them in memory: a restart is one) and gets its topics made again, the
/// catalogue written anew with two items retired and one new: the service
/// reads the new logs from their start, takes none of their offsets for
/// replays of the old ones, and every user's next feed holds the live items
/// the user has not seen, the new one in, the retired ones out.
#[test]
fn a_broker_that_loses_its_logs_under_the_service_is_read_anew() {
    let bed = Bed::new("lost", 1, Framing::Plain);
    let f = bed.fixture;
    let port = harness::free_port();
    let own = harness::OwnBroker::start(port);
    own.create_topics(&bed.topics, 1);
    let cfg = bed.config("a", FEED);
    rewrite(&cfg, &[("brokers", format!("brokers = \"{}\"", own.addr))]);
    let input = harness::Input::of(&own.addr, &bed.topics, Framing::Plain);
    let mut live: BTreeSet<String> = BTreeSet::new();
    for (id, v) in &f.items[..10] {
        input.upsert(id, v.clone());
        live.insert(id.clone());
    }
    let mut svc = Service::start(&cfg);
    svc.wait_metric("genfeed_live_items", |v| v == 10.0);
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let round = |input: &harness::Input,
                 out: &Output,
                 live: &BTreeSet<String>,
                 seen: &mut HashMap<String, Vec<String>>,
                 k: usize| {
        let mut last = HashMap::new();
        for u in 0..8 {
            let user = format!("user-{u}");
            let item = &f.items[(u + k) % 8].0;
            last.insert(user.clone(), input.interaction(&user, item));
            seen.entry(user).or_default().push(item.clone());
        }
        for (user, feed) in feeds_answering(out, Framing::Plain, &mut Vec::new(), &last) {
            assert_eq!(items_of(&feed), expected(live, &seen[&user]), "{user}");
        }
    };
    let out = Output::of(&own.addr, &bed.topics.recommendations, 2);
    round(&input, &out, &live, &mut seen, 0);
    svc.wait_metric("genfeed_learnt_steps_total", |v| v == 8.0);

    drop((out, input, own));
    let own = harness::OwnBroker::start(port);
    own.create_topics(&bed.topics, 1);
    // The readers that hold offsets of the old logs check them once the
    // broker is back (a log that grew past them before that check is not
    // told from the old one: see `kafka::Landed`).
    for reader in ["catalogue partition's", "learning from it whole"] {
        svc.wait_for(
            |s| s.log_all().contains(reader).then_some(()),
            "the check of the logs",
        );
    }
    let input = harness::Input::of(&own.addr, &bed.topics, Framing::Plain);
    for (id, v) in &f.items[..10] {
        input.upsert(id, v.clone());
    }
    for (id, _) in &f.items[8..10] {
        input.retire(id);
        live.remove(id);
    }
    input.upsert(&f.items[10].0, f.items[10].1.clone());
    live.insert(f.items[10].0.clone());
    // Read from the old offsets on, the new log would give 10 live items.
    svc.wait_metric("genfeed_live_items", |v| v == 9.0);
    let out = Output::of(&own.addr, &bed.topics.recommendations, 2);
    // The new interactions sit at the old ones' offsets: were they taken
    // for replays, the items would not count as seen.
    round(&input, &out, &live, &mut seen, 1);
    // The second round's histories are learnt too, though they came at
    // offsets the old logs had had.
    svc.wait_metric("genfeed_learnt_steps_total", |v| v == 16.0);
    assert!(svc.stop().success(), "{}", svc.log_text());
}

/// A service started beside the job that creates its topics waits for
/// them, saying which, then serves.
#[test]
fn a_start_waits_for_a_topic_created_after_it_then_serves() {
    let bed = Bed::new("late", 1, Framing::Plain);
    let (f, input) = (bed.fixture, &bed.input);
    bed.upsert_items(..15);
    let late = format!("{}-late", bed.topics.recommendations);
    let cfg = bed.config("a", FEED);
    rewrite(
        &cfg,
        &[
            (
                "recommendations_topic",
                format!("recommendations_topic = \"{late}\""),
            ),
            (
                "startup_wait_ms",
                format!("startup_wait_ms = {}", harness::PATIENCE.as_millis()),
            ),
        ],
    );
    let mut svc = Service::spawn(&cfg);
    let waiting = svc.wait_for(
        |s| {
            s.log_all()
                .lines()
                .find(|l| l.contains("waiting for the brokers and topics"))
                .map(str::to_string)
        },
        "the wait for the topic",
    );
    assert!(waiting.contains(&late), "{waiting}");
    // Waiting, it is alive and not ready.
    assert_eq!(svc.get("/healthz").map(|(code, _)| code), Some(200));
    assert_eq!(svc.get("/readyz").map(|(code, _)| code), Some(503));
    harness::create_topic(&late, 1);
    svc.wait_for(
        |s| s.get("/readyz").filter(|(code, _)| *code == 200),
        "readiness",
    );
    let at = HashMap::from([("u".to_string(), input.interaction("u", &f.items[3].0))]);
    let got = feeds_answering(&Output::new(&late, 1), Framing::Plain, &mut Vec::new(), &at);
    assert!(!got["u"].items.is_empty());
    assert!(svc.stop().success(), "{}", svc.log_text());
}

#[test]
fn a_model_whose_successor_counts_are_missing_is_refused_at_start() {
    let bed = Bed::new("nocounts", 1, Framing::Plain);
    let model = bed.dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(bed.fixture.model.join(f), model.join(f)).unwrap();
    }
    let cfg = bed.config("a", FEED);
    let (code, err) = refused(
        &cfg,
        &[
            ("model = ", format!("model = \"{}\"", model.display())),
            // Should the model load anyway, the service stops at this topic
            // instead of serving forever.
            (
                "recommendations_topic",
                format!(
                    "recommendations_topic = \"{}-nowhere\"",
                    bed.topics.recommendations
                ),
            ),
        ],
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("transition_weight") && err.contains("transitions.safetensors"),
        "{err}"
    );
}
