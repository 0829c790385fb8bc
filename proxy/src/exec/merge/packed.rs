//! Rows and grouping keys as a collecting merge holds them, compact:
//! a row is one allocation in the DataRow layout, its values read in
//! place ([`Packed`]); the grouping keys of every group sit end to end
//! in one buffer, found through a hash table of group numbers
//! ([`GroupIndex`]). A group of `GROUP BY b` with `count(*)` and
//! `sum(k)` costs about 100 bytes, where one heap value per column and
//! a key per group in a `HashMap` cost about a kilobyte (issue 15).

use bytes::Bytes;
use std::hash::BuildHasher;

/// Read access to the values of a row, by column (None: NULL, or no such
/// column).
pub(super) trait Cols {
    fn col(&self, i: usize) -> Option<&[u8]>;
}

impl Cols for [Option<Bytes>] {
    fn col(&self, i: usize) -> Option<&[u8]> {
        self.get(i)?.as_deref()
    }
}

impl Cols for Vec<Option<Bytes>> {
    fn col(&self, i: usize) -> Option<&[u8]> {
        self.as_slice().col(i)
    }
}

/// A row in the body layout of a DataRow: a 16-bit column count, then per
/// column a 32-bit length (-1: NULL) and the bytes; checked well-formed
/// when made. `B` is the received frame's body (`Bytes`, no copy) or a
/// held row's own allocation (`Box<[u8]>`).
#[derive(Clone, Debug)]
pub(super) struct Packed<B = Box<[u8]>>(B);

impl<B: AsRef<[u8]>> Packed<B> {
    /// A DataRow body; None when malformed (a negative count or length
    /// below -1, a value past the end). Bytes after the last value are
    /// ignored, as the row decoder does.
    pub(super) fn check(body: B) -> Option<Packed<B>> {
        let b = body.as_ref();
        let n = i16::from_be_bytes(b.get(..2)?.try_into().ok()?);
        if n < 0 {
            return None;
        }
        let mut at = 2usize;
        for _ in 0..n {
            let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            if len < -1 {
                return None;
            }
            if len >= 0 {
                at = at.checked_add(len as usize)?;
                if at > b.len() {
                    return None;
                }
            }
        }
        Some(Packed(body))
    }

    pub(super) fn len(&self) -> usize {
        self.0
            .as_ref()
            .get(..2)
            .map_or(0, |c| i16::from_be_bytes([c[0], c[1]]).max(0) as usize)
    }

    /// The values, in column order.
    pub(super) fn values(&self) -> Values<'_> {
        Values {
            b: self.0.as_ref().get(2..).unwrap_or(&[]),
            left: self.len(),
        }
    }

    /// The row as the merge's output takes it (values copied), from
    /// column `from` on.
    pub(super) fn to_row(&self, from: usize) -> Vec<Option<Bytes>> {
        self.values()
            .skip(from)
            .map(|v| v.map(Bytes::copy_from_slice))
            .collect()
    }

    /// The same row in its own allocation, to be held.
    pub(super) fn to_held(&self) -> Packed {
        Packed(self.0.as_ref().into())
    }

    /// Bytes the row costs held (its allocation and its slot).
    pub(super) fn held_bytes(&self) -> usize {
        self.0.as_ref().len() + std::mem::size_of::<Packed>()
    }
}

impl Packed {
    /// Packs values into a held row.
    pub(super) fn pack(vals: &[Option<&[u8]>]) -> Packed {
        let size = 2 + vals
            .iter()
            .map(|v| 4 + v.map_or(0, <[u8]>::len))
            .sum::<usize>();
        let mut b = Vec::with_capacity(size);
        b.extend_from_slice(&(vals.len() as i16).to_be_bytes());
        for v in vals {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        Packed(b.into_boxed_slice())
    }
}

impl<B: AsRef<[u8]>> Cols for Packed<B> {
    fn col(&self, i: usize) -> Option<&[u8]> {
        self.values().nth(i).flatten()
    }
}

/// The values of a [`Packed`] row.
pub(super) struct Values<'a> {
    b: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Values<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Checked when the row was made: a short row ends the values.
        let len = i32::from_be_bytes(self.b.get(..4)?.try_into().ok()?);
        self.b = self.b.get(4..)?;
        if len < 0 {
            return Some(None);
        }
        let (v, rest) = self.b.split_at_checked(len as usize)?;
        self.b = rest;
        Some(Some(v))
    }
}

