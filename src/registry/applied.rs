//! Which catalogue events an item has seen: what makes a replay a replay.
//!
//! Kafka orders a topic's records within a partition only. The catalogue is
//! meant to be keyed by item id, so that all of an item's events share one
//! partition and arrive in order; then an event at or before the last one
//! applied from that partition is a replay. A producer that keys otherwise
//! (no key, a random one) spreads an item over several partitions, whose
//! offsets say nothing about each other: comparing an offset of one with the
//! last offset of another would take a later retire for a replay and drop
//! it. So each item keeps the last offset applied from *each* partition that
//! has carried it, and an event is a replay only if its own partition has
//! been applied past it. Events of one item on two partitions are applied in
//! the order they are read, the only order there is.

/// Where a catalogue event was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

impl Position {
    pub fn new(partition: u32, offset: u64) -> Position {
        Position { partition, offset }
    }
}

/// The last event applied to an item from each partition that has carried
/// its events, the most recently applied last; empty for a reserved item no
/// event has touched yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied(Vec<Position>);

impl Applied {
    pub fn at(position: Position) -> Applied {
        Applied(vec![position])
    }

    /// Whether the event at `position` was applied already.
    pub fn replays(&self, position: Position) -> bool {
        self.0
            .iter()
            .any(|p| p.partition == position.partition && position.offset <= p.offset)
    }

    /// Records the event at `position` as the item's most recent.
    pub fn record(&mut self, position: Position) {
        self.0.retain(|p| p.partition != position.partition);
        self.0.push(position);
    }

    /// The most recently applied event.
    pub fn last(&self) -> Option<Position> {
        self.0.last().copied()
    }

    /// The partitions that have carried the item's events.
    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().map(|p| p.partition)
    }

    /// Whether more than one partition has carried the item's events: the
    /// catalogue is not keyed by item id.
    pub fn spread(&self) -> bool {
        self.0.len() > 1
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn positions(&self) -> &[Position] {
        &self.0
    }

    pub(super) fn from_positions(positions: Vec<Position>) -> Applied {
        Applied(positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_is_judged_within_its_own_partition() {
        let mut a = Applied::at(Position::new(0, 50));
        assert!(a.replays(Position::new(0, 50)));
        assert!(a.replays(Position::new(0, 3)));
        assert!(!a.replays(Position::new(0, 51)));
        // A lower offset of another partition is a later event, not a replay.
        assert!(!a.replays(Position::new(1, 3)));
        a.record(Position::new(1, 3));
        assert_eq!(a.last(), Some(Position::new(1, 3)));
        assert!(a.spread());
        assert_eq!(a.partitions().collect::<Vec<_>>(), [0, 1]);
        // Both partitions' events stay replays once applied.
        assert!(a.replays(Position::new(0, 50)));
        assert!(a.replays(Position::new(1, 2)));
        a.record(Position::new(0, 60));
        assert_eq!(a.positions(), [Position::new(1, 3), Position::new(0, 60)]);
        assert_eq!(a.last(), Some(Position::new(0, 60)));
    }
}
