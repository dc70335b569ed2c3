//! The cold-start protocol: items held out of training and met only as test
//! targets.
//!
//! TIGER's cold-start experiment removes a share of the test items from
//! training and asks whether the model still recommends them; LIGER takes the
//! test targets never seen in training. A cold split does both on a RecBole
//! log: a seeded fraction of the items that are some user's last item
//! becomes *cold*, and every interaction with a cold item is dropped except
//! where it is its user's last one, the leave-one-out test target. A cold
//! item is then, for training and for tokenizer training, a catalogue item
//! with no interactions, exactly what a catalogue event brings the service.
//!
//! Which interaction is a user's last follows [`super::Sequences`]: the
//! largest timestamp, and among equal timestamps the last in the file.

use std::collections::{HashMap, HashSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::Interaction;

/// What a cold split keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct ColdSplit {
    /// The cold items, sorted.
    pub cold: Vec<String>,
    /// For each input interaction, in input order: whether it survives.
    pub keep: Vec<bool>,
    /// Users whose last item (the test target) is cold.
    pub cold_users: usize,
}

/// Chooses `fraction` of the test items (items that are the last of a user
/// with at least three interactions, as leave-one-out has it), seeded, and
/// keeps every event except a cold item's that is not its user's last.
///
/// The candidates are sorted before shuffling, so the choice depends on the
/// seed and the set of test items, not on the order of the file.
pub fn cold_split(events: &[Interaction<'_>], fraction: f64, seed: u64) -> ColdSplit {
    let mut last: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let slot = last.entry(e.user).or_insert((i, 0));
        let cur = &events[slot.0];
        if (e.timestamp, e.line) >= (cur.timestamp, cur.line) {
            slot.0 = i;
        }
        slot.1 += 1;
    }
    let mut candidates: Vec<&str> = last
        .values()
        .filter(|&&(_, n)| n >= 3)
        .map(|&(i, _)| events[i].item)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    candidates.sort_unstable();
    candidates.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let take = ((candidates.len() as f64 * fraction.clamp(0.0, 1.0)).round() as usize)
        .min(candidates.len());
    let mut cold: Vec<&str> = candidates[..take].to_vec();
    cold.sort_unstable();
    let is_cold: HashSet<&str> = cold.iter().copied().collect();
    let last_event: HashSet<usize> = last.values().map(|&(i, _)| i).collect();
    let keep = events
        .iter()
        .enumerate()
        .map(|(i, e)| !is_cold.contains(e.item) || last_event.contains(&i))
        .collect();
    let cold_users = last
        .values()
        .filter(|&&(i, n)| n >= 3 && is_cold.contains(events[i].item))
        .count();
    ColdSplit {
        cold: cold.into_iter().map(str::to_string).collect(),
        keep,
        cold_users,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev<'a>(user: &'a str, item: &'a str, timestamp: f64, line: u64) -> Interaction<'a> {
        Interaction {
            user,
            item,
            timestamp,
            line,
        }
    }

    #[test]
    fn cold_items_survive_only_as_their_users_last_item() {
        // u1: a b c (c last); u2: c a b (c first, b last); u3: b a c, c twice.
        let events = vec![
            ev("u1", "a", 1.0, 2),
            ev("u1", "b", 2.0, 3),
            ev("u1", "c", 3.0, 4),
            ev("u2", "c", 1.0, 5),
            ev("u2", "a", 2.0, 6),
            ev("u2", "b", 3.0, 7),
            ev("u3", "c", 1.0, 8),
            ev("u3", "a", 2.0, 9),
            ev("u3", "c", 3.0, 10),
        ];
        // Test items are c (u1, u3) and b (u2); all of them cold.
        let split = cold_split(&events, 1.0, 0);
        assert_eq!(split.cold, vec!["b", "c"]);
        assert_eq!(split.cold_users, 3);
        let kept: Vec<(&str, &str)> = events
            .iter()
            .zip(&split.keep)
            .filter(|(_, &k)| k)
            .map(|(e, _)| (e.user, e.item))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("u1", "a"),
                ("u1", "c"),
                ("u2", "a"),
                ("u2", "b"),
                ("u3", "a"),
                ("u3", "c"),
            ]
        );
        // u3's earlier c is gone: only the last occurrence is the target.
        assert!(!split.keep[6] && split.keep[8]);
    }

    #[test]
    fn the_choice_depends_on_the_seed_not_the_file_order() {
        let items: Vec<String> = (0..200).map(|i| format!("i{i}")).collect();
        let users: Vec<String> = (0..200).map(|u| format!("u{u}")).collect();
        let mut events = Vec::new();
        for u in 0..200 {
            for k in 0..3 {
                let item = &items[(u + 7 * k) % 200];
                events.push(ev(&users[u], item, k as f64, events.len() as u64));
            }
        }
        let a = cold_split(&events, 0.05, 3);
        assert_eq!(a.cold.len(), 10);
        let mut reversed = events.clone();
        reversed.reverse();
        for (i, e) in reversed.iter_mut().enumerate() {
            e.line = i as u64;
        }
        assert_eq!(cold_split(&reversed, 0.05, 3).cold, a.cold);
        assert_ne!(cold_split(&events, 0.05, 4).cold, a.cold);
    }

    #[test]
    fn users_too_short_for_a_test_target_give_no_candidates() {
        let events = vec![ev("u1", "a", 1.0, 2), ev("u1", "b", 2.0, 3)];
        let split = cold_split(&events, 1.0, 0);
        assert!(split.cold.is_empty());
        assert_eq!(split.keep, vec![true, true]);
    }
}
