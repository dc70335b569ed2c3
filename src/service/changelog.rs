//! The histories changelog's records: a user's history with its items named
//! by id.
//!
//! A history is kept as registry ords ([`super::histories`]), but ords are
//! each instance's own numbering: they follow the order in which it read
//! the catalogue, and that order differs between instances reading several
//! catalogue partitions, and between an instance that read an item's upserts
//! and one that started after compaction dropped them. The changelog is read
//! by other instances (a partition's new owner restores its users from it,
//! and every instance learns successor counts from it, [`super::learnt`]),
//! so its records name items by id and each reader maps them to its own
//! ords.
//!
//! A record is `[0xFF][partition: i32][offset: i64]([length: u32][id])*`,
//! all big-endian, items oldest first: the position of the interaction last
//! applied and the history after it. Records written before ids
//! (`[partition][offset][ord: u32]*`, which cannot start with 0xFF: a
//! partition is never negative) are read as ords, as they were written.
//!
//! A history of a user whose interactions come on several partitions also
//! names the last position applied on each of the others, in the record
//! header [`OTHERS`]; a header, so that a reader from before it still reads
//! the record as it did.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::histories::Position;
use super::view::{SharedView, View};

/// How long a record written since this instance started waits for the
/// catalogue to bring an item it names ([`Reader::view_for`]).
const ITEM_WAIT: Duration = Duration::from_secs(10);

/// Reads records by this instance's catalogue.
#[derive(Clone)]
pub struct Reader {
    /// The catalogue as this instance published it.
    pub view: SharedView,
    /// When this instance started (ms since the epoch). A record written
    /// since names items whose upserts were written before it, so the
    /// catalogue brings any this instance has not read yet (its reader
    /// behind the writer's in a burst of new items): such a record waits
    /// for them instead of losing them here while other instances keep
    /// them. Older records do not wait: the catalogue as of the start is
    /// all there is.
    pub since_ms: i64,
}

impl Reader {
    /// The view to read a record written at `written_ms` by: the latest,
    /// or, for a record written since the start that `knows` says the view
    /// cannot read whole yet, the first that can, waiting up to
    /// `ITEM_WAIT` (10 s) or until `stop`.
    pub fn view_for(
        &self,
        written_ms: Option<i64>,
        knows: impl Fn(&View) -> bool,
        stop: &AtomicBool,
    ) -> arc_swap::Guard<Arc<View>> {
        let mut view = self.view.load();
        // Polled: both callers are plain threads (a rebalance callback, the
        // learnt reader), and the waits are rare and short.
        if written_ms.is_some_and(|t| t >= self.since_ms) && !knows(&view) {
            let waiting = Instant::now();
            while !knows(&view) && waiting.elapsed() < ITEM_WAIT && !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                view = self.view.load();
            }
        }
        view
    }
}

/// The record header of a history's positions besides the last:
/// `([partition: i32][offset: i64])*`, newest first.
pub const OTHERS: &str = "genfeed-others";

/// The positions an [`OTHERS`] header holds.
pub fn others(header: &[u8]) -> Result<Vec<Position>, NotAHistory> {
    Position::decode_all(header).ok_or(NotAHistory {
        len: header.len(),
        why: "its positions header is not whole positions",
    })
}

/// The first byte of a record that names items by id.
const IDS: u8 = 0xFF;

const HEADER: usize = 1 + 4 + 8;

/// Why a changelog record could not be read.
#[derive(Debug, thiserror::Error)]
#[error("a histories changelog record of {len} bytes is not a history: {why}")]
pub struct NotAHistory {
    len: usize,
    why: &'static str,
}

/// A changelog record, parsed.
pub struct Record<'a> {
    /// Where the interaction last applied to the history was read.
    pub at: Position,
    items: Items<'a>,
}

