//! Forms the batches of indexes built from a whole table at once (sorted indexes for top-k,
//! lookup indexes built on first use) with one plain sort instead of differential's merge sort.
//!
//! Such an index receives the table's rows (100,000 of them, say) in one version, while the
//! first query of a shape waits and every other client group with it. Differential's
//! `MergeBatcher` sorts that by comparing whole updates, and a sorted index's value compares
//! by decoding the ordering's columns of two rows scattered over the heap: about 2 million
//! such comparisons, and twice as many cache misses, for 100,000 rows (hundreds of
//! milliseconds). Here every update gets two 64-bit prefixes that order like its key and its
//! value ([`SortPrefix`]), the prefixes are sorted as integers, and rows are read only to
//! break ties between equal prefixes (rare for the timestamps and ids apps order by). The
//! batch is then laid out directly, telling values apart by their prefixes where they differ,
//! so rows are not read again to compare neighbours either.
//!
//! Later versions (a few changed rows each) go through the same path, where it costs what the
//! merge batcher did.

use std::cmp::Ordering;

use differential_dataflow::batcher::{Batcher, Extract};
use differential_dataflow::logging::Logger;
use differential_dataflow::trace::implementations::BatchContainer;
use differential_dataflow::trace::implementations::ord_neu::val_batch::OrdValStorage;
use differential_dataflow::trace::implementations::ord_neu::{Upds, Vals};
use timely::progress::Antichain;
use timely::progress::frontier::AntichainRef;
use zero_queries::Row;

use crate::lean::{BlockOffsets, Grown, KeyBytes, LeanBatch};
use crate::render::{Diff, Key, SortedRow, Time};

/// 64 bits that order like the value: `a < b` implies `a.sort_prefix() <= b.sort_prefix()`.
pub(crate) trait SortPrefix {
    fn sort_prefix(&self) -> u64;
}

impl SortPrefix for Key {
    fn sort_prefix(&self) -> u64 {
        Key::sort_prefix(self)
    }
}

impl SortPrefix for Row {
    fn sort_prefix(&self) -> u64 {
        if self.is_empty() {
            0
        } else {
            Row::sort_prefix(self, 0)
        }
    }
}

impl SortPrefix for SortedRow {
    fn sort_prefix(&self) -> u64 {
        // A sorted row orders by its first ordering column first; `desc` reverses it.
        match self.order.first() {
            Some(&(col, desc)) => {
                let p = self.row.sort_prefix(col);
                if desc { !p } else { p }
            }
            None => SortPrefix::sort_prefix(&self.row),
        }
    }
}

type Update<V> = ((Key, V), Time, Diff);

/// A batcher that keeps the updates it is given and sorts them when a batch is extracted.
pub(crate) struct SortBatcher<V> {
    pending: Vec<Update<V>>,
    lower: Antichain<Time>,
}

impl<V> SortBatcher<V> {
    /// The constructor `arrange_named` takes (no logging of its memory).
    pub(crate) fn new(_logger: Option<Logger>, _operator: usize) -> Self {
        SortBatcher {
            pending: Vec::new(),
            lower: Antichain::new(),
        }
    }
}

impl<V> Batcher<Vec<Update<V>>> for SortBatcher<V>
where
    V: SortPrefix + Ord + Clone + 'static,
{
    fn insert(&mut self, container: &mut Vec<Update<V>>) {
        if self.pending.is_empty() {
            std::mem::swap(&mut self.pending, container);
        } else {
            self.pending.append(container);
        }
    }
}

impl<V> Extract for SortBatcher<V>
where
    V: SortPrefix + Ord + Clone + 'static,
{
    type Time = Time;
    type Output = LeanBatch<V>;

    fn extract<'a>(
        &'a mut self,
        upper: AntichainRef<'_, Time>,
    ) -> (Option<LeanBatch<V>>, AntichainRef<'a, Time>) {
        // Times are totally ordered: `upper` is one time (or none, when the input closed).
        let mut ready = std::mem::take(&mut self.pending);
        if let Some(&bound) = upper.first()
            && ready.iter().any(|u| u.1 >= bound)
        {
            let (now, later) = ready.into_iter().partition(|u| u.1 < bound);
            ready = now;
            self.pending = later;
        }
        self.lower.clear();
        if let Some(t) = self.pending.iter().map(|u| u.1).min() {
            self.lower.insert(t);
        }
        (build(ready), self.lower.borrow())
    }
}

