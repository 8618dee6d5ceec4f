//! The layout of the shared indexes: differential's ordered-list batches, except that the
//! update times and diffs are allocated as they are pushed instead of up front, and offsets
//! are stored in blocks that keep a regular run as two numbers.
//!
//! Differential's builder reserves room for one `(time, diff)` per update, but after a table
//! loads at one version every update is the same `(version, +1)` and the batch stores it once
//! (the "singleton" encoding), so the reservation was 16 unused bytes per row per index, about
//! a fifth of the engine's memory, held until the batch is next merged (which, for the large
//! batch a table loads into, may be never).

use std::rc::Rc;

use differential_dataflow::batcher::merge::MergeBatcher;
use differential_dataflow::batcher::merge::chunker::ContainerChunker;
use differential_dataflow::batcher::merge::vec::VecMerger;
use differential_dataflow::trace::implementations::BatchContainer;
use differential_dataflow::trace::implementations::ord_neu::{OrdValBatch, OrdValBuilder};
use differential_dataflow::trace::implementations::spine_fueled::Spine;
use serde::{Deserialize, Serialize};

use timely::container::PushInto;
use zero_queries::RowKeyRef;

use crate::render::{Diff, Key, Time};

/// A vector that ignores capacity hints: it grows as items are pushed.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Grown<T>(pub(crate) Vec<T>);

impl<T: Ord + Clone + 'static> BatchContainer for Grown<T> {
    type Owned = T;
    type ReadItem<'a> = &'a T;

    #[inline(always)]
    fn into_owned<'a>(item: Self::ReadItem<'a>) -> Self::Owned {
        item.clone()
    }
    #[inline(always)]
    fn clone_onto<'a>(item: Self::ReadItem<'a>, other: &mut Self::Owned) {
        other.clone_from(item);
    }
    fn reborrow<'b, 'a: 'b>(item: Self::ReadItem<'a>) -> Self::ReadItem<'b> {
        item
    }
    fn push_ref(&mut self, item: Self::ReadItem<'_>) {
        self.0.push(item.clone());
    }
    fn push_own(&mut self, item: &Self::Owned) {
        self.0.push(item.clone());
    }
    fn clear(&mut self) {
        self.0.clear();
    }
    fn with_capacity(_size: usize) -> Self {
        Grown(Vec::new())
    }
    fn merge_capacity(_cont1: &Self, _cont2: &Self) -> Self {
        Grown(Vec::new())
    }
    #[inline(always)]
    fn index(&self, index: usize) -> Self::ReadItem<'_> {
        &self.0[index]
    }
    #[inline(always)]
    fn get(&self, index: usize) -> Option<Self::ReadItem<'_>> {
        self.0.get(index)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Offsets per block.
const BLOCK: usize = 64;

/// How a full block of offsets is stored.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `base + stride * j`.
    Affine { stride: u32 },
    /// `base + narrow[at + j]`.
    Narrow { at: u32 },
    /// `wide[at + j]` (a block whose offsets span more than `u32`).
    Wide { at: u32 },
}

/// The offsets of a batch (where each key's values, and each value's updates, start), in
/// blocks of 64 that are stored as `base + stride * j` when they are that regular. After a
/// table loads, every value's updates are the singleton `(version, +1)` (an offset that does
/// not move) and a primary-key index has one value per key (an offset that moves by one), so
/// those offsets, 4 bytes per row per index in differential's list, cost next to nothing;
/// irregular blocks cost what the list did.
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockOffsets {
    /// Full blocks: the first offset and how the rest are stored.
    blocks: Vec<(u64, Kind)>,
    narrow: Vec<u32>,
    wide: Vec<u64>,
    /// The last, partial block.
    tail: Vec<u64>,
}

impl BlockOffsets {
    fn push(&mut self, offset: usize) {
        self.tail.push(offset as u64);
        if self.tail.len() == BLOCK {
            self.seal_block();
        }
    }

