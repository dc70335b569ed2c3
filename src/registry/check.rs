//! The consistency check: every table agrees with every other.

use std::collections::BTreeMap;

use super::codec::{self, SidState, Table};
use super::error::show_key;
use super::{corrupt, Registry, RegistryError, Status};

impl Registry {
    /// Reads every table and checks that they agree: each item's ord names it
    /// back, each bound SID belongs to the item it says and is in the state
    /// the item's status implies, each SID that left is waiting for release
    /// and nothing else is, and the counts are right.
    pub fn check(&self) -> Result<(), RegistryError> {
        self.write_staged()?;
        for kv in self.scan(Table::Items) {
            let (key, value) = kv?;
            let key = &key[1..];
            let (id, e) = self.decode_item(key, &value)?;
            if u64::from(e.ord) >= self.next_ord {
                return Err(corrupt(
                    Table::Items,
                    key,
                    format!("ord {} not below the next ord {}", e.ord, self.next_ord),
                ));
            }
            if self.item_id(e.ord)?.as_deref() != Some(id.as_str()) {
                return Err(corrupt(
                    Table::Items,
                    key,
                    format!("ord {} names another item", e.ord),
                ));
            }
            if let Some(sid) = e.sid {
                let bound = self.binding(sid)?;
                let agrees = bound.is_some_and(|b| {
                    b.ord == e.ord
                        && matches!(
                            (e.status, b.state),
                            (Status::Reserved, SidState::Reserved)
                                | (Status::Live, SidState::Live)
                                | (Status::Retired, SidState::Left(_))
                        )
                });
                if !agrees {
                    return Err(corrupt(
                        Table::Items,
                        key,
                        format!("{:?} with SID {sid}, bound as {bound:?}", e.status),
                    ));
                }
            }
        }
        let (mut items, mut ords) = (0, 0);
        for kv in self.db.scan(&[])? {
            let (key, _) = kv?;
            match Table::split(&key) {
                Some((Table::Items, _)) => items += 1,
                Some((Table::Ords, _)) => ords += 1,
                Some(_) => {}
                None => {
                    return Err(RegistryError::Corrupt {
                        tree: "registry",
                        key: show_key(&key),
                        detail: "a key of no table".into(),
                    })
                }
            }
        }
        if ords != items {
            return Err(corrupt(
                Table::Ords,
                b"",
                format!("{ords} ords for {items} items"),
            ));
        }
        let (mut live, mut left) = (0, 0);
        for kv in self.scan(Table::Sids) {
            let (key, value) = kv?;
            let key = &key[1..];
            let bad = |d: String| corrupt(Table::Sids, key, d);
            let sid = codec::decode_sid_key(key, self.levels).map_err(bad)?;
            let b = codec::decode_binding(&value).map_err(bad)?;
            let id = self
                .item_id(b.ord)?
                .ok_or_else(|| bad(format!("bound to unknown ord {}", b.ord)))?;
            let e = self
                .get(&id)?
                .ok_or_else(|| bad(format!("bound to missing item {id:?}")))?;
            match b.state {
                SidState::Left(g) => {
                    left += 1;
                    let waiting = self.leaving.get(&g).and_then(|sids| sids.get(&sid));
                    if waiting != Some(&b.ord) {
                        return Err(bad(format!("left at {g} but not waiting for release")));
                    }
                }
                SidState::Live | SidState::Reserved => {
                    live += usize::from(b.state == SidState::Live);
                    if e.sid != Some(sid) {
                        return Err(bad(format!("{:?} but item {id:?} is not on it", b.state)));
                    }
                }
            }
        }
        let waiting: usize = self.leaving.values().map(BTreeMap::len).sum();
        if waiting != left {
            return Err(corrupt(
                Table::Sids,
                b"",
                format!("{waiting} waiting for release, {left} SIDs left"),
            ));
        }
        if live != self.live {
            return Err(corrupt(
                Table::Sids,
                b"",
                format!("{live} live SIDs, {} counted", self.live),
            ));
        }
        Ok(())
    }
}
