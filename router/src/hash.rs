//! PostgreSQL-compatible 64-bit hashing.
//!
//! This module reimplements, from the algorithm, the "extended" (64-bit,
//! seeded) hash functions that PostgreSQL uses for hash partitioning and hash
//! indexes: `hash_bytes_extended` / `hash_bytes_uint32_extended` from
//! `src/common/hashfn.c` (Bob Jenkins' lookup3 mix as adapted by PostgreSQL)
//! and the per-type SQL wrappers `hashint2extended`, `hashint4extended`,
//! `hashint8extended`, `hashtextextended` and `uuid_hash_extended`.
//!
//! Guarantees:
//!
//! * Every function returns exactly the bits that the PostgreSQL function of
//!   the same name returns on a **little-endian** server (x86-64, aarch64),
//!   for every input and every seed. PostgreSQL's SQL functions return a signed
//!   `bigint`; here the result is a `u64` with the same bits, so
//!   `pg_value as u64 == ours` and `ours as i64 == pg_value`. (PostgreSQL reads
//!   the key in native byte order, so a big-endian server computes different
//!   values; hotrepart does not support big-endian shards for hash routing.)
//! * The seed is PostgreSQL's `bigint` seed argument, also taken as a `u64`
//!   with the same bits: to call the SQL function with seed `s`, pass
//!   `s as i64`. Seed 0 is special in PostgreSQL (and here): it does not
//!   perturb the state, so `hash…extended(x, 0)` has the same low 32 bits as
//!   the non-extended 32-bit `hash…(x)`.
//! * `hashtextextended` hashes the raw bytes of the string, which is what
//!   PostgreSQL does for deterministic collations (`C`, `POSIX`, libc
//!   collations, deterministic ICU collations). Columns with a
//!   nondeterministic collation hash a sort key instead and are not supported.
//! * Pure functions: no allocation, no panics, no global state.
//!
//! The values are pinned by fixtures printed by a real PostgreSQL 15 server
//! (see the tests at the bottom of this file).

/// Initial state of the lookup3 mix: the golden ratio plus PostgreSQL's
/// extra constant (`0x9e3779b9 + len + 3923095`).
const INIT: u32 = 0x9e37_79b9_u32.wrapping_add(3_923_095);

/// The three 32-bit lanes of the lookup3 state.
#[derive(Clone, Copy)]
struct State {
    a: u32,
    b: u32,
    c: u32,
}

impl State {
    /// Fresh state for a key of `len` bytes, perturbed by `seed` when it is
    /// non-zero. PostgreSQL treats the seed as a 12-byte chunk of data
    /// (high half, low half, four zero bytes) mixed in before the key.
    fn new(len: u32, seed: u64) -> Self {
        let init = INIT.wrapping_add(len);
        let mut s = State {
            a: init,
            b: init,
            c: init,
        };
        if seed != 0 {
            s.a = s.a.wrapping_add((seed >> 32) as u32);
            s.b = s.b.wrapping_add(seed as u32);
            s.mix();
        }
        s
    }

    /// lookup3 `mix()`: reversible mixing of three lanes.
    fn mix(&mut self) {
        let State { a, b, c } = self;
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);

        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);

        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);

        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);

        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);

        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }

    /// lookup3 `final()`: final avalanche of the three lanes.
    fn finish(&mut self) {
        let State { a, b, c } = self;
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
    }

    /// The 64-bit result of the extended functions: `b` high, `c` low.
    fn result64(&self) -> u64 {
        (u64::from(self.b) << 32) | u64::from(self.c)
    }
}

/// Little-endian 32-bit word from up to four bytes (missing bytes are zero).
///
/// This is what PostgreSQL's tail `switch` computes on a little-endian
/// machine, whether it takes the aligned (word load) or unaligned (byte by
/// byte) path.
fn le_word(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .take(4)
        .enumerate()
        .fold(0u32, |w, (i, &byte)| w | (u32::from(byte) << (8 * i)))
}

/// `hash_bytes_extended(k, keylen, seed)` / SQL `hash_any_extended`.
///
/// Returns PostgreSQL's `uint64` result. PostgreSQL's key length is an `int`;
/// keys longer than `u32::MAX` bytes (which PostgreSQL cannot store in one
/// datum anyway) are hashed with their length truncated to 32 bits, as the C
/// code would.
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let mut s = State::new(k.len() as u32, seed);

    let mut chunks = k.chunks_exact(12);
    for chunk in &mut chunks {
        s.a = s.a.wrapping_add(le_word(&chunk[0..4]));
        s.b = s.b.wrapping_add(le_word(&chunk[4..8]));
        s.c = s.c.wrapping_add(le_word(&chunk[8..12]));
        s.mix();
    }

    // The last 0..=11 bytes: a gets bytes 0..4, b bytes 4..8, and c bytes
    // 8..11 shifted up by one byte (lookup3 reserves c's lowest byte for the
    // length, which PostgreSQL already folded into the initial state).
    let tail = chunks.remainder();
    let (ta, rest) = tail.split_at(tail.len().min(4));
    let (tb, tc) = rest.split_at(rest.len().min(4));
    s.a = s.a.wrapping_add(le_word(ta));
    s.b = s.b.wrapping_add(le_word(tb));
    s.c = s.c.wrapping_add(le_word(tc) << 8);

    s.finish();
    s.result64()
}