/// Sorts `updates` by `(key, value, time)`, consolidates them, and lays out the batch.
pub(crate) fn build<V>(updates: Vec<Update<V>>) -> Option<LeanBatch<V>>
where
    V: SortPrefix + Ord + Clone + 'static,
{
    if updates.is_empty() {
        return None;
    }
    let (sorted, prefixes) = sort(updates);
    let mut keys = KeyBytes::with_capacity(0);
    let mut vals: Vals<BlockOffsets, Vec<V>> = Vals::with_capacity(0, 0);
    let mut upds: Upds<BlockOffsets, Grown<Time>, Grown<Diff>> = Upds::with_capacity(0, 0);
    let mut total = 0usize;
    // The key and value whose updates are in `stash`; the key is pushed to `keys` with its
    // first value whose updates do not cancel out.
    let mut current: Option<(u64, Key, bool, u64, V)> = None;
    let mut stash: Vec<(Time, Diff)> = Vec::new();
    let mut flush = |current: Option<(u64, Key, bool, u64, V)>,
                     stash: &mut Vec<(Time, Diff)>,
                     keys: &mut KeyBytes,
                     vals: &mut Vals<BlockOffsets, Vec<V>>,
                     upds: &mut Upds<BlockOffsets, Grown<Time>, Grown<Diff>>|
     -> bool {
        let Some((_, key, pushed, _, val)) = current else {
            return false;
        };
        // `stash` is in time order: sum equal times, drop what cancels.
        let mut n = 0;
        for i in 0..stash.len() {
            if n > 0 && stash[n - 1].0 == stash[i].0 {
                stash[n - 1].1 += stash[i].1;
            } else {
                stash[n] = stash[i];
                n += 1;
            }
            if stash[n - 1].1 == 0 {
                n -= 1;
            }
        }
        stash.truncate(n);
        if stash.is_empty() {
            return pushed;
        }
        if !pushed {
            if !keys.is_empty() {
                vals.offs.push_own(&vals.vals.len());
            }
            keys.push_own(&key);
        }
        vals.vals.push(val);
        total += stash.len();
        // Differential's singleton encoding: one update equal to the previous value's last
        // is stored as an empty range.
        let singleton = stash.len() == 1
            && upds.times.0.last() == Some(&stash[0].0)
            && upds.diffs.0.last() == Some(&stash[0].1);
        if !singleton {
            for &(t, d) in stash.iter() {
                upds.times.0.push(t);
                upds.diffs.0.push(d);
            }
        }
        upds.offs.push_own(&upds.times.0.len());
        stash.clear();
        true
    };
    for (((k, v), t, d), (kp, vp)) in sorted.into_iter().zip(prefixes) {
        let (same_key, same_val) = match &current {
            Some((ckp, ck, _, cvp, cv)) => {
                let same_key = *ckp == kp && *ck == k;
                (same_key, same_key && *cvp == vp && *cv == v)
            }
            None => (false, false),
        };
        if same_val {
            stash.push((t, d));
            continue;
        }
        let prev = current.take();
        let prev_key = if same_key {
            prev.as_ref().map(|p| p.1.clone())
        } else {
            None
        };
        let pushed = flush(prev, &mut stash, &mut keys, &mut vals, &mut upds);
        current = Some(match (same_key, prev_key) {
            (true, Some(key)) => (kp, key, pushed, vp, v),
            _ => (kp, k, false, vp, v),
        });
        stash.push((t, d));
    }
    flush(current, &mut stash, &mut keys, &mut vals, &mut upds);
    if total == 0 {
        return None;
    }
    vals.offs.push_own(&vals.vals.len());
    Some(LeanBatch {
        storage: OrdValStorage { keys, vals, upds },
        updates: total,
    })
}

/// Distinct key prefixes [`sort`] remembers before it checks runs key by key instead.
const MAX_REMEMBERED_KEYS: usize = 1 << 12;

