//! The members a node knows of, kept on disk beside its rules state.
//!
//! The cluster's size is not configuration: it is whoever has joined and
//! not been forgotten. A restarted node reads the members it knew of from
//! here and waits for their counts before it admits (the recovery gate),
//! instead of taking itself for the first node of a new cluster. The file
//! is a line per member slot; a missing or unreadable file is an empty list
//! (the node then learns the members from its seeds).

use std::collections::BTreeSet;
use std::path::Path;

use drl_core::slot::NodeSlot;
use drl_core::time::Nanos;

use super::config::NodeSettings;

/// Slots per counter on a node: every slot a `NodeSlot` can name, so that a
/// node with any slot can join without the others restarting. Keys store
/// only the slots that counted something, and nothing on the decision path
/// grows with this number.
pub(super) const SLOT_CAPACITY: usize = drl_core::slot::SLOT_SPACE;

/// The members kept in `path`, less `own`; empty when there is no file.
pub(super) fn load(path: &Path, own: NodeSlot) -> BTreeSet<NodeSlot> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|l| l.trim().parse::<u16>().ok())
        .map(NodeSlot::new)
        .filter(|&s| s != own)
        .collect()
}

/// Writes `members` to `path` (a temporary file renamed over it).
pub(super) fn store(path: &Path, members: &[NodeSlot]) -> std::io::Result<()> {
    let mut text = String::new();
    for m in members {
        text.push_str(&m.get().to_string());
        text.push('\n');
    }
    let tmp = path.with_extension("members.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// When a node that knows of no other member may start a new cluster on its
/// own: at once without seeds (nobody could be found); after
/// `recovery_timeout` of silence from its seeds for slot 0 (the first node
/// of a StatefulSet, or of `drl cluster`); never for other slots, which
/// join a cluster that slot 0 or another member started.
pub(super) fn alone_after(settings: &NodeSettings) -> Option<Nanos> {
    if settings.seeds.is_empty() {
        Some(Nanos::ZERO)
    } else if settings.slot == 0 {
        Some(settings.recovery_timeout)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_survive_a_round_trip_and_the_own_slot_is_left_out() {
        let dir = std::env::temp_dir().join(format!("drl-members-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node-1.members");
        assert!(
            load(&path, NodeSlot::new(1)).is_empty(),
            "no file, no members"
        );
        let kept = [0, 1, 7, 300].map(NodeSlot::new);
        store(&path, &kept).unwrap();
        let back = load(&path, NodeSlot::new(1));
        assert_eq!(back, [0, 7, 300].map(NodeSlot::new).into());
        std::fs::write(&path, "2\nnot a slot\n70000\n5\n").unwrap();
        assert_eq!(
            load(&path, NodeSlot::new(1)),
            [2, 5].map(NodeSlot::new).into()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