    fn seal_block(&mut self) {
        let base = self.tail[0];
        let stride = self.tail[1].wrapping_sub(base);
        let affine = u32::try_from(stride).ok().filter(|&s| {
            self.tail
                .iter()
                .enumerate()
                .all(|(j, &o)| o == base + u64::from(s) * j as u64)
        });
        let kind = if let Some(stride) = affine {
            Kind::Affine { stride }
        } else if let Ok(deltas) = self
            .tail
            .iter()
            .map(|&o| u32::try_from(o.wrapping_sub(base)))
            .collect::<Result<Vec<u32>, _>>()
        {
            let at = self.narrow.len() as u32;
            self.narrow.extend(deltas);
            Kind::Narrow { at }
        } else {
            let at = self.wide.len() as u32;
            self.wide.extend_from_slice(&self.tail);
            Kind::Wide { at }
        };
        self.blocks.push((base, kind));
        self.tail.clear();
    }

    fn get_offset(&self, index: usize) -> usize {
        let (b, j) = (index / BLOCK, index % BLOCK);
        let v = match self.blocks.get(b) {
            None => self.tail[j],
            Some(&(base, Kind::Affine { stride })) => base + u64::from(stride) * j as u64,
            Some(&(base, Kind::Narrow { at })) => base + u64::from(self.narrow[at as usize + j]),
            Some(&(_, Kind::Wide { at })) => self.wide[at as usize + j],
        };
        v as usize
    }

    /// Bytes held, for [`crate::engine::IndexStats`].
    pub(crate) fn heap_bytes(&self) -> usize {
        self.blocks.capacity() * std::mem::size_of::<(u64, Kind)>()
            + self.narrow.capacity() * 4
            + (self.wide.capacity() + self.tail.capacity()) * 8
    }
}

impl BatchContainer for BlockOffsets {
    type Owned = usize;
    type ReadItem<'a> = usize;

    #[inline(always)]
    fn into_owned<'a>(item: Self::ReadItem<'a>) -> Self::Owned {
        item
    }
    #[inline(always)]
    fn reborrow<'b, 'a: 'b>(item: Self::ReadItem<'a>) -> Self::ReadItem<'b> {
        item
    }
    fn push_ref(&mut self, item: Self::ReadItem<'_>) {
        self.push(item);
    }
    fn push_own(&mut self, item: &Self::Owned) {
        self.push(*item);
    }
    fn clear(&mut self) {
        *self = BlockOffsets::default();
    }
    fn with_capacity(_size: usize) -> Self {
        BlockOffsets::default()
    }
    fn merge_capacity(_cont1: &Self, _cont2: &Self) -> Self {
        BlockOffsets::default()
    }
    #[inline(always)]
    fn index(&self, index: usize) -> Self::ReadItem<'_> {
        self.get_offset(index)
    }
    fn len(&self) -> usize {
        self.blocks.len() * BLOCK + self.tail.len()
    }
}

/// The keys of a batch: their encodings back to back, and where each ends. An index key is
/// most often one short id (8–12 encoded bytes), so this holds about half of what a list of
/// 24-byte [`Key`]s did; the primary-key index of a table has one key per row.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyBytes {
    bytes: Vec<u8>,
    /// Where each key ends in `bytes` (it starts where the one before ends).
    ends: BlockOffsets,
}

impl KeyBytes {
    fn push_encoded(&mut self, key: &[u8]) {
        if self.bytes.capacity() - self.bytes.len() < key.len() {
            // Grow by an eighth, not double: a batch's keys are never shrunk, and the large
            // batch a table loads into is kept for as long as the engine runs.
            let grow = (self.bytes.len() / 8).max(key.len()).max(64);
            self.bytes.reserve_exact(grow);
        }
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len());
    }

    /// Bytes held, for [`crate::engine::IndexStats`].
    pub(crate) fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.heap_bytes()
    }
}

impl PushInto<Key> for KeyBytes {
    fn push_into(&mut self, key: Key) {
        self.push_encoded(key.as_key_ref().encoded());
    }
}

impl BatchContainer for KeyBytes {
    type Owned = Key;
    type ReadItem<'a> = RowKeyRef<'a>;

    #[inline(always)]
    fn into_owned<'a>(item: Self::ReadItem<'a>) -> Self::Owned {
        item.to_key()
    }
    #[inline(always)]
    fn reborrow<'b, 'a: 'b>(item: Self::ReadItem<'a>) -> Self::ReadItem<'b> {
        item
    }
    fn push_ref(&mut self, item: Self::ReadItem<'_>) {
        self.push_encoded(item.encoded());
    }
    fn push_own(&mut self, item: &Self::Owned) {
        self.push_encoded(item.as_key_ref().encoded());
    }
    fn clear(&mut self) {
        *self = KeyBytes::default();
    }
    fn with_capacity(_size: usize) -> Self {
        KeyBytes::default()
    }
    fn merge_capacity(_cont1: &Self, _cont2: &Self) -> Self {
        KeyBytes::default()
    }
    #[inline(always)]
    fn index(&self, index: usize) -> Self::ReadItem<'_> {
        let start = if index == 0 {
            0
        } else {
            self.ends.get_offset(index - 1)
        };
        RowKeyRef::from_encoded(&self.bytes[start..self.ends.get_offset(index)])
    }
    fn len(&self) -> usize {
        self.ends.len()
    }
}

