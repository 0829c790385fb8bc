//! A hotrepart routing function in Rust (ABI v1, `docs/WASM_ABI.md`):
//! PostgreSQL's extended hash with seed 0 — `hashint2/4/8extended`,
//! `hashtextextended`, `uuid_hash_extended` — so its points equal those of
//! the built-in `pg_hash(seed=0)` routing function. A starting point for
//! functions that need more than WAT: copy it, change `route`.
//!
//! No imports: `no_std`, no allocator, panics abort (a trap).

#![no_std]

/// The key buffer the host writes into (keys up to 64 KiB, the host's
/// default limit).
static mut KEY: [u8; 65536] = [0; 65536];

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

#[no_mangle]
pub extern "C" fn hr_abi_version() -> i32 {
    1
}

#[no_mangle]
pub extern "C" fn hr_alloc(len: i32) -> i32 {
    if len < 0 || len as usize > 65536 {
        return -1;
    }
    // Only the address is taken; wasm32 addresses fit in i32.
    core::ptr::addr_of_mut!(KEY) as i32
}

#[no_mangle]
pub extern "C" fn hr_route(type_oid: i32, ptr: i32, len: i32) -> i64 {
    // SAFETY: the host wrote `len` bytes at the `ptr` hr_alloc returned.
    let key = unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, len as usize) };
    route(type_oid, key) as i64
}

fn route(type_oid: i32, key: &[u8]) -> u64 {
    match (type_oid, key.len()) {
        // int8: fold to 32 bits as PostgreSQL does
        (20, 8) => {
            let v = i64::from_be_bytes(key.try_into().unwrap_or([0; 8]));
            let (lo, hi) = (v as u32, (v >> 32) as u32);
            hash_u32(if v >= 0 { lo ^ hi } else { lo ^ !hi })
        }
        (23, 4) => hash_u32(i32::from_be_bytes(key.try_into().unwrap_or([0; 4])) as u32),
        (21, 2) => {
            hash_u32(i32::from(i16::from_be_bytes(key.try_into().unwrap_or([0; 2]))) as u32)
        }
        (25, _) | (2950, 16) => hash_bytes(key),
        _ => core::arch::wasm32::unreachable(),
    }
}

// PostgreSQL's hash_bytes_extended / hash_bytes_uint32_extended (lookup3),
// seed 0, little-endian; see router/src/hash.rs for the annotated version.

struct State {
    a: u32,
    b: u32,
    c: u32,
}

impl State {
    fn new(len: u32) -> State {
        let init = 0x9e37_79b9_u32.wrapping_add(3_923_095).wrapping_add(len);
        State { a: init, b: init, c: init }
    }

    fn mix(&mut self) {
        let State { a, b, c } = self;
        *a = a.wrapping_sub(*c); *a ^= c.rotate_left(4); *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a); *b ^= a.rotate_left(6); *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b); *c ^= b.rotate_left(8); *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c); *a ^= c.rotate_left(16); *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a); *b ^= a.rotate_left(19); *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b); *c ^= b.rotate_left(4); *b = b.wrapping_add(*a);
    }

    fn finish(&mut self) -> u64 {
        let State { a, b, c } = self;
        *c ^= *b; *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c; *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a; *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b; *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c; *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a; *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b; *c = c.wrapping_sub(b.rotate_left(24));
        (u64::from(*b) << 32) | u64::from(*c)
    }
}

fn le_word(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .take(4)
        .enumerate()
        .fold(0, |w, (i, &byte)| w | (u32::from(byte) << (8 * i)))
}

fn hash_u32(k: u32) -> u64 {
    let mut s = State::new(4);
    s.a = s.a.wrapping_add(k);
    s.finish()
}

fn hash_bytes(k: &[u8]) -> u64 {
    let mut s = State::new(k.len() as u32);
    let mut chunks = k.chunks_exact(12);
    for chunk in &mut chunks {
        s.a = s.a.wrapping_add(le_word(&chunk[0..4]));
        s.b = s.b.wrapping_add(le_word(&chunk[4..8]));
        s.c = s.c.wrapping_add(le_word(&chunk[8..12]));
        s.mix();
    }
    let tail = chunks.remainder();
    let (ta, rest) = tail.split_at(tail.len().min(4));
    let (tb, tc) = rest.split_at(rest.len().min(4));
    s.a = s.a.wrapping_add(le_word(ta));
    s.b = s.b.wrapping_add(le_word(tb));
    s.c = s.c.wrapping_add(le_word(tc) << 8);
    s.finish()
}
