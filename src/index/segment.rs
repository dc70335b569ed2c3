//! A base segment: the immutable `fst::Map` of SIDs on disk, and its tables.
//!
//! Segments are written once, by a merge, and never modified: written to a
//! temporary file, fsynced, renamed into place and the directory fsynced, so a
//! crash leaves either the old generation or the new one, never half a file.
//! Reopening memory-maps the file and checks the FST's checksum before trusting
//! it; the decoding tables are rebuilt from the map's sorted key stream (one
//! linear pass, no registry scan).

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use fst::{IntoStreamer, Map, MapBuilder, Streamer};
use memmap2::Mmap;

use super::trie::{Trie, TrieBuilder};
use super::IndexError;
use crate::sid::{Code, Sid, MAX_LEVELS};

/// One generation's base: SID key → item ord, plus its trie tables.
pub struct Segment {
    generation: u64,
    path: PathBuf,
    map: Map<Mmap>,
    trie: Trie,
}

/// The file name of a generation's base.
pub fn file_name(generation: u64) -> String {
    format!("base-{generation:016x}.fst")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn fst_err(path: &Path) -> impl FnOnce(fst::Error) -> IndexError + '_ {
    move |e| IndexError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Decodes an FST key back into a SID.
pub fn key_to_sid(key: &[u8], levels: usize) -> Option<Sid> {
    if key.len() != 2 * levels || levels > MAX_LEVELS {
        return None;
    }
    let mut codes = [0 as Code; MAX_LEVELS];
    for (c, b) in codes.iter_mut().zip(key.chunks(2)) {
        *c = Code::from_be_bytes([b[0], b[1]]);
    }
    Sid::new(&codes[..levels]).ok()
}

impl Segment {
    /// Writes generation `generation` from `(sid, ord)` pairs in SID order.
    pub fn write(
        dir: &Path,
        generation: u64,
        vocab: &[usize],
        items: impl IntoIterator<Item = (Sid, u32)>,
    ) -> Result<Segment, IndexError> {
        let path = dir.join(file_name(generation));
        let tmp = dir.join(format!("{}.tmp", file_name(generation)));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut builder =
            MapBuilder::new(BufWriter::with_capacity(1 << 20, file)).map_err(fst_err(&tmp))?;
        let mut trie = TrieBuilder::new(vocab);
        for (sid, ord) in items {
            trie.push(sid, ord)
                .map_err(|e| IndexError::Invalid(e.to_string()))?;
            let (key, len) = sid.to_key();
            builder
                .insert(&key[..len], u64::from(ord))
                .map_err(fst_err(&tmp))?;
        }
        let file = builder
            .into_inner()
            .map_err(fst_err(&tmp))?
            .into_inner()
            .map_err(|e| IndexError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        let map = mmap(&path)?;
        Ok(Segment {
            generation,
            path,
            map,
            trie: trie.finish(),
        })
    }

    /// Opens a generation written before, verifying its checksum.
    pub fn open(dir: &Path, generation: u64, vocab: &[usize]) -> Result<Segment, IndexError> {
        let path = dir.join(file_name(generation));
        let map = mmap(&path)?;
        map.as_fst().verify().map_err(fst_err(&path))?;
        let levels = vocab.len();
        let mut trie = TrieBuilder::new(vocab);
        let mut stream = map.stream();
        while let Some((key, ord)) = stream.next() {
            let corrupt = |detail: String| IndexError::Corrupt {
                path: path.clone(),
                detail,
            };
            let sid = key_to_sid(key, levels)
                .ok_or_else(|| corrupt(format!("key of {} bytes", key.len())))?;
            let ord = u32::try_from(ord)
                .map_err(|_| corrupt(format!("item number {ord} out of range")))?;
            trie.push(sid, ord).map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(Segment {
            generation,
            path,
            map,
            trie: trie.finish(),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn trie(&self) -> &Trie {
        &self.trie
    }

    pub fn get(&self, sid: Sid) -> Option<u32> {
        let (key, len) = sid.to_key();
        self.map.get(&key[..len]).map(|v| v as u32)
    }

    /// All `(sid, ord)` in SID order.
    pub fn for_each(&self, mut f: impl FnMut(Sid, u32)) {
        let levels = self.trie.levels();
        let mut stream = self.map.into_stream();
        while let Some((key, ord)) = stream.next() {
            if let Some(sid) = key_to_sid(key, levels) {
                f(sid, ord as u32);
            }
        }
    }

    /// Bytes on disk (the FST) and in memory (the tables).
    pub fn bytes(&self) -> (usize, usize) {
        (self.map.as_fst().as_bytes().len(), self.trie.heap_bytes())
    }
}

fn mmap(path: &Path) -> Result<Map<Mmap>, IndexError> {
    let file = File::open(path).map_err(io(path))?;
    // SAFETY: segment files are immutable once renamed into place; genfeed
    // never writes to them again and deletes them only after no snapshot
    // holds them.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io(path))?;
    Map::new(mmap).map_err(fst_err(path))
}

/// Removes segment files of generations other than `keep` (and stray
/// temporary files from an interrupted merge).
pub fn remove_others(dir: &Path, keep: u64) -> Result<(), IndexError> {
    let keep = file_name(keep);
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("base-") && name != keep {
            let p = entry.path();
            fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_segment_reopens_identically() {
        let dir = tempfile::tempdir().unwrap();
        let sids: Vec<(Sid, u32)> = (0..500u16)
            .map(|i| (Sid::new(&[i % 7, i / 7 % 5, i]).unwrap(), u32::from(i) * 3))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let s = Segment::write(dir.path(), 1, &[8, 8, 512], sids.iter().copied()).unwrap();
        assert_eq!(s.get(sids[10].0), Some(sids[10].1));
        assert_eq!(s.get(Sid::new(&[7, 0, 0]).unwrap()), None);
        let r = Segment::open(dir.path(), 1, &[8, 8, 512]).unwrap();
        let mut back = Vec::new();
        r.for_each(|s, o| back.push((s, o)));
        assert_eq!(back, sids);
        assert_eq!(r.trie().len(), 500);
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sids = (0..200u16).map(|i| (Sid::new(&[i / 16, i % 16]).unwrap(), u32::from(i)));
        Segment::write(dir.path(), 3, &[16, 16], sids).unwrap();
        let path = dir.path().join(file_name(3));
        let bytes = fs::read(&path).unwrap();
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x55;
        fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            Segment::open(dir.path(), 3, &[16, 16]),
            Err(IndexError::Corrupt { .. })
        ));
        fs::write(&path, &bytes[..bytes.len() - 9]).unwrap();
        assert!(matches!(
            Segment::open(dir.path(), 3, &[16, 16]),
            Err(IndexError::Corrupt { .. })
        ));
        assert!(matches!(
            Segment::open(dir.path(), 4, &[16, 16]),
            Err(IndexError::Io { .. })
        ));
    }
}