/// The groups' keys end to end in one buffer and a hash table of group
/// numbers: no allocation per group.
#[derive(Default)]
pub(super) struct GroupIndex {
    table: hashbrown::HashTable<u32>,
    keys: Vec<u8>,
    /// `ends[g]`: where group `g`'s key ends in `keys`.
    ends: Vec<usize>,
    /// SipHash with a random key, as `std`'s maps: the keys are the
    /// shards' data, which clients may choose.
    hasher: std::collections::hash_map::RandomState,
}

impl GroupIndex {
    fn key(&self, g: u32) -> &[u8] {
        let g = g as usize;
        let start = if g == 0 { 0 } else { self.ends[g - 1] };
        &self.keys[start..self.ends[g]]
    }

    /// The group whose key is `key`: `(number, true)` when it is new
    /// (numbered in order of arrival from 0).
    pub(super) fn find_or_insert(&mut self, key: &[u8]) -> (u32, bool) {
        let hash = self.hasher.hash_one(key);
        if let Some(&g) = self.table.find(hash, |&g| self.key(g) == key) {
            return (g, false);
        }
        let g = self.ends.len() as u32;
        self.keys.extend_from_slice(key);
        self.ends.push(self.keys.len());
        let (keys, ends, hasher) = (&self.keys, &self.ends, &self.hasher);
        self.table.insert_unique(hash, g, |&g| {
            let g = g as usize;
            let start = if g == 0 { 0 } else { ends[g - 1] };
            hasher.hash_one(&keys[start..ends[g]])
        });
        (g, true)
    }

    /// Bytes a new group's key costs held (its bytes, its end and its
    /// table slot).
    pub(super) fn key_bytes(key: &[u8]) -> usize {
        key.len() + std::mem::size_of::<usize>() + 2 * std::mem::size_of::<u32>()
    }
}

/// Appends one value of a grouping key to `out` (a NULL and a value never
/// encode alike, nor two values of different lengths).
pub(super) fn put_key_part(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(vals: &[Option<&[u8]>]) -> Vec<u8> {
        Packed::pack(vals).0.into_vec()
    }

    #[test]
    fn a_packed_row_reads_back_its_values() {
        let vals: &[Option<&[u8]>] = &[Some(b"12"), None, Some(b""), Some(b"abc")];
        let p = Packed::pack(vals);
        assert_eq!(p.len(), 4);
        assert_eq!(p.values().collect::<Vec<_>>(), vals.to_vec());
        assert_eq!(p.col(3), Some(&b"abc"[..]));
        assert_eq!(p.col(1), None);
        assert_eq!(p.col(9), None);
        let checked = Packed::check(Bytes::from(body(vals))).map(|p| p.to_row(1));
        assert_eq!(
            checked,
            Some(vec![
                None,
                Some(Bytes::new()),
                Some(Bytes::from_static(b"abc"))
            ])
        );
    }

    #[test]
    fn malformed_rows_are_refused() {
        let good = body(&[Some(b"xy"), None]);
        for cut in 0..good.len() {
            assert!(Packed::check(&good[..cut]).is_none(), "cut at {cut}");
        }
        assert!(Packed::check(&good[..]).is_some());
        assert!(Packed::check(&[0xff, 0xff][..]).is_none(), "negative count");
        assert!(
            Packed::check(&[0, 1, 0xff, 0xff, 0xff, 0xfe][..]).is_none(),
            "length -2"
        );
        assert!(
            Packed::check(&[0, 1, 0x7f, 0xff, 0xff, 0xff][..]).is_none(),
            "length past the end"
        );
    }

    #[test]
    fn the_index_numbers_groups_in_order_and_finds_them_again() {
        let mut ix = GroupIndex::default();
        let mut keys = Vec::new();
        for i in 0..10_000u32 {
            let mut k = Vec::new();
            put_key_part(
                &mut k,
                (i % 7 != 0).then_some(&i.to_string().into_bytes()[..]),
            );
            keys.push(k);
        }
        for (i, k) in keys.iter().enumerate() {
            let (g, new) = ix.find_or_insert(k);
            // NULL keys (every 7th) are one group: the first.
            if i % 7 == 0 {
                assert_eq!((g, new), (0, i == 0));
            } else {
                assert!(new, "key {i} is new");
            }
        }
        for k in &keys {
            let (g, new) = ix.find_or_insert(k);
            assert!(!new);
            assert_eq!(ix.key(g), &k[..]);
        }
        // "1" then "2" is not "12".
        let (mut a, mut b) = (Vec::new(), Vec::new());
        put_key_part(&mut a, Some(b"1"));
        put_key_part(&mut a, Some(b"2"));
        put_key_part(&mut b, Some(b"12"));
        put_key_part(&mut b, Some(b""));
        assert_ne!(a, b);
    }
}
