//! The SID registry: every rule of its module docs, reopening, a real crash,
//! and random event sequences against a plain in-memory model.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::path::Path;
use std::process::Command;

use genfeed::registry::{
    Applied, ItemEntry, LiveChange, Position, Registry, RegistryError, Status, TokenizerBinding,
    DEFAULT_FLUSH_EVERY_MS,
};
use genfeed::sid::{Code, Sid};
use genfeed::tokenizer::ContentCodes;
use proptest::prelude::*;

const CAPACITY: usize = 3;

fn sid(s: &str) -> Sid {
    s.parse().unwrap()
}

fn binding(training: &[(&str, &str)]) -> TokenizerBinding {
    TokenizerBinding {
        version: "tok-1".into(),
        sid_levels: 3,
        last_level_capacity: CAPACITY,
        training: training
            .iter()
            .map(|(id, s)| (id.to_string(), sid(s)))
            .collect(),
    }
}

fn open(dir: &Path, training: &[(&str, &str)]) -> Registry {
    Registry::open(dir, &binding(training), Some(DEFAULT_FLUSH_EVERY_MS)).unwrap()
}

/// Offset `o` of catalogue partition 0.
fn at(o: u64) -> Position {
    Position::new(0, o)
}

fn hash(h: u8) -> [u8; 32] {
    [h; 32]
}

/// A tokenizer stand-in that gives `codes`, with no prefix to go to when
/// theirs is full.
fn codes(codes: &[Code]) -> impl FnOnce() -> Result<ContentCodes, Infallible> {
    let content = ContentCodes {
        codes: codes.to_vec(),
        last_ranked: codes.last().copied().into_iter().collect(),
    };
    move || Ok(content)
}

/// A tokenizer stand-in for events that must not run the tokenizer: if it
/// runs, the apply fails and so does the test.
fn no_tokenizer() -> Result<ContentCodes, String> {
    Err("the tokenizer ran".into())
}

fn upsert(r: &mut Registry, id: &str, h: u8, pos: u64, c: &[Code]) -> LiveChange {
    r.apply_upsert(id, hash(h), at(pos), 0, codes(c)).unwrap()
}

fn live(r: &Registry) -> Vec<(Sid, u32)> {
    r.live().collect::<Result<_, _>>().unwrap()
}

#[test]
fn new_items_take_the_smallest_free_code_of_their_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[]);
    let a = upsert(&mut r, "a", 1, 0, &[1, 2]);
    let b = upsert(&mut r, "b", 1, 1, &[1, 2]);
    let c = upsert(&mut r, "c", 1, 2, &[3, 4]);
    assert_eq!(
        a,
        LiveChange::Added {
            ord: 0,
            sid: sid("1-2-0")
        }
    );
    assert_eq!(
        b,
        LiveChange::Added {
            ord: 1,
            sid: sid("1-2-1")
        }
    );
    assert_eq!(
        c,
        LiveChange::Added {
            ord: 2,
            sid: sid("3-4-0")
        }
    );
    assert_eq!(
        live(&r),
        vec![(sid("1-2-0"), 0), (sid("1-2-1"), 1), (sid("3-4-0"), 2)]
    );
    assert_eq!(r.live_count(), 3);
    assert_eq!(r.item_id(1).unwrap().as_deref(), Some("b"));
    assert_eq!(r.item_id(3).unwrap(), None);
    let e = r.get("c").unwrap().unwrap();
    assert_eq!(
        (e.status, e.applied.last(), e.content_hash),
        (Status::Live, Some(at(2)), hash(1))
    );
    r.check().unwrap();
}

#[test]
fn training_items_keep_their_training_sids() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[("t0", "1-2-0"), ("t1", "1-2-2")]);
    let e = r.get("t1").unwrap().unwrap();
    assert_eq!(
        (e.ord, e.sid, e.status),
        (1, Some(sid("1-2-2")), Status::Reserved)
    );
    assert!(e.applied.is_empty());
    assert!(live(&r).is_empty(), "reserved SIDs are not live");
    // A new item with the same prefix gets the code the training items left free.
    assert_eq!(
        upsert(&mut r, "new", 1, 0, &[1, 2]),
        LiveChange::Added {
            ord: 2,
            sid: sid("1-2-1")
        }
    );
    // A training item gets its training SID without running the tokenizer,
    // whatever its content hash.
    let t1 = r
        .apply_upsert("t1", hash(7), at(0), 0, no_tokenizer)
        .unwrap();
    assert_eq!(
        t1,
        LiveChange::Added {
            ord: 1,
            sid: sid("1-2-2")
        }
    );
    assert_eq!(live(&r), vec![(sid("1-2-1"), 2), (sid("1-2-2"), 1)]);
    // 1-2-0 is still reserved for t0, and the prefix is full.
    let err = r
        .apply_upsert("other", hash(1), at(1), 0, codes(&[1, 2]))
        .unwrap_err();
    assert!(matches!(err, RegistryError::PrefixFull { ref item, .. } if item == "other"));
    r.check().unwrap();
}