/// `hash_bytes_uint32_extended(k, seed)` / SQL-level `hash_uint32_extended`:
/// the extended hash of one 32-bit integer (as used by the integer types).
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut s = State::new(4, seed);
    s.a = s.a.wrapping_add(k);
    s.finish();
    s.result64()
}

/// SQL `hashint8extended(v bigint, seed bigint)`.
///
/// Like `hashint8`, PostgreSQL folds the 64-bit value into 32 bits before
/// hashing, so that an `int8` that fits in an `int4` hashes like that `int4`
/// (cross-type hash joins and co-location rely on it): the low half is XORed
/// with the high half for non-negative values and with its complement for
/// negative ones (for small negative values the high half is all ones, so the
/// complement is zero and the low half survives unchanged).
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = if v >= 0 { lo ^ hi } else { lo ^ !hi };
    hash_uint32_extended(folded, seed)
}

/// SQL `hashint4extended(v integer, seed bigint)`.
pub fn hashint4extended(v: i32, seed: u64) -> u64 {
    hash_uint32_extended(v as u32, seed)
}

/// SQL `hashint2extended(v smallint, seed bigint)`: the value is widened to
/// `int4` (sign-extended) first, so it hashes like the same `int4`.
pub fn hashint2extended(v: i16, seed: u64) -> u64 {
    hash_uint32_extended(i32::from(v) as u32, seed)
}

/// SQL `hashtextextended(v text, seed bigint)` for a deterministic collation:
/// the hash of the string's bytes (no terminator, no varlena header).
///
/// The string is hashed as UTF-8, which is what a `UTF8` database stores. For
/// `bytea`-like or other-encoding data use [`hash_bytes_extended`] directly.
pub fn hashtextextended(v: &str, seed: u64) -> u64 {
    hash_bytes_extended(v.as_bytes(), seed)
}

/// SQL `uuid_hash_extended(v uuid, seed bigint)`: the hash of the 16 bytes of
/// the UUID in network (textual) order.
pub fn uuid_hash_extended(v: &[u8; 16], seed: u64) -> u64 {
    hash_bytes_extended(v, seed)
}

#[cfg(test)]
mod fixtures;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_word_pads_with_zeros() {
        assert_eq!(le_word(&[]), 0);
        assert_eq!(le_word(&[0x01]), 0x01);
        assert_eq!(le_word(&[0x01, 0x02, 0x03]), 0x0003_0201);
        assert_eq!(le_word(&[0x01, 0x02, 0x03, 0x04]), 0x0403_0201);
    }

    #[test]
    fn small_integers_hash_alike_across_widths() {
        // The property PostgreSQL designs for (and co-location relies on):
        // equal values of int2/int4/int8 hash equally.
        for seed in [0u64, 1, 42, u64::MAX, 0x8000_0000_0000_0000] {
            for v in [-32768i16, -1, 0, 1, 7, 32767] {
                let h2 = hashint2extended(v, seed);
                assert_eq!(h2, hashint4extended(i32::from(v), seed));
                assert_eq!(h2, hashint8extended(i64::from(v), seed));
            }
            for v in [i32::MIN, -65536, 65536, i32::MAX] {
                assert_eq!(
                    hashint4extended(v, seed),
                    hashint8extended(i64::from(v), seed)
                );
            }
        }
    }

    #[test]
    fn int4_hash_is_uint32_hash_of_bits() {
        assert_eq!(hashint4extended(-1, 5), hash_uint32_extended(u32::MAX, 5));
    }

    #[test]
    fn text_and_uuid_are_byte_hashes() {
        assert_eq!(hashtextextended("abc", 9), hash_bytes_extended(b"abc", 9));
        let u = [7u8; 16];
        assert_eq!(uuid_hash_extended(&u, 9), hash_bytes_extended(&u, 9));
    }

    #[test]
    fn int8_matches_postgres() {
        for &(v, seed, pg) in fixtures::INT8 {
            assert_eq!(
                hashint8extended(v, seed as u64) as i64,
                pg,
                "hashint8extended({v}, {seed})"
            );
        }
    }

    #[test]
    fn int4_matches_postgres() {
        for &(v, seed, pg) in fixtures::INT4 {
            assert_eq!(
                hashint4extended(v, seed as u64) as i64,
                pg,
                "hashint4extended({v}, {seed})"
            );
        }
    }

    #[test]
    fn int2_matches_postgres() {
        for &(v, seed, pg) in fixtures::INT2 {
            assert_eq!(
                hashint2extended(v, seed as u64) as i64,
                pg,
                "hashint2extended({v}, {seed})"
            );
        }
    }

    #[test]
    fn text_matches_postgres() {
        for &(v, seed, pg) in fixtures::TEXT {
            assert_eq!(
                hashtextextended(v, seed as u64) as i64,
                pg,
                "hashtextextended({v:?}, {seed})"
            );
        }
    }

    #[test]
    fn bytes_match_postgres() {
        // Every length 0..=40 exercises each tail case and 0..3 full blocks.
        for &(len, seed, pg) in fixtures::BYTES {
            let bytes: Vec<u8> = (0..len).map(fixtures::byte_at).collect();
            assert_eq!(
                hash_bytes_extended(&bytes, seed as u64) as i64,
                pg,
                "hash_bytes_extended(len {len}, {seed})"
            );
        }
    }

    #[test]
    fn uuid_matches_postgres() {
        for &(v, seed, pg) in fixtures::UUID {
            assert_eq!(
                uuid_hash_extended(&v, seed as u64) as i64,
                pg,
                "uuid_hash_extended({v:02x?}, {seed})"
            );
        }
    }
}