#[derive(Clone, Copy)]
enum Items<'a> {
    /// `([length: u32][id])*`, checked whole by [`Record::parse`].
    Ids(&'a [u8]),
    /// `[ord: u32]*` of a record written before ids.
    Ords(&'a [u8]),
}

/// The record of a history at `at` holding `ords`, oldest first, each named
/// by its id in `view`. An ord the view does not know (one restored from a
/// record written before ids under another numbering) is left out.
pub fn record(at: Position, ords: impl Iterator<Item = u32>, view: &View) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 16 * ords.size_hint().0);
    out.push(IDS);
    out.extend_from_slice(&at.partition.to_be_bytes());
    out.extend_from_slice(&at.offset.to_be_bytes());
    for id in ords.filter_map(|o| Some(&view.item(o)?.id)) {
        let len = u32::try_from(id.len()).expect("ids are bounded by limits.id_bytes");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out
}

impl<'a> Record<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Record<'a>, NotAHistory> {
        let bad = |why| NotAHistory {
            len: bytes.len(),
            why,
        };
        let (items, head) = match bytes.first() {
            Some(&IDS) => {
                let rest = bytes.get(HEADER..).ok_or(bad("too short"))?;
                let mut left = rest;
                while !left.is_empty() {
                    let (len, after) = split_len(left).ok_or(bad("an id's length is cut"))?;
                    left = after.get(len..).ok_or(bad("an id is cut"))?;
                    std::str::from_utf8(&after[..len]).map_err(|_| bad("an id is not UTF-8"))?;
                }
                (Items::Ids(rest), &bytes[1..HEADER])
            }
            _ => {
                if bytes.len() < HEADER - 1 || (bytes.len() - (HEADER - 1)) % 4 != 0 {
                    return Err(bad("neither ids nor ords"));
                }
                (Items::Ords(&bytes[HEADER - 1..]), &bytes[..HEADER - 1])
            }
        };
        let at = Position {
            partition: i32::from_be_bytes(head[..4].try_into().expect("4 bytes")),
            offset: i64::from_be_bytes(head[4..].try_into().expect("8 bytes")),
        };
        Ok(Record { at, items })
    }

    /// The items as ords of `view` into `out` (cleared first), oldest
    /// first; returns how many the view does not know, which are left out.
    pub fn ords(&self, view: &View, out: &mut Vec<u32>) -> usize {
        out.clear();
        let mut unknown = 0;
        for item in self.items() {
            match item.ord(view) {
                Some(o) => out.push(o),
                None => unknown += 1,
            }
        }
        unknown
    }

    /// The step the record took: the history's previous and newest items as
    /// ords of `view` (a record is written for each append, so the newest is
    /// the one appended). `None` when the history is empty or the view does
    /// not know its newest item; a previous item it does not know is `None`.
    pub fn last_step(&self, view: &View) -> Option<(Option<u32>, u32)> {
        let (previous, last) = self.last_two();
        let last = last?.ord(view)?;
        Some((previous.and_then(|p| p.ord(view)), last))
    }

    /// Whether `view` knows every item. A record written before ids is
    /// always known: its ords are another numbering, which no later view
    /// makes right, so nothing is waited for ([`Reader::view_for`]).
    pub fn knows_all(&self, view: &View) -> bool {
        let by_ord = matches!(self.items, Items::Ords(_));
        by_ord || self.items().all(|item| item.ord(view).is_some())
    }

    /// Whether `view` knows both items [`Record::last_step`] reads (a
    /// record written before ids always, as for [`Record::knows_all`]).
    pub fn knows_last_step(&self, view: &View) -> bool {
        let (previous, last) = self.last_two();
        let known = |item: Item<'_>| matches!(item, Item::Ord(_)) || item.ord(view).is_some();
        last.is_some_and(known) && previous.is_none_or(known)
    }

    /// The history's item before its newest, and its newest.
    fn last_two(&self) -> (Option<Item<'a>>, Option<Item<'a>>) {
        self.items()
            .fold((None, None), |(_, last), item| (last, Some(item)))
    }

    /// The items as written, oldest first.
    fn items(&self) -> impl Iterator<Item = Item<'a>> {
        let mut left = self.items;
        std::iter::from_fn(move || match &mut left {
            Items::Ids(bytes) => {
                let (len, after) = split_len(bytes)?;
                let (id, rest) = after.split_at(len);
                *bytes = rest;
                Some(Item::Id(std::str::from_utf8(id).expect("checked by parse")))
            }
            Items::Ords(bytes) => {
                let (ord, rest) = bytes.split_first_chunk::<4>()?;
                *bytes = rest;
                Some(Item::Ord(u32::from_be_bytes(*ord)))
            }
        })
    }
}

