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

fn add_shard(seq: u64) -> CatalogEntry {
    CatalogEntry {
        id: ProposalId {
            node: 1,
            incarnation: 1,
            seq,
        },
        cmd: if seq == 0 {
            CatalogCommand::AddShard {
                shard: "a".into(),
                dsn: crate::command::Dsn::from("host=a"),
            }
        } else {
            CatalogCommand::TxDecision {
                gid: format!("g{seq}"),
                commit: true,
                since: None,
            }
        },
    }
}

fn state_of(entries: &[CatalogEntry]) -> crate::entry::StateMachine {
    let mut sm = crate::entry::StateMachine::new();
    for e in entries {
        sm.apply(e);
    }
    sm
}

/// omnipaxos 0.2.4 merges a log sync's delta into a snapshot of the
/// follower's log read up to the *leader's* decided index: with the
/// entries there it counts them twice, without them it leaves a gap. The
/// store rebuilds the snapshot from its own state and the delta.
#[test]
fn a_snapshot_merged_by_a_log_sync_is_rebuilt_right() {
    use omnipaxos::storage::Snapshot as _;
    let all: Vec<CatalogEntry> = (0..10).map(add_shard).collect();
    let dir = TempDir::new("sync-snapshot");
    // (follower has entries up to, follower decided, expected after sync)
    for have in [10, 6] {
        let mut s = SharedStorage::open(&dir.0.join(format!("have{have}"))).expect("open");
        s.append_entries(all[..have].to_vec()).expect("append");
        s.set_decided_idx(6).expect("decided");
        // A local snapshot at 4 (consistent: stored as is).
        let snap4 = CatalogSnapshot::create(&all[..4]);
        s.write_atomically(vec![
            StorageOp::Trim(4),
            StorageOp::SetCompactedIdx(4),
            StorageOp::SetSnapshot(Some(snap4.clone())),
        ])
        .expect("compact");
        // The sync: leader decided 10, delta = entries 6..10.
        let mut merged = snap4;
        // Its own entries up to the leader's decided index: all of them, or
        // none when it lacks some (the store returns no partial range).
        let own: &[CatalogEntry] = if have >= 10 { &all[4..10] } else { &[] };
        merged.merge(CatalogSnapshot::create(own));
        merged.merge(CatalogSnapshot::create(&all[6..10]));
        assert_ne!(merged.len(), 10);
        s.write_atomically(vec![
            StorageOp::SetDecidedIndex(10),
            StorageOp::Trim(10),
            StorageOp::SetCompactedIdx(10),
            StorageOp::SetSnapshot(Some(merged)),
            StorageOp::AppendOnPrefix(10, Vec::new()),
        ])
        .expect("sync");
        for s in [
            s.clone(),
            SharedStorage::open(&dir.0.join(format!("have{have}"))).expect("reopen"),
        ] {
            let got = s.get_snapshot().expect("read").expect("a snapshot");
            assert_eq!(got.len(), 10, "have {have}");
            assert_eq!(got.state(), state_of(&all), "have {have}");
            assert_eq!(s.get_compacted_idx().expect("read"), 10);
        }
    }
}