#[test]
fn replays_change_nothing_and_skip_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[]);
    upsert(&mut r, "a", 1, 5, &[1, 2]);
    let before = r.get("a").unwrap();
    // The same event again, and an older one with other content.
    for (h, pos) in [(1, 5), (2, 4)] {
        let change = r
            .apply_upsert("a", hash(h), at(pos), 0, no_tokenizer)
            .unwrap();
        assert_eq!(change, LiveChange::Unchanged);
    }
    assert_eq!(
        r.apply_retire("a", at(5), 0).unwrap(),
        LiveChange::Unchanged
    );
    assert_eq!(r.get("a").unwrap(), before);
    assert_eq!(r.live_count(), 1);
    // A newer event with the same content only moves the position.
    let change = r
        .apply_upsert("a", hash(1), at(9), 0, no_tokenizer)
        .unwrap();
    assert_eq!(change, LiveChange::Unchanged);
    assert_eq!(r.get("a").unwrap().unwrap().applied.last(), Some(at(9)));
    r.check().unwrap();
}

#[test]
fn a_later_event_on_another_partition_is_applied_whatever_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[]);
    upsert(&mut r, "a", 1, 50, &[1, 2]);
    // A producer that does not key by item id sent the retire to partition
    // 1, whose offsets are far behind partition 0's.
    assert_eq!(
        r.apply_retire("a", Position::new(1, 3), 0).unwrap(),
        LiveChange::Retired {
            ord: 0,
            sid: sid("1-2-0")
        }
    );
    assert!(live(&r).is_empty());
    // Both events are replays now, whichever partition is read again first.
    assert_eq!(
        r.apply_upsert("a", hash(1), at(50), 0, no_tokenizer)
            .unwrap(),
        LiveChange::Unchanged
    );
    assert_eq!(
        r.apply_retire("a", Position::new(1, 3), 0).unwrap(),
        LiveChange::Unchanged
    );
    assert!(live(&r).is_empty());
    // The entry remembers both partitions across a reopen.
    drop(r);
    let r = open(dir.path(), &[]);
    let applied = r.get("a").unwrap().unwrap().applied;
    assert!(applied.replays(at(50)) && applied.replays(Position::new(1, 3)));
    assert!(!applied.replays(Position::new(1, 4)));
    assert_eq!(applied.partitions().collect::<Vec<_>>(), [0, 1]);
    r.check().unwrap();
}

#[test]
fn a_content_change_moves_the_item_and_keeps_its_old_sid_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[]);
    upsert(&mut r, "a", 1, 0, &[1, 2]);
    let moved = r
        .apply_upsert("a", hash(2), at(1), 4, codes(&[5, 6]))
        .unwrap();
    assert_eq!(
        moved,
        LiveChange::Moved {
            ord: 0,
            old: sid("1-2-0"),
            new: sid("5-6-0")
        }
    );
    assert_eq!(live(&r), vec![(sid("5-6-0"), 0)]);
    // The old SID is not handed to another item before release.
    assert_eq!(
        upsert(&mut r, "b", 1, 2, &[1, 2]),
        LiveChange::Added {
            ord: 1,
            sid: sid("1-2-1")
        }
    );
    assert_eq!(r.release(3).unwrap(), 0);
    assert_eq!(r.release(4).unwrap(), 1);
    assert_eq!(
        upsert(&mut r, "c", 1, 3, &[1, 2]),
        LiveChange::Added {
            ord: 2,
            sid: sid("1-2-0")
        }
    );
    // New content with the same prefix keeps the SID.
    let same_prefix = r
        .apply_upsert("a", hash(3), at(4), 0, codes(&[5, 6]))
        .unwrap();
    assert_eq!(same_prefix, LiveChange::Unchanged);
    let e = r.get("a").unwrap().unwrap();
    assert_eq!((e.sid, e.content_hash), (Some(sid("5-6-0")), hash(3)));
    r.check().unwrap();
}

