//! Catalog memberships: who the members of a configuration are, the rule
//! for changing them, and how a node keeps its configuration on disk.
//!
//! Below both the transport ([`crate::net`], which announces a
//! [`Membership`] to its members) and the service (which persists it and
//! starts the configuration's replica). Pure data and file I/O: no task,
//! no lock.
//!
//! # On disk
//!
//! `membership.json` in the data directory names the configuration the
//! node belongs to (or was removed from), written atomically whenever it
//! changes, *before* the node acts on it. Configuration 1 keeps its log in
//! the data directory itself; configuration `n > 1` in `config-<n>/`
//! (`config_dir`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A catalog configuration: its omnipaxos configuration id and its members
/// with their node-to-node addresses. Persisted in `membership.json` in
/// the data directory whenever it changes, before the node acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The configuration id (1: the seed configuration from the settings).
    pub config_id: u32,
    /// Members: id → address ("host:port").
    pub members: BTreeMap<u64, String>,
    /// Admin API base URLs of members, where given (`node add --admin`);
    /// the proxy fences in-flight statements through them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub admin: BTreeMap<u64, String>,
}

/// What `membership.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MembershipFile {
    pub(crate) membership: Membership,
    /// This node is not a member of `membership` (it was removed).
    pub(crate) removed: bool,
}

const MEMBERSHIP_FILE: &str = "membership.json";

/// Where configuration `config_id` keeps its log.
pub(crate) fn config_dir(data_dir: &Path, config_id: u32) -> PathBuf {
    if config_id <= 1 {
        data_dir.to_owned()
    } else {
        data_dir.join(format!("config-{config_id}"))
    }
}

/// Reads `membership.json` (`None`: there is none yet). The error names
/// the file and what is wrong with it.
pub(crate) fn read_membership(data_dir: &Path) -> Result<Option<MembershipFile>, String> {
    let path = data_dir.join(MEMBERSHIP_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `membership.json` atomically (temporary file, fsync, rename,
/// directory fsync).
pub(crate) fn write_membership(data_dir: &Path, file: &MembershipFile) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join("membership.json.tmp");
    let bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(MEMBERSHIP_FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Checks that `next` differs from `current` by exactly one node: one
/// added (a new, non-zero id with an address) or one removed (keeping at
/// least two nodes).
pub(crate) fn check_change(
    current: &BTreeMap<u64, String>,
    next: &BTreeMap<u64, String>,
) -> Result<(), String> {
    if next.contains_key(&0) {
        return Err("node id 0 is not valid".into());
    }
    let added: Vec<u64> = next
        .keys()
        .copied()
        .filter(|id| !current.contains_key(id))
        .collect();
    let removed: Vec<u64> = current
        .keys()
        .copied()
        .filter(|id| !next.contains_key(id))
        .collect();
    match (added.as_slice(), removed.as_slice()) {
        ([], []) => Err("the membership would not change".into()),
        ([id], []) => {
            if next.get(id).is_none_or(|a| a.is_empty()) {
                Err(format!("node {id} needs an address"))
            } else {
                Ok(())
            }
        }
        ([], [_]) if next.len() < 2 => Err(format!(
            "the cluster would have {} node(s) left; a replicated catalog needs at least 2",
            next.len()
        )),
        ([], [_]) => Ok(()),
        _ => Err(format!(
            "add or remove one node at a time (adding {added:?}, removing {removed:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[u64]) -> BTreeMap<u64, String> {
        ids.iter().map(|id| (*id, format!("h{id}:1"))).collect()
    }

    #[test]
    fn membership_changes_are_one_node_at_a_time_and_keep_two() {
        let three = members(&[1, 2, 3]);
        assert_eq!(check_change(&three, &members(&[1, 2, 3, 4])), Ok(()));
        assert_eq!(check_change(&three, &members(&[1, 2])), Ok(()));
        let err = |next: &[u64]| check_change(&three, &members(next)).expect_err("refused");
        assert!(err(&[1, 2, 3]).contains("would not change"));
        assert!(err(&[1]).contains("one node at a time"));
        assert!(err(&[1, 2, 4]).contains("one node at a time"));
        assert!(err(&[1, 2, 3, 4, 5]).contains("one node at a time"));
        assert!(err(&[0, 1, 2, 3]).contains("id 0"));
        let two = members(&[1, 2]);
        let e = check_change(&two, &members(&[1])).expect_err("last but one");
        assert!(e.contains("at least 2"), "{e}");
        let mut no_addr = three.clone();
        no_addr.insert(4, String::new());
        let e = check_change(&three, &no_addr).expect_err("address");
        assert!(e.contains("needs an address"), "{e}");
    }

    #[test]
    fn the_membership_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("hotrepart-membership-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(read_membership(&dir).expect("no file").is_none());
        let file = MembershipFile {
            membership: Membership {
                config_id: 3,
                members: members(&[2, 3, 4]),
                admin: [(4, "http://127.0.0.1:7434".to_owned())]
                    .into_iter()
                    .collect(),
            },
            removed: false,
        };
        write_membership(&dir, &file).expect("write");
        let back = read_membership(&dir).expect("read").expect("a file");
        assert_eq!(back.membership, file.membership);
        assert!(!back.removed);
        assert_eq!(config_dir(&dir, 1), dir);
        assert_eq!(config_dir(&dir, 3), dir.join("config-3"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
