//! The layout of the shared indexes: differential's ordered-list batches, except that the
//! update times and diffs are allocated as they are pushed instead of up front.
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
use differential_dataflow::trace::implementations::ord_neu::{OrdValBatch, OrdValBuilder};
use differential_dataflow::trace::implementations::spine_fueled::Spine;
use differential_dataflow::trace::implementations::{BatchContainer, OffsetList};
use serde::{Deserialize, Serialize};

use crate::render::{Diff, Time};

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

/// Keys, values, times, diffs, offsets.
pub(crate) type LeanLayout<K, V> = (Vec<K>, Vec<V>, Grown<Time>, Grown<Diff>, OffsetList);
/// The batch of a shared index.
pub(crate) type LeanBatch<K, V> = OrdValBatch<LeanLayout<K, V>>;
/// The trace of a shared index.
pub(crate) type LeanSpine<K, V> = Spine<Rc<LeanBatch<K, V>>>;
/// The batcher that builds a shared index's batches.
pub(crate) type LeanBatcher<K, V> = MergeBatcher<
    ContainerChunker<Vec<((K, V), Time, Diff)>>,
    VecMerger<(K, V), Time, Diff>,
    OrdValBuilder<LeanLayout<K, V>, Vec<((K, V), Time, Diff)>>,
>;