#[test]
fn retiring_takes_the_sid_out_of_the_live_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[("t0", "7-7-0")]);
    upsert(&mut r, "a", 1, 0, &[1, 2]);
    assert_eq!(
        r.apply_retire("a", at(1), 3).unwrap(),
        LiveChange::Retired {
            ord: 1,
            sid: sid("1-2-0")
        }
    );
    assert_eq!(
        r.apply_retire("a", at(1), 3).unwrap(),
        LiveChange::Unchanged
    );
    assert_eq!(
        r.apply_retire("a", at(2), 3).unwrap(),
        LiveChange::Unchanged
    );
    let e = r.get("a").unwrap().unwrap();
    assert_eq!(
        (e.status, e.sid, e.retired_generation, e.applied.last()),
        (Status::Retired, Some(sid("1-2-0")), Some(3), Some(at(2)))
    );
    assert!(live(&r).is_empty());
    assert_eq!(r.live_count(), 0);
    // Retiring a training item that never went live changes no live SID.
    assert_eq!(
        r.apply_retire("t0", at(3), 3).unwrap(),
        LiveChange::Unchanged
    );
    assert_eq!(r.get("t0").unwrap().unwrap().status, Status::Retired);
    // Retiring an item never seen (its upserts compacted away) records it
    // as retired, with no SID; a replay of that retire changes nothing, and
    // an upsert brings it live like any retired item.
    let LiveChange::RetiredUnseen { ord } = r.apply_retire("ghost", at(4), 3).unwrap() else {
        panic!("a retire of an unseen item records it");
    };
    let e = r.get("ghost").unwrap().unwrap();
    assert_eq!(
        (e.ord, e.status, e.sid, e.applied.last()),
        (ord, Status::Retired, None, Some(at(4)))
    );
    assert_eq!(r.item_id(ord).unwrap().as_deref(), Some("ghost"));
    assert_eq!(r.live_count(), 0);
    assert_eq!(
        r.apply_retire("ghost", at(4), 3).unwrap(),
        LiveChange::Unchanged
    );
    r.check().unwrap();
    drop(r);
    let mut r = open(dir.path(), &[("t0", "7-7-0")]);
    assert_eq!(r.get("ghost").unwrap().unwrap().ord, ord);
    assert!(matches!(
        upsert(&mut r, "ghost", 3, 5, &[3, 4]),
        LiveChange::Added { ord: o, .. } if o == ord
    ));
    assert!(matches!(
        upsert(&mut r, "b", 4, 6, &[4, 5]),
        LiveChange::Added { ord: o, .. } if o == ord + 1
    ));
    assert_eq!(r.live_count(), 2);
    r.check().unwrap();
}

#[test]
fn a_retired_item_comes_back_under_its_old_sid_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[]);
    upsert(&mut r, "a", 1, 0, &[1, 2]);
    upsert(&mut r, "b", 1, 1, &[3, 4]);
    r.apply_retire("a", at(2), 1).unwrap();
    r.apply_retire("b", at(3), 1).unwrap();
    // Same content: old SID, no tokenizer.
    let a = r
        .apply_upsert("a", hash(1), at(4), 1, no_tokenizer)
        .unwrap();
    assert_eq!(
        a,
        LiveChange::Added {
            ord: 0,
            sid: sid("1-2-0")
        }
    );
    // Other content and prefix: a new SID; the old one stays bound until release.
    let b = r
        .apply_upsert("b", hash(2), at(5), 1, codes(&[5, 6]))
        .unwrap();
    assert_eq!(
        b,
        LiveChange::Added {
            ord: 1,
            sid: sid("5-6-0")
        }
    );
    assert_eq!(
        upsert(&mut r, "c", 1, 6, &[3, 4]),
        LiveChange::Added {
            ord: 2,
            sid: sid("3-4-1")
        }
    );
    r.check().unwrap();
    // Released: the retired item's SID is gone and goes to the next comer.
    r.apply_retire("a", at(7), 2).unwrap();
    assert_eq!(r.release(2).unwrap(), 2);
    let e = r.get("a").unwrap().unwrap();
    assert_eq!((e.status, e.sid), (Status::Retired, None));
    assert_eq!(
        upsert(&mut r, "d", 1, 8, &[1, 2]),
        LiveChange::Added {
            ord: 3,
            sid: sid("1-2-0")
        }
    );
    assert_eq!(
        r.apply_upsert("a", hash(1), at(9), 2, codes(&[1, 2]))
            .unwrap(),
        LiveChange::Added {
            ord: 0,
            sid: sid("1-2-1")
        }
    );
    r.check().unwrap();
}

