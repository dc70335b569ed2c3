//! The streaming protocol's split: train on what happened before a cut,
//! stream the rest.
//!
//! Leave-one-out asks what a user takes next given everything else; a
//! streaming recommender is asked the same question with the future unseen,
//! while items keep arriving. A time split cuts the log at a point in time:
//! what comes before trains the tokenizer and the model, what comes after is
//! replayed through the service in order (`genfeed replay --train`), and
//! the items first met after the cut are *fresh*: catalogue events the
//! service gets just before their first interaction, exactly as brand-new
//! items reach it in production.
//!
//! Timestamps order the events (ties by file line); on the shared Amazon
//! sets they are positions, not times, and the cut is then one in order
//! only.

use std::collections::HashSet;

use super::Interaction;

/// What a time split puts on each side.
#[derive(Clone, Debug, PartialEq)]
pub struct TimeSplit {
    /// For each input interaction, in input order: before the cut.
    pub train: Vec<bool>,
    /// The timestamp of the first event streamed (`None`: nothing is).
    pub cut: Option<f64>,
    /// Items first met after the cut, sorted.
    pub fresh: Vec<String>,
}

/// Puts the first `fraction` of the events, in (timestamp, line) order, on
/// the training side.
pub fn time_split(events: &[Interaction<'_>], fraction: f64) -> TimeSplit {
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&events[a], &events[b]);
        x.timestamp
            .total_cmp(&y.timestamp)
            .then(x.line.cmp(&y.line))
    });
    let k = ((events.len() as f64 * fraction.clamp(0.0, 1.0)).round() as usize).min(events.len());
    let mut train = vec![false; events.len()];
    for &i in &order[..k] {
        train[i] = true;
    }
    let known: HashSet<&str> = order[..k].iter().map(|&i| events[i].item).collect();
    let mut fresh: Vec<String> = order[k..]
        .iter()
        .map(|&i| events[i].item)
        .filter(|item| !known.contains(item))
        .collect::<HashSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect();
    fresh.sort_unstable();
    TimeSplit {
        train,
        cut: order.get(k).map(|&i| events[i].timestamp),
        fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(
        line: u64,
        user: &'static str,
        item: &'static str,
        timestamp: f64,
    ) -> Interaction<'static> {
        Interaction {
            line,
            user,
            item,
            timestamp,
        }
    }

    #[test]
    fn the_cut_follows_time_not_the_file_and_fresh_items_are_first_met_after_it() {
        let events = [
            ev(1, "u", "a", 5.0),
            ev(2, "u", "b", 1.0),
            ev(3, "v", "c", 2.0),
            ev(4, "v", "a", 2.0),
            ev(5, "w", "d", 9.0),
            ev(6, "w", "b", 7.0),
        ];
        let s = time_split(&events, 0.5);
        // In time order: b(1), c(2, line 3), a(2, line 4) | a(5), b(7), d(9).
        assert_eq!(s.train, [false, true, true, true, false, false]);
        assert_eq!(s.cut, Some(5.0));
        assert_eq!(s.fresh, ["d"]);
        let all = time_split(&events, 1.0);
        assert!(all.train.iter().all(|&t| t) && all.fresh.is_empty() && all.cut.is_none());
    }
}