/// Keys, values, times, diffs, offsets.
pub(crate) type LeanLayout<V> = (KeyBytes, Vec<V>, Grown<Time>, Grown<Diff>, BlockOffsets);
/// The batch of a shared index.
pub(crate) type LeanBatch<V> = OrdValBatch<LeanLayout<V>>;
/// The trace of a shared index.
pub(crate) type LeanSpine<V> = Spine<Rc<LeanBatch<V>>>;
/// The batcher that builds a shared index's batches.
pub(crate) type LeanBatcher<V> = MergeBatcher<
    ContainerChunker<Vec<((Key, V), Time, Diff)>>,
    VecMerger<(Key, V), Time, Diff>,
    OrdValBuilder<LeanLayout<V>, Vec<((Key, V), Time, Diff)>>,
>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_read_back_keys_that_order_and_hash_like_the_owned_ones() {
        use std::hash::{BuildHasher, RandomState};
        use zero_queries::Value;
        let mut keys: Vec<Key> = vec![
            Key::new(),
            Key::from(Value::Null),
            Key::from(Value::Number(-3.5)),
            Key::from(Value::Number(12.0)),
            Key::from(Value::String("c123456".into())),
            Key::from(Value::String("x".repeat(300).into())),
            Key::from(vec![Value::String("l1".into()), Value::String("i9".into())]),
            Key::from(vec![Value::Bool(true), Value::Number(1e15)]),
        ];
        for i in 0..200 {
            keys.push(Key::from(Value::String(format!("i{i}").into())));
        }
        let mut c = KeyBytes::with_capacity(0);
        for k in &keys {
            c.push_own(k);
        }
        assert_eq!(c.len(), keys.len());
        let hasher = RandomState::new();
        for (i, a) in keys.iter().enumerate() {
            let r = c.index(i);
            assert_eq!(KeyBytes::into_owned(r), *a);
            assert!(r == a);
            assert_eq!(hasher.hash_one(r), hasher.hash_one(a));
            for (j, b) in keys.iter().enumerate() {
                assert_eq!(r.cmp(&c.index(j)), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
        // Copying between containers (what merging batches does) keeps every key.
        let mut d = KeyBytes::with_capacity(0);
        for i in 0..c.len() {
            d.push_ref(c.index(i));
        }
        assert!((0..c.len()).all(|i| d.index(i) == c.index(i)));
        assert!(c.heap_bytes() < keys.len() * std::mem::size_of::<Key>());
    }

    #[test]
    fn block_offsets_read_back_what_was_pushed() {
        // Singleton updates (0, 1, 1, ...), one value per key (0, 1, 2, ...), irregular
        // offsets, and offsets beyond u32, each across several blocks and a partial one.
        let cases: Vec<Vec<usize>> = vec![
            std::iter::once(0)
                .chain(std::iter::repeat_n(1, 300))
                .collect(),
            (0..300).collect(),
            (0..300).map(|i| i * i / 7).collect(),
            (0..200).map(|i| (1usize << 33) + i * 3 + i % 2).collect(),
            (0..200)
                .map(|i| if i < 100 { i } else { (1usize << 33) + i })
                .collect(),
        ];
        for offs in cases {
            let mut c = BlockOffsets::with_capacity(0);
            for &o in &offs {
                c.push_own(&o);
                assert_eq!(c.index(c.len() - 1), o);
            }
            assert_eq!(c.len(), offs.len());
            let back: Vec<usize> = (0..c.len()).map(|i| c.index(i)).collect();
            assert_eq!(back, offs);
        }
        let mut regular = BlockOffsets::default();
        for i in 0..6400 {
            regular.push(i);
        }
        assert!(regular.heap_bytes() < 6400, "{}", regular.heap_bytes());
    }
}