#[test]
fn failed_events_leave_the_registry_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), &[]);
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        upsert(&mut r, id, 1, i as u64, &[1, 2]);
    }
    upsert(&mut r, "x", 1, 3, &[7, 7]);
    let err = r
        .apply_upsert("d", hash(1), at(4), 0, codes(&[1, 2]))
        .unwrap_err();
    let RegistryError::PrefixFull { item, source } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        (item.as_str(), source.prefix, source.capacity),
        ("d", sid("1-2"), CAPACITY)
    );
    assert!(
        err.to_string().contains("\"d\"") && err.to_string().contains("1-2"),
        "{err}"
    );
    let err = r
        .apply_upsert("d", hash(1), at(4), 0, no_tokenizer)
        .unwrap_err();
    assert!(err.to_string().contains("the tokenizer ran"), "{err}");
    let err = r
        .apply_upsert("d", hash(1), at(4), 0, codes(&[1]))
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Codes { ref item, .. } if item == "d"),
        "{err}"
    );
    // A move into a full prefix fails whole: the item stays where it was.
    let err = r
        .apply_upsert("x", hash(2), at(5), 0, codes(&[1, 2]))
        .unwrap_err();
    assert!(matches!(err, RegistryError::PrefixFull { .. }), "{err}");
    assert_eq!(r.get("d").unwrap(), None);
    assert_eq!(r.item_id(4).unwrap(), None);
    let x = r.get("x").unwrap().unwrap();
    assert_eq!(
        (x.sid, x.content_hash, x.applied.last()),
        (Some(sid("7-7-0")), hash(1), Some(at(3)))
    );
    assert_eq!(r.live_count(), 4);
    // The failed allocations gave nothing away.
    assert_eq!(
        upsert(&mut r, "e", 1, 6, &[9, 9]),
        LiveChange::Added {
            ord: 4,
            sid: sid("9-9-0")
        }
    );
    r.check().unwrap();
}

#[test]
fn a_registry_belongs_to_one_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), &[]));
    let mut other = binding(&[]);
    other.version = "tok-2".into();
    let err = Registry::open(dir.path(), &other, None).err().unwrap();
    assert!(matches!(err, RegistryError::WrongTokenizer { .. }), "{err}");
    assert!(
        err.to_string().contains("tok-2") && err.to_string().contains("tok-1"),
        "{err}"
    );
    let mut other = binding(&[]);
    other.last_level_capacity = 256;
    let err = Registry::open(dir.path(), &other, None).err().unwrap();
    assert!(matches!(err, RegistryError::WrongTokenizer { .. }), "{err}");
}

