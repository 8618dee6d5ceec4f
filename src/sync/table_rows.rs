//! The current rows of one replica table, found by primary key.
//!
//! The view engine takes a change as "delete the old row, insert the new one", so the sync
//! server must know every current row. It keeps exactly the `Row`s it fed the engine (shared
//! with the engine's arrangements) in a hash table keyed by the row's own primary-key columns:
//! one pointer per row, no copy of the key beside it.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use zero_queries::{Row, Value};

/// The rows of one table by primary key.
pub(crate) struct TableRows {
    key_cols: Vec<usize>,
    state: RandomState,
    rows: HashTable<Row>,
}

fn hash_key<'a>(state: &RandomState, key: impl Iterator<Item = &'a Value>) -> u64 {
    let mut h = state.build_hasher();
    for v in key {
        v.hash(&mut h);
    }
    h.finish()
}

fn row_hash(state: &RandomState, key_cols: &[usize], row: &Row) -> u64 {
    let mut h = state.build_hasher();
    for &i in key_cols {
        row.get(i).hash(&mut h);
    }
    h.finish()
}

impl TableRows {
    /// An empty table whose primary key is the columns `key_cols`.
    pub(crate) fn new(key_cols: Vec<usize>, capacity: usize) -> Self {
        TableRows {
            key_cols,
            state: RandomState::new(),
            rows: HashTable::with_capacity(capacity),
        }
    }

    /// Stores `row`, returning the row with the same key it replaces. Keys compare as ZQL
    /// values, so a key written `1` in one place and `1.0` in another is one key.
    pub(crate) fn insert(&mut self, row: Row) -> Option<Row> {
        let TableRows {
            key_cols,
            state,
            rows,
        } = self;
        let hash = row_hash(state, key_cols, &row);
        match rows.entry(
            hash,
            |r| key_cols.iter().all(|&i| r.cmp_cols(i, &row, i).is_eq()),
            |r| row_hash(state, key_cols, r),
        ) {
            Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), row)),
            Entry::Vacant(e) => {
                e.insert(row);
                None
            }
        }
    }

    /// Removes and returns the row whose primary key is `key` (values in key-column order).
    pub(crate) fn remove(&mut self, key: &[Value]) -> Option<Row> {
        let hash = hash_key(&self.state, key.iter());
        let cols = &self.key_cols;
        self.rows
            .find_entry(hash, |r| {
                cols.iter().zip(key).all(|(&i, v)| r.cmp_col(i, v).is_eq())
            })
            .ok()
            .map(|e| e.remove().0)
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Every row, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vals: &[Value]) -> Row {
        Row::from(vals)
    }

    #[test]
    fn rows_are_found_replaced_and_removed_by_key() {
        let mut t = TableRows::new(vec![0, 1], 4);
        let a = row(&["x".into(), Value::Number(1.0), "first".into()]);
        let b = row(&["x".into(), Value::Number(2.0), "second".into()]);
        assert!(t.insert(a.clone()).is_none());
        assert!(t.insert(b.clone()).is_none());
        assert_eq!(t.len(), 2);
        // Same key, new contents: the old row comes back.
        let a2 = row(&["x".into(), Value::Number(1.0), "changed".into()]);
        assert_eq!(t.insert(a2.clone()), Some(a));
        assert_eq!(t.len(), 2);
        // `1` and `1.0` are one key; a key the table lacks removes nothing.
        assert_eq!(t.remove(&["x".into(), Value::from(1)]), Some(a2));
        assert_eq!(t.remove(&["x".into(), Value::Number(1.0)]), None);
        assert_eq!(t.remove(&["y".into(), Value::Number(2.0)]), None);
        assert_eq!(t.iter().cloned().collect::<Vec<_>>(), vec![b]);
    }
}
