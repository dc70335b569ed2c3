//! The registry's on-disk layouts, written and read by hand.
//!
//! Every value starts with a layout version byte, so a later layout can be
//! read next to this one. Decoding never trusts the bytes: a short, long or
//! out-of-range value is an error saying what is wrong, which the registry
//! turns into [`RegistryError::Corrupt`](super::RegistryError::Corrupt) naming
//! the table and key.
//!
//! The registry's tables share one store table: every key starts with its
//! [`Table`]'s byte, so that one event's writes, whatever tables they touch,
//! are one atomic commit.
//!
//! Integers are big-endian, so keys made of them sort numerically.

use super::applied::{Applied, Position};
use crate::sid::{Code, Sid, MAX_LEVELS};

const LAYOUT: u8 = 1;

/// Item entries' layout. Layout 1 kept one offset per item and no
/// partition; it reads as partition 0, where a one-partition catalogue
/// had it.
const ENTRY_LAYOUT: u8 = 2;

/// A logical table of the registry: a key prefix in its one store table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// item id (UTF-8) → [`ItemEntry`]
    Items,
    /// ord (u32, big-endian) → item id
    Ords,
    /// SID key ([`Sid::to_key`]) → [`Binding`]
    Sids,
    /// name → tokenizer binding, index generation, the index's own keys
    Meta,
    /// ord (u32, big-endian) → the item's weighted content words
    /// ([`encode_content`])
    Content,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Items,
        Table::Ords,
        Table::Sids,
        Table::Meta,
        Table::Content,
    ];

    pub fn prefix(self) -> u8 {
        match self {
            Table::Items => b'i',
            Table::Ords => b'o',
            Table::Sids => b's',
            Table::Meta => b'm',
            Table::Content => b'c',
        }
    }

    /// The name errors use.
    pub fn name(self) -> &'static str {
        match self {
            Table::Items => "items",
            Table::Ords => "ords",
            Table::Sids => "sids",
            Table::Meta => "meta",
            Table::Content => "content",
        }
    }

    /// The tree key of `key` in this table.
    pub fn key(self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + key.len());
        out.push(self.prefix());
        out.extend_from_slice(key);
        out
    }

    /// The table a tree key belongs to, and the key within it.
    pub fn split(tree_key: &[u8]) -> Option<(Table, &[u8])> {
        let (&first, rest) = tree_key.split_first()?;
        let table = Table::ALL.into_iter().find(|t| t.prefix() == first)?;
        Some((table, rest))
    }
}

/// Where an item stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A training item not seen online yet: its training SID is kept for it,
    /// but it is not recommendable.
    Reserved,
    /// Recommendable under its SID.
    Live,
    /// Retired. Its SID stays bound to it until released (see the module
    /// docs of [`registry`](super)), then it has none.
    Retired,
}

/// What the registry knows about one item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemEntry {
    /// The item's number, given at first sight and never reused.
    pub ord: u32,
    /// The item's SID: always present while reserved or live; for a retired
    /// item, present until the SID is released.
    pub sid: Option<Sid>,
    pub status: Status,
    /// The content hash of the last applied upsert (zero for a reserved item).
    pub content_hash: [u8; 32],
    /// The last event applied to the item from each catalogue partition
    /// (see [`Applied`]); empty for a reserved item no event has touched.
    pub applied: Applied,
    /// The index generation at which the item was last retired.
    pub retired_generation: Option<u64>,
}

/// What a bound SID is bound as. Kept in the `sids` table next to the ord so
/// that rebuilding the index and the allocator reads one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidState {
    /// A training item's SID, waiting for the item's first upsert.
    Reserved,
    /// The SID of a live item.
    Live,
    /// Left the live set at this index generation (the item was retired or
    /// moved to another SID); bound until released.
    Left(u64),
}

/// A value of the `sids` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub ord: u32,
    pub state: SidState,
}

/// The key of a SID in the `sids` table (without the table's byte): its
/// big-endian codes.
pub fn sid_key(sid: Sid) -> Vec<u8> {
    let (key, n) = sid.to_key();
    key[..n].to_vec()
}

/// The SID whose key is `key`, which must have `levels` levels.
pub fn decode_sid_key(key: &[u8], levels: usize) -> Result<Sid, String> {
    if key.len() != 2 * levels {
        return Err(format!(
            "a {levels}-level SID key has {} bytes, not {}",
            2 * levels,
            key.len()
        ));
    }
    let mut codes = [0; MAX_LEVELS];
    for (c, pair) in codes.iter_mut().zip(key.chunks_exact(2)) {
        *c = Code::from_be_bytes([pair[0], pair[1]]);
    }
    Sid::new(&codes[..levels]).map_err(|e| e.to_string())
}

pub fn ord_bytes(ord: u32) -> [u8; 4] {
    ord.to_be_bytes()
}

