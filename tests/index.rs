//! Model-based tests of the SID index: random interleavings of inserts,
//! removals, publishes, merges and reopenings, checked at every step against a
//! plain `BTreeMap` of the live set.
//!
//! `PROPTEST_CASES` raises the number of cases (default here: 2,000 sequences).

use std::collections::BTreeMap;

use genfeed::index::{Index, Opened, Snapshot};
use genfeed::sid::{Code, Sid};
use proptest::prelude::*;

/// Four levels: the first three use the dense tables, the last the CSR rows.
const VOCAB: [usize; 4] = [3, 3, 2, 5];

#[derive(Clone, Debug)]
enum Op {
    Insert(Sid, u32),
    Remove(Sid),
    Publish,
    StartMerge,
    FinishMerge,
    Reopen { damage: bool },
}

fn sid_strategy() -> impl Strategy<Value = Sid> {
    (
        0..VOCAB[0] as Code,
        0..VOCAB[1] as Code,
        0..VOCAB[2] as Code,
        0..VOCAB[3] as Code,
    )
        .prop_map(|(a, b, c, d)| Sid::new(&[a, b, c, d]).unwrap())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (sid_strategy(), 0..50u32).prop_map(|(s, o)| Op::Insert(s, o)),
        4 => sid_strategy().prop_map(Op::Remove),
        3 => Just(Op::Publish),
        1 => Just(Op::StartMerge),
        1 => Just(Op::FinishMerge),
        1 => any::<bool>().prop_map(|damage| Op::Reopen { damage }),
    ]
}

/// Every prefix of the model's live set, with its allowed next tokens.
fn model_allowed(model: &BTreeMap<Sid, u32>, prefix: &[Code]) -> Vec<Code> {
    let mut out: Vec<Code> = model
        .keys()
        .filter(|s| s.codes().starts_with(prefix))
        .map(|s| s.codes()[prefix.len()])
        .collect();
    out.dedup();
    out
}

/// The tokens the snapshot offers after `codes`, sorted, as decoding steps
/// through them.
fn allowed_after(s: &Snapshot, codes: &[Code]) -> Vec<Code> {
    let mut out = Vec::new();
    if let Some(c) = s.seek(codes) {
        s.allowed(c, |code| out.push(code));
    }
    out.sort_unstable();
    out
}

fn check(index: &Index, model: &BTreeMap<Sid, u32>) -> Result<(), TestCaseError> {
    let s = index.reader().snapshot();
    let live: Vec<(Sid, u32)> = model.iter().map(|(&s, &o)| (s, o)).collect();
    prop_assert_eq!(s.live(), live.clone());
    prop_assert_eq!(s.len(), model.len());
    for a in 0..VOCAB[0] as Code {
        for b in 0..VOCAB[1] as Code {
            for c in 0..VOCAB[2] as Code {
                for d in 0..VOCAB[3] as Code {
                    let sid = Sid::new(&[a, b, c, d]).unwrap();
                    prop_assert_eq!(s.get(sid), model.get(&sid).copied(), "get {}", sid);
                }
                let p = [a, b, c];
                prop_assert_eq!(
                    allowed_after(&s, &p),
                    model_allowed(model, &p),
                    "after {:?}",
                    p
                );
                // The mask a decoding step applies says the same, on the
                // CSR level here and on a dense level for the shorter prefix.
                for prefix in [&p[..], &p[..1]] {
                    if let Some(cursor) = s.seek(prefix) {
                        let mut mask = vec![0.0f32; 8];
                        s.fill_mask(&[cursor], 8, &mut mask);
                        let allowed: Vec<Code> =
                            (0..8).filter(|&t| mask[t as usize] == 0.0).collect();
                        prop_assert_eq!(
                            allowed,
                            model_allowed(model, prefix),
                            "mask after {:?}",
                            prefix
                        );
                    }
                }
            }
            prop_assert_eq!(
                allowed_after(&s, &[a, b]),
                model_allowed(model, &[a, b]),
                "after {}-{}",
                a,
                b
            );
        }
        prop_assert_eq!(
            allowed_after(&s, &[a]),
            model_allowed(model, &[a]),
            "after {}",
            a
        );
    }
    prop_assert_eq!(allowed_after(&s, &[]), model_allowed(model, &[]));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn index_equals_the_model_at_every_step(
        initial in proptest::collection::btree_map(sid_strategy(), 0..50u32, 0..30),
        ops in proptest::collection::vec(op_strategy(), 1..60),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let live: Vec<(Sid, u32)> = initial.iter().map(|(&s, &o)| (s, o)).collect();
        let (mut index, _) = Index::open(dir.path(), &VOCAB, None, &live, usize::MAX).unwrap();
        let mut recorded = index.generation();
        let mut model = initial.clone();
        let mut published = model.clone();
        check(&index, &published)?;
        for op in ops {
            match op {
                Op::Insert(sid, ord) => {
                    index.insert(sid, ord);
                    model.insert(sid, ord);
                }
                Op::Remove(sid) => {
                    index.remove(sid);
                    model.remove(&sid);
                }
                Op::Publish => {
                    index.publish();
                    published = model.clone();
                }
                Op::StartMerge => {
                    index.start_merge();
                }
                Op::FinishMerge => {
                    recorded = index.merge_now().unwrap();
                    index.remove_old_segments().unwrap();
                    published = model.clone();
                }
                Op::Reopen { damage } => {
                    drop(index);
                    if damage {
                        let path = dir.path().join(genfeed::index::segment::file_name(recorded));
                        let mut bytes = std::fs::read(&path).unwrap();
                        let mid = bytes.len() / 2;
                        bytes[mid] ^= 0xa5;
                        std::fs::write(&path, &bytes).unwrap();
                    }
                    let live: Vec<(Sid, u32)> = model.iter().map(|(&s, &o)| (s, o)).collect();
                    let (i, how) = Index::open(dir.path(), &VOCAB, Some(recorded), &live, usize::MAX).unwrap();
                    if damage {
                        prop_assert!(matches!(how, Opened::Rebuilt { .. }), "{:?}", how);
                    } else {
                        prop_assert_eq!(how, Opened::Reopened);
                    }
                    index = i;
                    recorded = index.generation();
                    published = model.clone();
                }
            }
            check(&index, &published)?;
        }
    }
}