/// A stale log sync (built from an older promise) re-sends entries this
/// node already compacted: only what follows its snapshot counts.
#[test]
fn a_stale_sync_delta_over_the_compacted_prefix_is_rebuilt_right() {
    use omnipaxos::storage::Snapshot as _;
    let all: Vec<CatalogEntry> = (0..12).map(add_shard).collect();
    for (compacted, sync_idx) in [(10, 10), (8, 10), (10, 12)] {
        let mut s = SharedStorage::new();
        s.append_entries(all.clone()).expect("append");
        s.set_decided_idx(12).expect("decided");
        let stored = CatalogSnapshot::create(&all[..compacted]);
        s.write_atomically(vec![
            StorageOp::Trim(compacted),
            StorageOp::SetCompactedIdx(compacted),
            StorageOp::SetSnapshot(Some(stored.clone())),
        ])
        .expect("compact");
        // The leader thought we had decided 6: delta 6..sync_idx.
        let mut merged = stored;
        merged.merge(CatalogSnapshot::create(&all[compacted..sync_idx]));
        merged.merge(CatalogSnapshot::create(&all[6..sync_idx]));
        s.write_atomically(vec![
            StorageOp::Trim(sync_idx),
            StorageOp::SetCompactedIdx(sync_idx),
            StorageOp::SetSnapshot(Some(merged)),
            StorageOp::AppendOnPrefix(sync_idx, all[sync_idx..].to_vec()),
        ])
        .expect("sync");
        let got = s.get_snapshot().expect("read").expect("a snapshot");
        assert_eq!(got.len(), sync_idx, "{compacted} {sync_idx}");
        assert_eq!(got.state(), state_of(&all[..sync_idx]));
        assert_eq!(s.get_log_len().expect("read"), 12 - sync_idx);
    }
    // A prefix write below the trimmed index keeps what is after it.
    let mut s = SharedStorage::new();
    s.append_entries(all.clone()).expect("append");
    s.trim(8).expect("trim");
    s.append_on_prefix(5, all[5..].to_vec())
        .expect("stale prefix");
    assert_eq!(s.get_log_len().expect("read"), 4);
    assert!(s.get_entries(4, 9).expect("read").is_empty());
    assert_eq!(s.get_entries(8, 12).expect("read"), all[8..].to_vec());
}

#[test]
fn a_snapshot_that_cannot_be_rebuilt_is_refused() {
    use omnipaxos::storage::Snapshot as _;
    let all: Vec<CatalogEntry> = (0..10).map(add_shard).collect();
    let mut s = SharedStorage::new();
    s.append_entries(all[..3].to_vec()).expect("append");
    // Claims index 10 but stands for 2 entries and merged none.
    let bad = CatalogSnapshot::create(&all[..2]);
    let err = s
        .write_atomically(vec![
            StorageOp::Trim(10),
            StorageOp::SetCompactedIdx(10),
            StorageOp::SetSnapshot(Some(bad)),
        ])
        .expect_err("refused");
    assert!(err.to_string().contains("snapshot"), "{err}");
    assert_eq!(s.get_compacted_idx().expect("read"), 0);
    assert_eq!(s.get_log_len().expect("read"), 3);
}

#[test]
fn a_stored_snapshot_keeps_a_bounded_tail() {
    use crate::entry::SNAPSHOT_TAIL;
    use omnipaxos::storage::Snapshot as _;
    let all: Vec<CatalogEntry> = (0..(SNAPSHOT_TAIL as u64 + 50)).map(add_shard).collect();
    let mut s = SharedStorage::new();
    s.append_entries(all.clone()).expect("append");
    s.set_decided_idx(all.len()).expect("decided");
    s.write_atomically(vec![
        StorageOp::Trim(all.len()),
        StorageOp::SetCompactedIdx(all.len()),
        StorageOp::SetSnapshot(Some(CatalogSnapshot::create(&all))),
    ])
    .expect("compact");
    let got = s.get_snapshot().expect("read").expect("a snapshot");
    assert_eq!(got.len(), all.len());
    assert_eq!(got.tail().len(), SNAPSHOT_TAIL);
    assert_eq!(got.folded(), 50);
    assert_eq!(got.state(), state_of(&all));
    // Through serde (the wire and the journal) it is the same snapshot.
    let json = serde_json::to_string(&got).expect("serialise");
    let back: CatalogSnapshot = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back, got);
}

#[test]
fn a_data_dir_is_locked_for_one_holder_at_a_time() {
    let dir = TempDir::new("lock");
    let first = DirLock::acquire(&dir.0).expect("first lock");
    let pid = std::fs::read_to_string(dir.0.join(LOCK_FILE)).expect("lock file");
    assert_eq!(pid.trim(), std::process::id().to_string());
    // A second holder (another open file: what another process does) is
    // refused at once, told the directory and the holder's pid.
    let e = DirLock::acquire(&dir.0).expect_err("second lock");
    assert!(
        matches!(&e, StorageError::Locked { dir: d, pid: Some(p) } if *d == dir.0 && *p == std::process::id()),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&dir.0.display().to_string())
            && msg.contains(&format!("pid {}", std::process::id()))
            && msg.contains("in use by another hotrepart process"),
        "{msg}"
    );
    drop(first);
    let again = DirLock::acquire(&dir.0).expect("free again once dropped");
    drop(again);
}