#[test]
fn bad_bindings_are_refused() {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("a", "1-2-0"), ("b", "1-2-0")], "share SID"),
        (&[("a", "1-2-0"), ("a", "1-2-1")], "twice"),
        (&[("a", "1-2-5")], "outside"),
    ];
    for (training, why) in cases {
        let dir = tempfile::tempdir().unwrap();
        let err = Registry::open(dir.path(), &binding(training), None)
            .err()
            .unwrap();
        assert!(matches!(err, RegistryError::Binding(_)), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[test]
fn reopening_restores_everything() {
    let dir = tempfile::tempdir().unwrap();
    let training = [("t0", "1-2-0"), ("t1", "3-4-0")];
    let mut r = open(dir.path(), &training);
    upsert(&mut r, "t0", 1, 0, &[1, 2]);
    upsert(&mut r, "a", 1, 1, &[1, 2]);
    r.apply_upsert("a", hash(2), at(2), 1, codes(&[5, 6]))
        .unwrap();
    r.apply_retire("t0", at(3), 1).unwrap();
    r.set_index_generation(7).unwrap();
    r.meta_set("base", b"fst-7").unwrap();
    let ids = ["t0", "t1", "a"];
    let entries: Vec<_> = ids.iter().map(|id| r.get(id).unwrap()).collect();
    let (live_before, count) = (live(&r), r.live_count());
    drop(r);

    let mut r = open(dir.path(), &training);
    let reopened: Vec<_> = ids.iter().map(|id| r.get(id).unwrap()).collect();
    assert_eq!(reopened, entries);
    assert_eq!((live(&r), r.live_count()), (live_before, count));
    assert_eq!(r.index_generation().unwrap(), Some(7));
    assert_eq!(r.meta_get("base").unwrap().as_deref(), Some(&b"fst-7"[..]));
    assert_eq!(r.meta_get("other").unwrap(), None);
    r.check().unwrap();
    // The allocator came back too: 1-2-0 (retired t0) and 1-2-1 (a's old
    // SID) are still bound, 3-4-0 is still reserved.
    assert_eq!(
        upsert(&mut r, "b", 1, 4, &[1, 2]),
        LiveChange::Added {
            ord: 3,
            sid: sid("1-2-2")
        }
    );
    assert_eq!(
        upsert(&mut r, "c", 1, 5, &[3, 4]),
        LiveChange::Added {
            ord: 4,
            sid: sid("3-4-1")
        }
    );
    assert_eq!(r.release(1).unwrap(), 2);
    drop(r);
    let mut r = open(dir.path(), &training);
    assert_eq!(
        upsert(&mut r, "d", 1, 6, &[1, 2]),
        LiveChange::Added {
            ord: 5,
            sid: sid("1-2-0")
        }
    );
    r.check().unwrap();
}

/// Everything observable, for comparing two registries' states.
fn dump(r: &Registry, ids: &[String]) -> (Vec<Option<ItemEntry>>, Vec<(Sid, u32)>, usize) {
    let entries = ids.iter().map(|id| r.get(id).unwrap()).collect();
    (entries, live(r), r.live_count())
}

#[test]
fn applying_a_sequence_twice_leaves_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Registry::open(dir.path(), &wide_binding(), None).unwrap();
    let events = crash_events(60);
    let ids: Vec<String> = (0..12).map(item_id).chain(["t0".into()]).collect();
    for e in &events {
        e.apply(&mut r).unwrap();
    }
    let once = dump(&r, &ids);
    for e in &events {
        assert_eq!(e.apply(&mut r).unwrap(), LiveChange::Unchanged, "{e:?}");
    }
    assert_eq!(dump(&r, &ids), once);
    r.check().unwrap();
}

fn item_id(i: usize) -> String {
    format!("item-{i}")
}

/// One catalogue event for the sequence tests.
#[derive(Clone, Debug)]
enum Event {
    Upsert {
        item: String,
        hash: u8,
        position: Position,
    },
    Retire {
        item: String,
        position: Position,
    },
}

/// The content codes of content `hash`: pairs of hashes share a prefix, so
/// content changes sometimes keep the SID and sometimes move it. Odd hashes
/// go to the prefix next to theirs when it is full; even ones have none.
fn content_of(hash: u8) -> ContentCodes {
    ContentCodes {
        codes: vec![Code::from(hash / 2), 1],
        last_ranked: if hash % 2 == 1 { vec![1, 2] } else { vec![1] },
    }
}

impl Event {
    fn apply(&self, r: &mut Registry) -> Result<LiveChange, RegistryError> {
        match self {
            Event::Upsert {
                item,
                hash: h,
                position,
            } => {
                let c = content_of(*h);
                r.apply_upsert(item, hash(*h), *position, position.offset, || {
                    Ok::<_, Infallible>(c)
                })
            }
            Event::Retire { item, position } => r.apply_retire(item, *position, position.offset),
        }
    }
}

/// A fixed sequence: upserts of new items, content changes, retires and
/// comebacks.
fn crash_events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let position = at(i as u64);
            if i % 7 == 3 {
                // The item upserted three events ago.
                let item = item_id((i - 3) % 12);
                Event::Retire { item, position }
            } else {
                let hash = ((i * 5) % 6) as u8;
                let item = item_id(i % 12);
                Event::Upsert {
                    item,
                    hash,
                    position,
                }
            }
        })
        .collect()
}

const CRASH_DIR: &str = "GENFEED_REGISTRY_CRASH_DIR";
const CRASH_FLUSHED: usize = 400;
const CRASH_TOTAL: usize = 800;

/// A binding whose prefixes never fill up under [`crash_events`].
fn wide_binding() -> TokenizerBinding {
    let mut b = binding(&[("t0", "0-1-0")]);
    b.last_level_capacity = 1024;
    b
}

