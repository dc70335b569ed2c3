//! Leave-one-out splitting of user sequences into train, valid and test.
//!
//! This is the protocol of TIGER, SASRec, S3-Rec and P5 on these datasets:
//! for a user with `n >= 3` items, item `n-1` is the test target, item `n-2`
//! the validation target, and every item at position `1..n-2` of the prefix
//! is a training target. Each example's history is the last `max_history`
//! items before its target.
//!
//! Users with fewer than 3 items cannot give a test and a validation target
//! and still have history, so they contribute training examples only (every
//! position `>= 1`); a user with a single item contributes nothing.
//!
//! Examples are stored as `(user, target position)` pairs, eight bytes each;
//! histories are slices of the sequences, never copies.

/// The history length of the field's protocol.
pub const DEFAULT_MAX_HISTORY: usize = 20;

/// Where an example's target sits: `seqs[user][pos]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    user: u32,
    pos: u32,
}

/// One example: predict `target` for `user` after `history`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Example<'a> {
    /// Dense user index.
    pub user: usize,
    /// At most `max_history` items, oldest first, ending just before the target.
    pub history: &'a [u32],
    pub target: u32,
}

/// The three example sets of a leave-one-out split.
#[derive(Clone, Debug)]
pub struct Split<'a> {
    seqs: &'a [Vec<u32>],
    max_history: usize,
    train: Vec<Position>,
    valid: Vec<Position>,
    test: Vec<Position>,
}

impl<'a> Split<'a> {
    /// Splits `seqs` (per user, item indices in time order).
    ///
    /// Positions are stored as `u32` to keep an example at eight bytes, so
    /// users past index `u32::MAX` and sequences longer than `u32::MAX` items
    /// are skipped.
    pub fn leave_one_out(seqs: &'a [Vec<u32>], max_history: usize) -> Split<'a> {
        let mut split = Split {
            seqs,
            max_history,
            train: Vec::new(),
            valid: Vec::new(),
            test: Vec::new(),
        };
        for (user, seq) in (0..=u32::MAX).zip(seqs) {
            let Ok(n) = u32::try_from(seq.len()) else {
                continue;
            };
            let at = |pos| Position { user, pos };
            let train_len = if n >= 3 {
                split.valid.push(at(n - 2));
                split.test.push(at(n - 1));
                n - 2
            } else {
                n
            };
            split.train.extend((1..train_len).map(at));
        }
        split
    }

    /// Per item of `items`: whether it occurs anywhere in a training prefix
    /// (as a training target or in a training history). An item that does
    /// not is cold for the model: it never learnt it.
    pub fn trained_items(&self, items: usize) -> Vec<bool> {
        let mut seen = vec![false; items];
        for seq in self.seqs {
            let n = if seq.len() >= 3 {
                seq.len() - 2
            } else {
                seq.len()
            };
            for &i in &seq[..n] {
                if let Some(s) = seen.get_mut(i as usize) {
                    *s = true;
                }
            }
        }
        seen
    }

    /// Every next-item position of every training prefix, user by user.
    pub fn train(&self) -> Examples<'_> {
        self.examples(&self.train)
    }

    /// One example per user with at least 3 items: the second-last item.
    pub fn valid(&self) -> Examples<'_> {
        self.examples(&self.valid)
    }

    /// One example per user with at least 3 items: the last item.
    pub fn test(&self) -> Examples<'_> {
        self.examples(&self.test)
    }

    fn examples<'s>(&'s self, positions: &'s [Position]) -> Examples<'s> {
        Examples {
            seqs: self.seqs,
            max_history: self.max_history,
            positions,
        }
    }
}

/// A view of one example set, indexable so a trainer can shuffle indices.
#[derive(Clone, Copy, Debug)]
pub struct Examples<'a> {
    seqs: &'a [Vec<u32>],
    max_history: usize,
    positions: &'a [Position],
}

impl<'a> Examples<'a> {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The `i`-th example, or `None` if `i >= len()`.
    pub fn get(&self, i: usize) -> Option<Example<'a>> {
        self.positions.get(i).map(|&p| self.example(p))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Example<'a>> {
        let this = *self;
        self.positions.iter().map(move |&p| this.example(p))
    }

    fn example(&self, p: Position) -> Example<'a> {
        let (user, pos) = (p.user as usize, p.pos as usize);
        let seq = &self.seqs[user];
        Example {
            user,
            history: &seq[pos.saturating_sub(self.max_history)..pos],
            target: seq[pos],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triples<'a>(ex: Examples<'a>) -> Vec<(usize, &'a [u32], u32)> {
        ex.iter().map(|e| (e.user, e.history, e.target)).collect()
    }

    #[test]
    fn leave_one_out_targets_and_histories() {
        let seqs = vec![
            vec![10, 11, 12, 13, 14], // n = 5
            vec![20, 21],             // n = 2: train only
            vec![30, 31, 32],         // n = 3: one each, empty train targets
            vec![40],                 // n = 1: nothing
        ];
        let split = Split::leave_one_out(&seqs, DEFAULT_MAX_HISTORY);
        assert_eq!(
            triples(split.train()),
            vec![
                (0, &[10][..], 11),
                (0, &[10, 11][..], 12),
                (1, &[20][..], 21),
            ]
        );
        assert_eq!(
            triples(split.valid()),
            vec![(0, &[10, 11, 12][..], 13), (2, &[30][..], 31)]
        );
        assert_eq!(
            triples(split.test()),
            vec![(0, &[10, 11, 12, 13][..], 14), (2, &[30, 31][..], 32)]
        );
    }

    #[test]
    fn histories_keep_only_the_last_max_history_items() {
        let seqs = vec![(0..10).collect::<Vec<u32>>()];
        let split = Split::leave_one_out(&seqs, 3);
        let test = split.test().get(0).unwrap();
        assert_eq!((test.history, test.target), (&[6, 7, 8][..], 9));
        let valid = split.valid().get(0).unwrap();
        assert_eq!((valid.history, valid.target), (&[5, 6, 7][..], 8));
        let train = split.train();
        assert_eq!(train.len(), 7);
        assert_eq!(train.get(0).unwrap().history, &[0]);
        assert_eq!(train.get(6).unwrap().history, &[4, 5, 6]);
        assert_eq!(train.get(6).unwrap().target, 7);
        assert!(train.iter().all(|e| e.history.len() <= 3));
        assert!(train.get(7).is_none());
    }

    #[test]
    fn trained_items_are_those_of_training_prefixes() {
        // Item 4 is only a test target, 3 only a validation target, 5 only
        // in a two-item user's sequence (all training), 6 nowhere.
        let seqs = vec![vec![0, 1, 2, 3, 4], vec![5, 0], vec![1, 2, 1]];
        let split = Split::leave_one_out(&seqs, 20);
        assert_eq!(
            split.trained_items(7),
            vec![true, true, true, false, false, true, false]
        );
    }

    #[test]
    fn history_is_a_view_not_a_copy() {
        let seqs = vec![vec![1, 2, 3, 4]];
        let split = Split::leave_one_out(&seqs, 20);
        let test = split.test().get(0).unwrap();
        assert!(std::ptr::eq(test.history.as_ptr(), seqs[0].as_ptr()));
    }
}