pub fn decode_ord(bytes: &[u8]) -> Result<u32, String> {
    let mut r = Reader(bytes);
    let ord = r.u32()?;
    r.end()?;
    Ok(ord)
}

pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Result<u64, String> {
    let mut r = Reader(bytes);
    let v = r.u64()?;
    r.end()?;
    Ok(v)
}

pub fn encode_entry(e: &ItemEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(ENTRY_LAYOUT);
    out.push(match e.status {
        Status::Reserved => 0,
        Status::Live => 1,
        Status::Retired => 2,
    });
    out.extend_from_slice(&e.ord.to_be_bytes());
    match e.sid {
        None => out.push(0),
        Some(sid) => {
            out.push(sid.levels() as u8);
            out.extend_from_slice(&sid_key(sid));
        }
    }
    out.extend_from_slice(&e.content_hash);
    let applied = e.applied.positions();
    out.extend_from_slice(&(applied.len() as u32).to_be_bytes());
    for p in applied {
        out.extend_from_slice(&p.partition.to_be_bytes());
        out.extend_from_slice(&p.offset.to_be_bytes());
    }
    put_opt(&mut out, e.retired_generation);
    out
}

/// Decodes an item entry whose SID, if any, has `levels` levels.
pub fn decode_entry(bytes: &[u8], levels: usize) -> Result<ItemEntry, String> {
    let mut r = Reader(bytes);
    let layout = r.version(&[1, ENTRY_LAYOUT])?;
    let status = match r.u8()? {
        0 => Status::Reserved,
        1 => Status::Live,
        2 => Status::Retired,
        s => return Err(format!("unknown item status {s}")),
    };
    let ord = r.u32()?;
    let sid = match usize::from(r.u8()?) {
        0 => None,
        n if n == levels => Some(decode_sid_key(r.take(2 * n)?, n)?),
        n => return Err(format!("a SID of {n} levels in a {levels}-level registry")),
    };
    if sid.is_none() && status != Status::Retired {
        return Err(format!("a {status:?} item without a SID"));
    }
    let mut content_hash = [0; 32];
    content_hash.copy_from_slice(r.take(32)?);
    let applied = if layout == 1 {
        let last = r.opt()?.map(|offset| Position::new(0, offset));
        Applied::from_positions(last.into_iter().collect())
    } else {
        let n = r.u32()? as usize;
        if n > r.0.len() / 12 {
            return Err(format!("{n} applied positions in {} bytes", r.0.len()));
        }
        let positions = (0..n)
            .map(|_| Ok(Position::new(r.u32()?, r.u64()?)))
            .collect::<Result<Vec<_>, String>>()?;
        Applied::from_positions(positions)
    };
    let retired_generation = r.opt()?;
    r.end()?;
    Ok(ItemEntry {
        ord,
        sid,
        status,
        content_hash,
        applied,
        retired_generation,
    })
}

pub fn encode_binding(b: Binding) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.push(LAYOUT);
    out.extend_from_slice(&b.ord.to_be_bytes());
    match b.state {
        SidState::Reserved => out.push(0),
        SidState::Live => out.push(1),
        SidState::Left(g) => {
            out.push(2);
            out.extend_from_slice(&g.to_be_bytes());
        }
    }
    out
}

pub fn decode_binding(bytes: &[u8]) -> Result<Binding, String> {
    let mut r = Reader(bytes);
    r.layout()?;
    let ord = r.u32()?;
    let state = match r.u8()? {
        0 => SidState::Reserved,
        1 => SidState::Live,
        2 => SidState::Left(r.u64()?),
        s => return Err(format!("unknown SID state {s}")),
    };
    r.end()?;
    Ok(Binding { ord, state })
}