/// An item of a record, as written.
enum Item<'a> {
    Id(&'a str),
    Ord(u32),
}

impl Item<'_> {
    /// Its ord in `view`, if the view knows it.
    fn ord(&self, view: &View) -> Option<u32> {
        match *self {
            Item::Id(id) => view.ord(id),
            Item::Ord(ord) => view.item(ord).map(|_| ord),
        }
    }
}

/// An id's length and what follows it, if the length is whole.
fn split_len(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*len) as usize, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::view::numbered as view;

    fn at(partition: i32, offset: i64) -> Position {
        Position { partition, offset }
    }

    #[test]
    fn a_record_names_items_by_id_so_another_numbering_reads_the_same_items() {
        let writer = view(&["a", "b", "c", "d"]);
        // The same items numbered in another order, less one, plus another.
        let reader = view(&["x", "d", "b", "a"]);
        let bytes = record(at(3, 41), [0, 1, 3, 2].into_iter(), &writer);
        let r = Record::parse(&bytes).unwrap();
        assert_eq!(r.at, at(3, 41));
        let mut ords = Vec::new();
        assert!(r.knows_all(&writer) && !r.knows_all(&reader));
        assert_eq!(r.ords(&reader, &mut ords), 1, "c is unknown to the reader");
        assert_eq!(ords, [3, 2, 1], "a, b, d");
        assert_eq!(r.last_step(&reader), None, "the newest, c, is unknown");
        let bytes = record(at(3, 42), [0, 1, 2, 3].into_iter(), &writer);
        let r = Record::parse(&bytes).unwrap();
        assert_eq!(r.last_step(&reader), Some((None, 1)), "c → d");
        assert_eq!(r.last_step(&writer), Some((Some(2), 3)));
        // An ord the writer's view does not know is left out.
        let bytes = record(at(0, 1), [9, 1].into_iter(), &writer);
        assert_eq!(Record::parse(&bytes).unwrap().ords(&writer, &mut ords), 0);
        assert_eq!(ords, [1]);
    }

    #[test]
    fn records_written_before_ids_are_read_as_ords() {
        let v = view(&["a", "b", "c"]);
        let mut old = 2i32.to_be_bytes().to_vec();
        old.extend_from_slice(&7i64.to_be_bytes());
        for ord in [2u32, 0, 8] {
            old.extend_from_slice(&ord.to_be_bytes());
        }
        let r = Record::parse(&old).unwrap();
        assert_eq!(r.at, at(2, 7));
        let mut ords = Vec::new();
        assert_eq!(r.ords(&v, &mut ords), 1, "8 is no item here");
        assert_eq!(ords, [2, 0]);
        assert_eq!(r.last_step(&v), None);
        assert!(
            r.knows_all(&v) && r.knows_last_step(&v),
            "nothing to wait for"
        );
    }

    #[test]
    fn what_is_not_a_history_is_refused() {
        let good = record(at(0, 5), [0, 1].into_iter(), &view(&["a", "b"]));
        let mut not_utf8 = good.clone();
        *not_utf8.last_mut().unwrap() = 0xC3;
        let mut long = good[..HEADER].to_vec();
        long.extend_from_slice(&100u32.to_be_bytes());
        long.extend_from_slice(b"abc");
        for bad in [
            &b""[..],
            b"short",
            &good[..HEADER - 1],
            &good[..good.len() - 1],
            &good[..HEADER + 2],
            &long,
            &not_utf8,
        ] {
            let e = Record::parse(bad).err().expect("refused");
            assert!(e.to_string().contains("not a history"), "{e}");
        }
    }

    #[test]
    fn an_others_header_holds_whole_positions() {
        let others_at = [at(3, 9), at(1, 70_000_000_000)];
        let header = Position::encode_all(&others_at);
        assert_eq!(others(&header).unwrap(), others_at);
        assert_eq!(others(&[]).unwrap(), []);
        let e = others(&header[..13]).unwrap_err();
        assert!(e.to_string().contains("not whole positions"), "{e}");
    }
}
