//! The writer's cache of stream states: each stream's row id, epoch, last offset and
//! acknowledged marks, so that a batch assigns offsets and checks inbox limits without reading
//! the `streams` table back. Only the writer's thread touches it, so it needs no lock; its size
//! is bounded by the writer, which keeps the most recently used streams.

use std::collections::HashMap;

pub(super) struct StreamState {
    /// The stream's row in `streams`, which message rows refer to.
    pub(super) id: i64,
    pub(super) epoch: String,
    pub(super) last: u64,
    pub(super) acked: u64,
    /// Inboxes: the lowest device mark, if any device has one.
    pub(super) lowest_device_mark: Option<u64>,
    /// The last batch that touched the stream ([`Streams::batch`]).
    pub(super) used: u64,
}

impl StreamState {
    /// Entries at or below this were acknowledged by every reader (see the store contract).
    pub(super) fn floor(&self) -> u64 {
        self.lowest_device_mark
            .map_or(self.acked, |lowest| lowest.min(self.acked))
    }
}

/// The streams the writer has touched, by name. States sit in a vector so a batch can list the
/// ones it changed by index.
#[derive(Default)]
pub(super) struct Streams {
    pub(super) slots: HashMap<String, usize>,
    pub(super) states: Vec<StreamState>,
    /// Batches written so far: how recently a stream was used.
    pub(super) batch: u64,
}

impl Streams {
    pub(super) fn insert(&mut self, name: String, mut state: StreamState) -> usize {
        state.used = self.batch;
        let slot = self.states.len();
        self.states.push(state);
        self.slots.insert(name, slot);
        slot
    }

    /// Called between batches (slots are only held within one): keeps the `keep` most recently
    /// used streams, and drops states whose stream pruning removed.
    pub(super) fn keep_recent(&mut self, keep: usize) {
        let mut states: Vec<Option<StreamState>> = std::mem::take(&mut self.states)
            .into_iter()
            .map(Some)
            .collect();
        let mut named: Vec<(String, usize)> = self.slots.drain().collect();
        named.sort_unstable_by_key(|(_, slot)| {
            std::cmp::Reverse(states[*slot].as_ref().map_or(0, |state| state.used))
        });
        named.truncate(keep);
        for (name, slot) in named {
            if let Some(state) = states[slot].take() {
                let used = state.used;
                let slot = self.insert(name, state);
                self.states[slot].used = used;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: i64) -> StreamState {
        StreamState {
            id,
            epoch: String::new(),
            last: 0,
            acked: 0,
            lowest_device_mark: None,
            used: 0,
        }
    }

    #[test]
    fn past_its_bound_the_stream_cache_keeps_the_most_recently_used_streams() {
        let mut streams = Streams::default();
        for id in 0..10 {
            streams.batch += 1;
            streams.insert(format!("c/{id}"), state(id));
        }
        // A stream touched again is recent, whenever it was created.
        let first = streams.slots["c/0"];
        streams.states[first].used = streams.batch;
        streams.keep_recent(4);
        assert_eq!(streams.slots.len(), 4);
        assert_eq!(streams.states.len(), 4, "no state left without its name");
        let mut kept: Vec<i64> = streams
            .slots
            .values()
            .map(|slot| streams.states[*slot].id)
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, [0, 7, 8, 9]);
    }

    #[test]
    fn states_of_pruned_streams_go_with_the_next_trim() {
        let mut streams = Streams::default();
        for id in 0..3 {
            streams.insert(format!("c/{id}"), state(id));
        }
        streams.slots.remove("c/1");
        streams.keep_recent(10);
        assert_eq!(streams.states.len(), 2);
    }
}