/// `updates` in `(key, value, time, diff)` order, with each one's key and value prefixes.
#[allow(clippy::type_complexity)]
fn sort<V>(updates: Vec<Update<V>>) -> (Vec<Update<V>>, Vec<(u64, u64)>)
where
    V: SortPrefix + Ord,
{
    // Whether two different keys share a prefix (only then must runs of equal key prefixes
    // be checked key by key). Checked here, in the updates' own order, where the keys are
    // read one after another instead of at random.
    // Many distinct keys (a lookup index) are checked per run instead of remembered here.
    let mut firsts: foldhash::HashMap<u64, usize> = foldhash::HashMap::default();
    let mut ambiguous = false;
    let mut order: Vec<(u64, u64, u32)> = Vec::with_capacity(updates.len());
    for (i, ((k, v), _, _)) in updates.iter().enumerate() {
        let kp = k.sort_prefix();
        if !ambiguous {
            let first = *firsts.entry(kp).or_insert(i);
            ambiguous = updates[first].0.0 != *k || firsts.len() > MAX_REMEMBERED_KEYS;
        }
        order.push((
            kp,
            v.sort_prefix(),
            u32::try_from(i).expect("fewer than 2^32 updates per batch"),
        ));
    }
    drop(firsts);
    order.sort_unstable();
    let at = |i: u32| &updates[i as usize];
    let full = |a: &(u64, u64, u32), b: &(u64, u64, u32)| -> Ordering {
        let (x, y) = (at(a.2), at(b.2));
        (x.0.0.cmp(&y.0.0))
            .then(a.1.cmp(&b.1))
            .then_with(|| x.0.1.cmp(&y.0.1))
            .then_with(|| (x.1, x.2).cmp(&(y.1, y.2)))
    };
    // Equal prefixes say nothing: order each run of them by the updates themselves.
    let mut s = 0;
    while s < order.len() {
        let e = run_end(&order, s, |o| o.0);
        if e - s > 1 {
            let k0 = &at(order[s].2).0.0;
            if !ambiguous || order[s + 1..e].iter().all(|o| at(o.2).0.0 == *k0) {
                let mut a = s;
                while a < e {
                    let b = run_end(&order[..e], a, |o| o.1);
                    if b - a > 1 {
                        order[a..b].sort_unstable_by(&full);
                    }
                    a = b;
                }
            } else {
                order[s..e].sort_unstable_by(&full);
            }
        }
        s = e;
    }
    let prefixes = order.iter().map(|o| (o.0, o.1)).collect();
    let mut src: Vec<u32> = order.into_iter().map(|o| o.2).collect();
    let mut updates = updates;
    permute(&mut updates, &mut src);
    (updates, prefixes)
}

/// Puts `xs[src[i]]` at `i` for every `i`, in place (one swap per moved element; `src` is
/// used up as the marks of where the cycles have been).
fn permute<T>(xs: &mut [T], src: &mut [u32]) {
    for start in 0..xs.len() {
        let mut at = start;
        loop {
            let from = src[at] as usize;
            src[at] = at as u32;
            if from == start || from == at {
                break;
            }
            xs.swap(at, from);
            at = from;
        }
    }
}

