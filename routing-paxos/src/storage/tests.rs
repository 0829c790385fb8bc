use std::sync::atomic::{AtomicU64, Ordering};

use omnipaxos::ballot_leader_election::Ballot;

use super::*;
use crate::command::CatalogCommand;
use crate::entry::ProposalId;

/// A directory removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hotrepart-storage-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entry(seq: u64) -> CatalogEntry {
    CatalogEntry {
        id: ProposalId {
            node: 1,
            incarnation: 1,
            seq,
        },
        cmd: CatalogCommand::DeclareReference {
            table: format!("t{seq}"),
        },
    }
}

fn ballot(n: u32) -> Ballot {
    Ballot {
        n,
        priority: 0,
        pid: 2,
        config_id: 1,
    }
}

fn fill(s: &mut SharedStorage) {
    assert_eq!(s.next_incarnation().expect("incarnation"), 1);
    s.write_atomically(vec![
        StorageOp::SetPromise(ballot(3)),
        StorageOp::SetAcceptedRound(ballot(3)),
        StorageOp::AppendEntries(vec![entry(1), entry(2)]),
    ])
    .expect("batch");
    s.append_entry(entry(3)).expect("append");
    s.append_on_prefix(2, vec![entry(4)])
        .expect("append on prefix");
    s.set_decided_idx(2).expect("decided");
}

fn check(s: &SharedStorage) {
    assert_eq!(s.get_log_len().expect("len"), 3);
    assert_eq!(
        s.get_suffix(0).expect("suffix"),
        vec![entry(1), entry(2), entry(4)]
    );
    assert_eq!(s.get_promise().expect("promise"), Some(ballot(3)));
    assert_eq!(s.get_accepted_round().expect("acc"), Some(ballot(3)));
    assert_eq!(s.get_decided_idx().expect("decided"), 2);
}

#[test]
fn reopen_replays_everything() {
    let dir = TempDir::new("reopen");
    let mut s = SharedStorage::open(&dir.0).expect("open");
    assert!(s.is_durable());
    fill(&mut s);
    check(&s);
    drop(s);
    let s = SharedStorage::open(&dir.0).expect("reopen");
    check(&s);
    assert_eq!(s.next_incarnation().expect("incarnation"), 2);
    drop(s);
    let s = SharedStorage::open(&dir.0).expect("reopen");
    assert_eq!(s.next_incarnation().expect("incarnation"), 3);
}

#[test]
fn compaction_keeps_the_state() {
    let dir = TempDir::new("compact");
    let mut s = SharedStorage::open(&dir.0).expect("open");
    fill(&mut s);
    let before = std::fs::metadata(dir.0.join(FILE)).expect("stat").len();
    s.compact().expect("compact");
    let after = std::fs::metadata(dir.0.join(FILE)).expect("stat").len();
    assert!(after < before, "{after} < {before}");
    s.set_decided_idx(3).expect("write after compaction");
    drop(s);
    let s = SharedStorage::open(&dir.0).expect("reopen");
    assert_eq!(s.get_decided_idx().expect("decided"), 3);
    assert_eq!(s.get_log_len().expect("len"), 3);
    assert_eq!(s.next_incarnation().expect("incarnation"), 2);
    assert!(!dir.0.join(TMP).exists());
}

#[test]
fn automatic_compaction_bounds_the_file() {
    let dir = TempDir::new("auto");
    let mut s = SharedStorage::open(&dir.0).expect("open");
    for i in 0..2_000 {
        s.set_decided_idx(i).expect("write");
    }
    let len = std::fs::metadata(dir.0.join(FILE)).expect("stat").len();
    assert!(len < 2 * COMPACT_SLACK + 4096, "journal is {len} bytes");
    drop(s);
    let s = SharedStorage::open(&dir.0).expect("reopen");
    assert_eq!(s.get_decided_idx().expect("decided"), 1_999);
}

#[test]
fn a_torn_tail_is_ignored() {
    let dir = TempDir::new("torn");
    let mut s = SharedStorage::open(&dir.0).expect("open");
    fill(&mut s);
    drop(s);
    let path = dir.0.join(FILE);
    let good = std::fs::read(&path).expect("read");
    // One more record, cut at every possible length; and one whose payload
    // is all zeros (space allocated, data not written).
    let extra = encode(&[Op::SetDecidedIndex(3)]).expect("encode");
    let mut tails: Vec<Vec<u8>> = (1..extra.len()).map(|n| extra[..n].to_vec()).collect();
    let mut zeroed = extra.clone();
    for b in &mut zeroed[HEADER..] {
        *b = 0;
    }
    tails.push(zeroed);
    tails.push(vec![0; 100]);
    for tail in tails {
        let mut bytes = good.clone();
        bytes.extend_from_slice(&tail);
        std::fs::write(&path, &bytes).expect("write");
        let mut s = SharedStorage::open(&dir.0).expect("a torn tail is not fatal");
        check(&s);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            good.len() as u64,
            "the torn tail is cut off"
        );
        // Appending after the cut works, and survives another reopen.
        s.set_decided_idx(3).expect("write");
        drop(s);
        let s = SharedStorage::open(&dir.0).expect("reopen");
        assert_eq!(s.get_decided_idx().expect("decided"), 3);
        drop(s);
        std::fs::write(&path, &good).expect("restore");
    }
}

#[test]
fn corruption_before_good_records_is_an_error() {
    let dir = TempDir::new("corrupt");
    let mut s = SharedStorage::open(&dir.0).expect("open");
    fill(&mut s);
    drop(s);
    let path = dir.0.join(FILE);
    let good = std::fs::read(&path).expect("read");
    // A flipped bit in the first record's payload, and in its length: both
    // followed by good records, so neither is a torn tail.
    for at in [HEADER + 2, 1] {
        let mut bytes = good.clone();
        bytes[at] ^= 0x55;
        std::fs::write(&path, &bytes).expect("write");
        assert!(
            matches!(
                SharedStorage::open(&dir.0),
                Err(StorageError::Corrupt { .. })
            ),
            "flipped byte {at}"
        );
    }
}

#[test]
fn a_bad_header_at_the_end_is_a_torn_tail_only_before_zeros() {
    let dir = TempDir::new("badheader");
    let mut s = SharedStorage::open(&dir.0).expect("open");
    fill(&mut s);
    drop(s);
    let path = dir.0.join(FILE);
    let good = std::fs::read(&path).expect("read");
    let mut extra = encode(&[Op::SetDecidedIndex(3)]).expect("encode");
    extra[0] ^= 0x01; // the length no longer matches its check
    for b in &mut extra[4..] {
        *b = 0;
    }
    let mut bytes = good.clone();
    bytes.extend_from_slice(&extra);
    std::fs::write(&path, &bytes).expect("write");
    check(&SharedStorage::open(&dir.0).expect("torn tail"));
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        good.len() as u64
    );
    let mut bytes = good.clone();
    let mut garbage = encode(&[Op::SetDecidedIndex(3)]).expect("encode");
    garbage[0] ^= 0x01;
    bytes.extend_from_slice(&garbage);
    std::fs::write(&path, &bytes).expect("write");
    assert!(matches!(
        SharedStorage::open(&dir.0),
        Err(StorageError::Corrupt { .. })
    ));
}