fn put_opt(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// A cursor over bytes that reports running short instead of panicking.
/// A sparse content row: `(bucket, weight)` pairs.
pub fn encode_content(row: &[(u32, f32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + 8 * row.len());
    out.push(LAYOUT);
    out.extend_from_slice(&(row.len() as u32).to_be_bytes());
    for &(b, v) in row {
        out.extend_from_slice(&b.to_be_bytes());
        out.extend_from_slice(&v.to_bits().to_be_bytes());
    }
    out
}

pub fn decode_content(bytes: &[u8]) -> Result<Vec<(u32, f32)>, String> {
    let mut r = Reader(bytes);
    r.layout()?;
    let n = r.u32()? as usize;
    if n > r.0.len() / 8 {
        return Err(format!("{n} content entries in {} bytes", r.0.len()));
    }
    let row = (0..n)
        .map(|_| Ok((r.u32()?, f32::from_bits(r.u32()?))))
        .collect::<Result<Vec<_>, String>>()?;
    r.end()?;
    Ok(row)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: wanted {n} more bytes, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn opt(&mut self) -> Result<Option<u64>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            f => Err(format!("bad option flag {f}")),
        }
    }

    fn layout(&mut self) -> Result<(), String> {
        self.version(&[LAYOUT]).map(drop)
    }

    /// The value's layout version, one of `known`.
    fn version(&mut self, known: &[u8]) -> Result<u8, String> {
        match self.u8()? {
            v if known.contains(&v) => Ok(v),
            v => Err(format!("unknown layout version {v}")),
        }
    }

    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.0.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ItemEntry {
        ItemEntry {
            ord: 7,
            sid: Some("1-2-3-4".parse().unwrap()),
            status: Status::Live,
            content_hash: [9; 32],
            applied: Applied::at(Position::new(3, 42)),
            retired_generation: None,
        }
    }

    #[test]
    fn entries_round_trip() {
        let mut e = entry();
        assert_eq!(decode_entry(&encode_entry(&e), 4).unwrap(), e);
        e.status = Status::Retired;
        e.sid = None;
        e.applied = Applied::default();
        e.retired_generation = Some(u64::MAX);
        assert_eq!(decode_entry(&encode_entry(&e), 4).unwrap(), e);
        e.applied.record(Position::new(0, 7));
        e.applied.record(Position::new(1, u64::MAX));
        assert_eq!(decode_entry(&encode_entry(&e), 4).unwrap(), e);
    }

    #[test]
    fn a_layout_1_entry_reads_its_offset_as_partition_0s() {
        let e = entry();
        let mut old = vec![1];
        let now = encode_entry(&e);
        // status, ord, SID (levels byte and 8 bytes), content hash: as in layout 2.
        let fixed = 1 + 4 + 1 + 8 + 32;
        old.extend_from_slice(&now[1..1 + fixed]);
        old.push(1);
        old.extend_from_slice(&42u64.to_be_bytes());
        old.push(0);
        let read = decode_entry(&old, 4).unwrap();
        assert_eq!(read.applied, Applied::at(Position::new(0, 42)));
        assert_eq!(
            (read.ord, read.sid, read.content_hash),
            (e.ord, e.sid, e.content_hash)
        );
        old[1 + fixed] = 0;
        old.truncate(1 + fixed + 1);
        old.push(0);
        assert!(decode_entry(&old, 4).unwrap().applied.is_empty());
    }

    #[test]
    fn bindings_round_trip() {
        for state in [SidState::Reserved, SidState::Live, SidState::Left(3)] {
            let b = Binding {
                ord: 1 << 30,
                state,
            };
            assert_eq!(decode_binding(&encode_binding(b)).unwrap(), b);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let bytes = encode_entry(&entry());
        for n in 0..bytes.len() {
            assert!(decode_entry(&bytes[..n], 4).is_err(), "prefix of {n} bytes");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_entry(&long, 4).unwrap_err().contains("trailing"));
        assert!(decode_entry(&bytes, 3).unwrap_err().contains("4 levels"));
        let b = encode_binding(Binding {
            ord: 1,
            state: SidState::Left(5),
        });
        for n in 0..b.len() {
            assert!(decode_binding(&b[..n]).is_err(), "prefix of {n} bytes");
        }
        let row = [(3, 0.5), (1023, -2.25)];
        let c = encode_content(&row);
        assert_eq!(decode_content(&c).unwrap(), row);
        assert_eq!(decode_content(&encode_content(&[])).unwrap(), []);
        for n in 0..c.len() {
            assert!(decode_content(&c[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut long = c.clone();
        long.extend([0; 8]);
        assert!(decode_content(&long).unwrap_err().contains("trailing"));
        // A count that the bytes cannot hold is refused before reading.
        let mut huge = c.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_content(&huge).is_err());
    }

    #[test]
    fn bad_tags_are_errors() {
        let mut bytes = encode_entry(&entry());
        bytes[0] = 3;
        assert!(decode_entry(&bytes, 4).unwrap_err().contains("layout"));
        bytes[0] = ENTRY_LAYOUT;
        bytes[1] = 9;
        assert!(decode_entry(&bytes, 4).unwrap_err().contains("status"));
        let mut live_without_sid = entry();
        live_without_sid.sid = None;
        let err = decode_entry(&encode_entry(&live_without_sid), 4).unwrap_err();
        assert!(err.contains("without a SID"), "{err}");
        // A count of positions the bytes cannot hold is refused before
        // reading (it follows the layout, status, ord, SID and hash).
        let mut huge = encode_entry(&entry());
        huge[47..51].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = decode_entry(&huge, 4).unwrap_err();
        assert!(err.contains("applied positions"), "{err}");
    }

    #[test]
    fn table_keys_split_back() {
        for t in Table::ALL {
            assert_eq!(Table::split(&t.key(b"k")), Some((t, &b"k"[..])));
        }
        assert_eq!(Table::split(b"x"), None);
        assert_eq!(Table::split(b""), None);
    }
}
