//! Staging: an event's writes are collected whole and committed in groups
//! of events (see the module docs, "Storage").

use std::sync::MutexGuard;

use super::codec::{self, Binding, SidState, Table};
use super::{ItemEntry, Registry, RegistryError, GROUP_AGE, GROUP_EVENTS};
use crate::sid::Sid;
use crate::store::Group;

/// The writes of one event, staged together once the event cannot fail any
/// more.
#[derive(Default)]
pub(super) struct Writes {
    kv: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// SIDs that start waiting for release: generation, SID, ord.
    leave: Vec<(u64, Sid, u32)>,
    /// SIDs that stop waiting for release (live again): generation, SID.
    stay: Vec<(u64, Sid)>,
}

impl Writes {
    pub(super) fn entry(&mut self, item_id: &str, entry: &ItemEntry) {
        self.kv.push((
            Table::Items.key(item_id.as_bytes()),
            Some(codec::encode_entry(entry)),
        ));
    }

    pub(super) fn ord(&mut self, ord: u32, item_id: &str) {
        self.kv.push((
            Table::Ords.key(&codec::ord_bytes(ord)),
            Some(item_id.as_bytes().to_vec()),
        ));
    }

    pub(super) fn bind(&mut self, sid: Sid, ord: u32, state: SidState) {
        self.kv.push((
            Table::Sids.key(&codec::sid_key(sid)),
            Some(codec::encode_binding(Binding { ord, state })),
        ));
    }

    pub(super) fn unbind(&mut self, sid: Sid) {
        self.kv.push((Table::Sids.key(&codec::sid_key(sid)), None));
    }

    /// Binds `sid` as having left at `generation`, waiting for release.
    pub(super) fn leave(&mut self, sid: Sid, ord: u32, generation: u64) {
        self.bind(sid, ord, SidState::Left(generation));
        self.leave.push((generation, sid, ord));
    }

    /// Makes `sid`, which left at `generation`, live again for `ord`.
    pub(super) fn stay(&mut self, sid: Sid, ord: u32, generation: u64) {
        self.bind(sid, ord, SidState::Live);
        self.stay.push((generation, sid));
    }
}

impl Registry {
    pub(super) fn staged(&self) -> MutexGuard<'_, Group> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stages one event's writes (which cannot fail) and follows them in
    /// memory.
    pub(super) fn stage(&mut self, w: Writes) {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        staged.stage(w.kv);
        for (generation, sid) in w.stay {
            if let Some(sids) = self.leaving.get_mut(&generation) {
                sids.remove(&sid);
                if sids.is_empty() {
                    self.leaving.remove(&generation);
                }
            }
        }
        for (generation, sid, ord) in w.leave {
            self.leaving.entry(generation).or_default().insert(sid, ord);
        }
    }

    /// Commits the staged events if their group is full or old enough.
    pub(super) fn write_if_due(&mut self) -> Result<(), RegistryError> {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        if staged.due(GROUP_EVENTS, GROUP_AGE) {
            staged.commit(&self.db)?;
        }
        Ok(())
    }

    pub(super) fn write_staged(&self) -> Result<(), RegistryError> {
        Ok(self.staged().commit(&self.db)?)
    }

    /// Stages one write after everything staged so far and commits them all.
    pub(super) fn put_now(&self, key: Vec<u8>, value: &[u8]) -> Result<(), RegistryError> {
        let mut staged = self.staged();
        staged.stage([(key, Some(value.to_vec()))]);
        Ok(staged.commit(&self.db)?)
    }
}

impl Drop for Registry {
    /// Commits the staged events; the store flushes when dropped.
    fn drop(&mut self) {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = staged.commit(&self.db) {
            tracing::error!(error = %e, "registry: staged events not written on close");
        }
    }
}