/// A child process applies events, flushes, prints how many, applies more
/// without flushing and aborts. Every flushed event must be there after
/// reopening; of the rest, a prefix may be.
#[test]
fn a_crash_keeps_every_flushed_event() {
    let events: Vec<Event> = {
        let mut events = crash_events(CRASH_TOTAL);
        // Also new items after the flush, not only changes of known ones.
        for (i, e) in events.iter_mut().enumerate().skip(CRASH_FLUSHED) {
            if let Event::Upsert { item, .. } = e {
                *item = item_id(100 + i);
            }
        }
        events
    };
    if let Some(dir) = std::env::var_os(CRASH_DIR) {
        let mut r = Registry::open(Path::new(&dir), &wide_binding(), None).unwrap();
        for e in &events[..CRASH_FLUSHED] {
            e.apply(&mut r).unwrap();
        }
        r.flush().unwrap();
        println!("flushed {CRASH_FLUSHED}");
        for e in &events[CRASH_FLUSHED..] {
            e.apply(&mut r).unwrap();
        }
        std::process::abort();
    }

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_crash_keeps_every_flushed_event",
            "--exact",
            "--nocapture",
        ])
        .env(CRASH_DIR, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child should have aborted");
    assert!(
        stdout.contains(&format!("flushed {CRASH_FLUSHED}")),
        "child did not flush: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut r = Registry::open(dir.path(), &wide_binding(), None).unwrap();
    r.check().unwrap();
    let ids: BTreeSet<String> = events
        .iter()
        .map(|e| match e {
            Event::Upsert { item, .. } | Event::Retire { item, .. } => item.clone(),
        })
        .collect();
    let ids: Vec<String> = ids.into_iter().collect();
    // The recovered state is the state after some prefix of the events, at
    // least the flushed ones: find it by applying them to a fresh registry.
    let recovered = dump(&r, &ids);
    let fresh_dir = tempfile::tempdir().unwrap();
    let mut fresh = Registry::open(fresh_dir.path(), &wide_binding(), None).unwrap();
    for e in &events[..CRASH_FLUSHED] {
        e.apply(&mut fresh).unwrap();
    }
    let mut survived = CRASH_FLUSHED;
    while dump(&fresh, &ids) != recovered {
        assert!(
            survived < events.len(),
            "the recovered registry is not the state after any prefix of {CRASH_FLUSHED} events or more"
        );
        events[survived].apply(&mut fresh).unwrap();
        survived += 1;
    }
    eprintln!("{survived} of {CRASH_TOTAL} events survived the crash ({CRASH_FLUSHED} flushed)");
    // What the service does after a crash: replay from the committed offset
    // (here, from the start). It must end where an uninterrupted run ends.
    for e in &events {
        e.apply(&mut r).unwrap();
    }
    for e in &events[survived..] {
        e.apply(&mut fresh).unwrap();
    }
    assert!(
        dump(&r, &ids) == dump(&fresh, &ids),
        "replaying after the crash ends elsewhere than an uninterrupted run"
    );
    r.check().unwrap();
}

// ---- random sequences against a model ----

/// The registry's rules over plain maps.
struct Model {
    items: BTreeMap<String, ItemEntry>,
    /// Every bound SID: its item's ord and the generation it left at, if it did.
    bound: BTreeMap<Sid, (u32, Option<u64>)>,
    next_ord: u32,
    /// (item, partition) → the last offset applied from that partition.
    read: BTreeMap<(String, u32), u64>,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Applied(LiveChange),
    PrefixFull,
}

impl Model {
    fn new(training: &[(&str, &str)]) -> Model {
        let mut m = Model {
            items: BTreeMap::new(),
            bound: BTreeMap::new(),
            next_ord: 0,
            read: BTreeMap::new(),
        };
        for (id, s) in training {
            let entry = ItemEntry {
                ord: m.next_ord,
                sid: Some(sid(s)),
                status: Status::Reserved,
                content_hash: [0; 32],
                applied: Applied::default(),
                retired_generation: None,
            };
            m.bound.insert(sid(s), (m.next_ord, None));
            m.items.insert(id.to_string(), entry);
            m.next_ord += 1;
        }
        m
    }

    fn free_sid(&self, prefix: &[Code]) -> Option<Sid> {
        (0..CAPACITY as Code)
            .map(|c| Sid::new(&[prefix, &[c]].concat()).unwrap())
            .find(|s| !self.bound.contains_key(s))
    }

    /// Where an item with content `h` goes: the first of its prefixes with
    /// room, or `Ok(None)` if it reaches `stay` (the prefix it holds) first.
    fn placed(&self, h: u8, stay: Option<&[Code]>) -> Result<Option<Sid>, ()> {
        let content = content_of(h);
        for &last in &content.last_ranked {
            let prefix = [content.codes[0], last];
            if stay == Some(&prefix[..]) {
                return Ok(None);
            }
            if let Some(s) = self.free_sid(&prefix) {
                return Ok(Some(s));
            }
        }
        Err(())
    }

    /// Whether the event at `position` was applied to item `id` already:
    /// the last offset the model applied from the event's partition is at
    /// or after it. (Kept apart from [`Applied`], which it checks.)
    fn replays(&self, id: &str, position: Position) -> bool {
        self.read
            .get(&(id.to_string(), position.partition))
            .is_some_and(|&o| position.offset <= o)
    }

    fn upsert(&mut self, id: &str, h: u8, position: Position, generation: u64) -> Outcome {
        let Some(mut e) = self.items.get(id).cloned() else {
            let Ok(Some(new)) = self.placed(h, None) else {
                return Outcome::PrefixFull;
            };
            let ord = self.next_ord;
            self.next_ord += 1;
            self.bound.insert(new, (ord, None));
            let entry = ItemEntry {
                ord,
                sid: Some(new),
                status: Status::Live,
                content_hash: hash(h),
                applied: Applied::at(position),
                retired_generation: None,
            };
            self.items.insert(id.to_string(), entry);
            self.read
                .insert((id.to_string(), position.partition), position.offset);
            return Outcome::Applied(LiveChange::Added { ord, sid: new });
        };
        if self.replays(id, position) {
            return Outcome::Applied(LiveChange::Unchanged);
        }
        let same = e.content_hash == hash(h);
        let ord = e.ord;
        let change = match (e.status, e.sid) {
            (Status::Reserved, Some(s)) => LiveChange::Added { ord, sid: s },
            (Status::Live, Some(_)) if same => LiveChange::Unchanged,
            (Status::Live, Some(old)) => match self.placed(h, Some(old.prefix())) {
                Ok(None) => LiveChange::Unchanged,
                Ok(Some(new)) => {
                    self.bound.insert(old, (ord, Some(generation)));
                    e.sid = Some(new);
                    LiveChange::Moved { ord, old, new }
                }
                Err(()) => return Outcome::PrefixFull,
            },
            (Status::Retired, Some(old)) if same => LiveChange::Added { ord, sid: old },
            (Status::Retired, old) => match self.placed(h, old.as_ref().map(Sid::prefix)) {
                Ok(None) => LiveChange::Added {
                    ord,
                    sid: old.unwrap(),
                },
                Ok(Some(new)) => {
                    e.sid = Some(new);
                    LiveChange::Added { ord, sid: new }
                }
                Err(()) => return Outcome::PrefixFull,
            },
            (_, None) => unreachable!("the model keeps a SID on every non-retired item"),
        };
        self.bound.insert(e.sid.unwrap(), (ord, None));
        e.status = Status::Live;
        e.content_hash = hash(h);
        e.applied.record(position);
        self.items.insert(id.to_string(), e);
        self.read
            .insert((id.to_string(), position.partition), position.offset);
        Outcome::Applied(change)
    }

    fn retire(&mut self, id: &str, position: Position, generation: u64) -> Outcome {
        if !self.items.contains_key(id) {
            let ord = self.next_ord;
            self.next_ord += 1;
            let entry = ItemEntry {
                ord,
                sid: None,
                status: Status::Retired,
                content_hash: [0; 32],
                applied: Applied::at(position),
                retired_generation: None,
            };
            self.items.insert(id.to_string(), entry);
            self.read
                .insert((id.to_string(), position.partition), position.offset);
            return Outcome::Applied(LiveChange::RetiredUnseen { ord });
        }
        if self.replays(id, position) {
            return Outcome::Applied(LiveChange::Unchanged);
        }
        self.read
            .insert((id.to_string(), position.partition), position.offset);
        let e = self.items.get_mut(id).unwrap();
        e.applied.record(position);
        let was = e.status;
        if was == Status::Retired {
            return Outcome::Applied(LiveChange::Unchanged);
        }
        let s = e.sid.unwrap();
        e.status = Status::Retired;
        e.retired_generation = Some(generation);
        self.bound.insert(s, (e.ord, Some(generation)));
        Outcome::Applied(if was == Status::Live {
            LiveChange::Retired { ord: e.ord, sid: s }
        } else {
            LiveChange::Unchanged
        })
    }

    fn release(&mut self, up_to: u64) -> usize {
        let due: Vec<Sid> = self
            .bound
            .iter()
            .filter(|(_, (_, left))| left.is_some_and(|g| g <= up_to))
            .map(|(s, _)| *s)
            .collect();
        for s in &due {
            self.bound.remove(s);
            for e in self.items.values_mut() {
                if e.sid == Some(*s) {
                    e.sid = None;
                }
            }
        }
        due.len()
    }

    fn live(&self) -> Vec<(Sid, u32)> {
        let mut live: Vec<_> = self
            .items
            .values()
            .filter(|e| e.status == Status::Live)
            .map(|e| (e.sid.unwrap(), e.ord))
            .collect();
        live.sort();
        live
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// An upsert read from catalogue partition `partition` (items' events
    /// spread over two partitions, as a producer that does not key by item
    /// id writes them).
    Upsert {
        item: usize,
        hash: u8,
        partition: u32,
    },
    Retire {
        item: usize,
        partition: u32,
    },
    /// Applies the n-th earlier event again, at its old position.
    Replay(usize),
    /// Releases SIDs that left `back` generations ago or earlier.
    Release {
        back: u64,
    },
    NextGeneration,
    Reopen,
}

const MODEL_ITEMS: [&str; 6] = ["t0", "t1", "i0", "i1", "i2", "i3"];
const MODEL_TRAINING: [(&str, &str); 2] = [("t0", "0-1-0"), ("t1", "1-1-1")];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..MODEL_ITEMS.len(), 0u8..6, 0u32..2)
            .prop_map(|(item, hash, partition)| Op::Upsert { item, hash, partition }),
        2 => (0..MODEL_ITEMS.len(), 0u32..2).prop_map(|(item, partition)| Op::Retire { item, partition }),
        2 => any::<usize>().prop_map(Op::Replay),
        1 => (0u64..3).prop_map(|back| Op::Release { back }),
        1 => Just(Op::NextGeneration),
        1 => Just(Op::Reopen),
    ]
}