/// The end of the run starting at `start` whose elements agree on `f`.
fn run_end<T, F: Fn(&T) -> u64>(xs: &[T], start: usize, f: F) -> usize {
    let first = f(&xs[start]);
    let mut end = start + 1;
    while end < xs.len() && f(&xs[end]) == first {
        end += 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use differential_dataflow::trace::implementations::ord_neu::OrdValBuilder;
    use differential_dataflow::trace::{Builder, Cursor, Navigable};
    use zero_queries::Value;

    use super::*;
    use crate::lean::LeanLayout;

    type Upd = Update<SortedRow>;

    fn sorted_row(order: &Arc<Vec<(usize, bool)>>, row: Row) -> SortedRow {
        SortedRow {
            order: Arc::clone(order),
            row,
        }
    }

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// The batch's contents as `(key, row, time, diff)`, in cursor order.
    fn contents(batch: &LeanBatch<SortedRow>) -> Vec<(Key, Row, Time, Diff)> {
        let mut out = Vec::new();
        let mut c = batch.cursor();
        while c.key_valid(batch) {
            while c.val_valid(batch) {
                let (k, v) = (c.key(batch).to_key(), c.val(batch).row.clone());
                c.map_times(batch, |t, d| out.push((k.clone(), v.clone(), *t, *d)));
                c.step_val(batch);
            }
            c.step_key(batch);
        }
        out
    }

    /// What differential's own builder makes of the same updates, sorted and consolidated.
    fn reference(mut updates: Vec<Upd>) -> Vec<(Key, Row, Time, Diff)> {
        differential_dataflow::consolidation::consolidate_updates(&mut updates);
        let mut b = OrdValBuilder::<LeanLayout<SortedRow>, Vec<Upd>>::default();
        b.push(&mut updates);
        b.done().map(|batch| contents(&batch)).unwrap_or_default()
    }

    #[test]
    fn batches_equal_differentials_for_random_updates() {
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        // Orderings by a number (ties and nulls), by a string sharing long prefixes, desc.
        let orders = [
            Arc::new(vec![(1, true), (0, false)]),
            Arc::new(vec![(2, false), (0, false)]),
            Arc::new(vec![(0, false)]),
        ];
        for case in 0..60 {
            let order = &orders[case % orders.len()];
            let n = [1, 2, 7, 100, 2000][case % 5];
            let mut updates: Vec<Upd> = Vec::new();
            for _ in 0..n {
                let id = rng(&mut seed) % (n as u64 / 2 + 1);
                let num = match rng(&mut seed) % 5 {
                    0 => Value::Null,
                    _ => Value::Number((rng(&mut seed) % 50) as f64 * 1e9),
                };
                let text = Value::from(format!("prefix-shared-{}", rng(&mut seed) % 9));
                let row = Row::from(vec![Value::from(format!("i{id}")), num, text]);
                let key: Key = match case % 3 {
                    0 => Key::new(),
                    1 => Key::from(Value::Bool(rng(&mut seed).is_multiple_of(2))),
                    _ => Key::from(Value::from(format!("a-long-key-that-spills-{}", id % 3))),
                };
                let time = rng(&mut seed) % 3;
                let diff = [1, -1, 2][(rng(&mut seed) % 3) as usize];
                updates.push(((key, sorted_row(order, row)), time, diff));
                if rng(&mut seed).is_multiple_of(4) {
                    // An update that cancels an earlier one out.
                    let mut again =
                        updates[(rng(&mut seed) % updates.len() as u64) as usize].clone();
                    again.2 = -again.2;
                    updates.push(again);
                }
            }
            let expected = reference(updates.clone());
            let got = build(updates).map(|b| contents(&b)).unwrap_or_default();
            assert_eq!(got.len(), expected.len(), "case {case}");
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    g.0 == e.0 && g.1 == e.1 && g.2 == e.2 && g.3 == e.3,
                    "case {case}: {g:?} vs {e:?}"
                );
            }
        }
    }

    #[test]
    fn extract_keeps_updates_at_or_after_the_upper() {
        let order = Arc::new(vec![(0, false)]);
        let row = |s: &str| sorted_row(&order, Row::from(vec![Value::from(s)]));
        let mut b: SortBatcher<SortedRow> = SortBatcher::new(None, 0);
        let mut input = vec![
            ((Key::new(), row("b")), 1, 1),
            ((Key::new(), row("a")), 2, 1),
            ((Key::new(), row("c")), 1, 1),
        ];
        b.insert(&mut input);
        let (batch, lower) = b.extract(AntichainRef::new(&[2]));
        assert_eq!(lower.to_vec(), vec![2]);
        let rows: Vec<Row> = contents(&batch.expect("two updates before 2"))
            .into_iter()
            .map(|c| c.1)
            .collect();
        assert_eq!(rows, vec![row("b").row, row("c").row]);
        let (batch, lower) = b.extract(AntichainRef::new(&[]));
        assert!(lower.is_empty());
        assert_eq!(contents(&batch.expect("the rest")).len(), 1);
        let (batch, _) = b.extract(AntichainRef::new(&[]));
        assert!(batch.is_none());
    }
}