fn outcome(result: Result<LiveChange, RegistryError>) -> Outcome {
    match result {
        Ok(change) => Outcome::Applied(change),
        Err(RegistryError::PrefixFull { .. }) => Outcome::PrefixFull,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_agree_with_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Some(open(dir.path(), &MODEL_TRAINING));
        let mut m = Model::new(&MODEL_TRAINING);
        let mut history: Vec<Event> = Vec::new();
        let mut generation: u64 = 0;
        // Each partition's next offset.
        let mut next = [0u64; 2];
        let mut read = |partition: u32| {
            let offset = &mut next[partition as usize];
            *offset += 1;
            Position::new(partition, *offset - 1)
        };
        for (step, op) in ops.iter().enumerate() {
            let reg = r.as_mut().unwrap();
            let event = match op {
                Op::Upsert { item, hash, partition } => Some(Event::Upsert {
                    item: MODEL_ITEMS[*item].into(), hash: *hash, position: read(*partition),
                }),
                Op::Retire { item, partition } => Some(Event::Retire {
                    item: MODEL_ITEMS[*item].into(), position: read(*partition),
                }),
                Op::Replay(n) if !history.is_empty() => Some(history[n % history.len()].clone()),
                Op::Replay(_) => None,
                Op::Release { back } => {
                    let up_to = generation.saturating_sub(*back);
                    prop_assert_eq!(reg.release(up_to).unwrap(), m.release(up_to), "step {}", step);
                    None
                }
                Op::NextGeneration => {
                    generation += 1;
                    None
                }
                Op::Reopen => {
                    drop(r.take()); // closes the database before it is opened again
                    r = Some(open(dir.path(), &MODEL_TRAINING));
                    None
                }
            };
            let reg = r.as_mut().unwrap();
            if let Some(event) = event {
                let bound_before = m.bound.clone();
                let (got, want) = match &event {
                    Event::Upsert { item, hash: h, position } => {
                        let c = content_of(*h);
                        let got = reg.apply_upsert(item, hash(*h), *position, generation, || {
                            Ok::<_, Infallible>(c)
                        });
                        (outcome(got), m.upsert(item, *h, *position, generation))
                    }
                    Event::Retire { item, position } => (
                        outcome(reg.apply_retire(item, *position, generation)),
                        m.retire(item, *position, generation),
                    ),
                };
                prop_assert_eq!(&got, &want, "step {}: {:?}", step, event);
                // A SID handed out was free, or already this item's.
                if let Outcome::Applied(LiveChange::Added { ord, sid: s } | LiveChange::Moved { ord, new: s, .. }) = got {
                    let owner = bound_before.get(&s).map(|(o, _)| *o);
                    prop_assert!(owner.is_none() || owner == Some(ord), "{} went to {} from {:?}", s, ord, owner);
                }
                if !matches!(op, Op::Replay(_)) {
                    history.push(event);
                }
            }
            for id in MODEL_ITEMS {
                prop_assert_eq!(reg.get(id).unwrap(), m.items.get(id).cloned(), "step {}: {}", step, id);
            }
            prop_assert_eq!(live(reg), m.live(), "step {}", step);
            prop_assert_eq!(reg.live_count(), m.live().len());
            reg.check().unwrap();
        }
    }
}
