//! What a node tells its operator in plain words: why it is not ready yet
//! (the `/readyz` reason and a log line) and which development defaults it
//! runs with (a warning at start and the `drl_insecure_defaults` gauge).

use std::time::Duration;

use drl_core::key::KeySeed;

use super::{NodeApi, NodeSettings, NodeStatus};

/// How often a node that is still not ready says why.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(10);

/// The key seed of the shipped Docker Compose file when `DRL_KEY_SEED` is
/// unset: public, like [`KeySeed::default`].
const COMPOSE_DEV_SEED: KeySeed = KeySeed(0x0123_4567_89ab_cdef, 0x0123_4567_89ab_cdef);

/// Whether the node digests keys under a seed anyone can read in this
/// repository: the built-in development seed (no `key_seed` set) or the
/// Compose file's default. Anyone who knows the seed can pick descriptor
/// values whose keys collide.
pub fn development_key_seed(settings: &NodeSettings) -> bool {
    settings.key_seed == KeySeed::default() || settings.key_seed == COMPOSE_DEV_SEED
}

/// How many development defaults the node runs with, for the
/// `drl_insecure_defaults` gauge: the development key seed.
pub fn insecure_defaults(settings: &NodeSettings) -> u32 {
    u32::from(development_key_seed(settings))
}

/// Logs a warning for the development key seed; called once at start.
pub fn warn_development_key_seed(settings: &NodeSettings) {
    if development_key_seed(settings) {
        tracing::warn!(
            "key_seed is a development default (published in this project's sources): \
             set DRL_KEY_SEED (or key_seed) to 32 random hex digits, the same on every node, \
             e.g. `openssl rand -hex 16`"
        );
    }
}

/// Logs a warning when the node keeps nothing on disk (no `snapshot_path`,
/// which `data_dir` also gives) although its durability asks for a journal: its
/// counts and rules live in memory only, and a restart of every node at
/// once forgets them. Called once at start.
pub fn warn_nothing_on_disk(settings: &NodeSettings) {
    let wants_journal = !matches!(settings.durability, super::journal::Durability::None);
    if wants_journal && settings.snapshot_path.is_none() {
        tracing::warn!(
            "durability = \"{}\" but neither snapshot_path nor data_dir is set: counts and \
             rules are kept in memory only, and a restart of every node at once forgets them; \
             set snapshot_path (DRL_SNAPSHOT_PATH) to keep them, or durability = \"none\" to \
             silence this",
            settings.durability.name()
        );
    }
}

/// Why a node that is not ready is waiting, and what would change it; `None`
/// once it is ready.
///
/// A node admits once it has its counts back: from every member it knows
/// of, or after `recovery_timeout` from a majority of them, itself included
/// (never on time alone, but for the first node of a new cluster). The words name the setting to change.
pub fn waiting_reason(settings: &NodeSettings, status: &NodeStatus, ready: bool) -> Option<String> {
    if ready {
        return None;
    }
    if let Some(reason) = clock_reason(settings, status) {
        return Some(reason);
    }
    let members = status.members.len();
    let connected = status.peers.values().filter(|p| p.connected).count();
    let mut reason = if members == 0 {
        "waiting to hear from a member of the cluster: it knows of none yet (its data \
         directory keeps no member list), and only a node without seeds, or slot 0 after \
         recovery_timeout, starts a new cluster on its own"
            .to_owned()
    } else {
        // A majority of the cluster of members + 1 nodes.
        let majority = members.div_ceil(2) + 1;
        format!(
            "waiting for its peers to send back this node's counts: it knows of {members} other \
             member{} and needs answers from all of them, or after recovery_timeout from a \
             majority ({} other node{}); {connected} connected",
            if members == 1 { "" } else { "s" },
            majority - 1,
            if majority == 2 { "" } else { "s" },
        )
    };
    if settings.seeds.is_empty() {
        reason.push_str(
            "; no seeds are configured, so no peer can be found: set seeds (DRL_SEEDS, --seeds) \
             to the other nodes' peer addresses, or remove the member list from the data \
             directory to start a new cluster",
        );
    } else {
        reason.push_str(&format!(
            "; seeds: {}. Start the other nodes (they must share the cluster CA), check that \
             their peer ports (UDP) are reachable",
            settings.seeds.join(", ")
        ));
    }
    Some(reason)
}

/// Why a node whose clock gate is closed admits nothing: its clock is
/// further from the cluster's than `max_clock_offset` (DESIGN.md, "Clocks").
fn clock_reason(settings: &NodeSettings, status: &NodeStatus) -> Option<String> {
    if status.clock.in_bounds {
        return None;
    }
    let bound_ms = settings.max_clock_offset.as_u64() as f64 / 1e6;
    Some(match status.clock.offset_ns {
        Some(offset) => format!(
            "this node's clock is {:+.1} ms off the cluster's (the median of its peers' clocks),              more than max_clock_offset ({bound_ms} ms): it admits nothing until its correction              brings it within {:.1} ms (at most half a second per second behind, at once ahead);              check the host's time synchronisation (chrony, ntpd)",
            -(offset as f64) / 1e6,
            bound_ms / 2.0,
        ),
        None => "this node has not yet compared its clock with any connected peer's".to_owned(),
    })
}

/// Logs, while the node is not ready, why ([`waiting_reason`]): first
/// once its recovery timeout and a second have passed, then every
/// ten seconds. Returns once the node is ready.
pub async fn log_while_waiting(api: NodeApi) {
    let first =
        Duration::from_nanos(api.settings.recovery_timeout.as_u64()) + Duration::from_secs(1);
    tokio::time::sleep(first).await;
    loop {
        let ready = api.is_ready();
        match waiting_reason(&api.settings, &api.status(), ready) {
            None => return,
            Some(reason) => tracing::warn!("not ready: {reason}"),
        }
        tokio::time::sleep(WAITING_LOG_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings(slot: u16, seeds: &[&str]) -> NodeSettings {
        crate::node::NodeFile {
            slot,
            seeds: seeds.iter().map(|s| s.to_string()).collect(),
            ..crate::node::NodeFile::default()
        }
        .settings(Path::new("/base"))
        .unwrap()
    }

    #[test]
    fn a_node_off_the_cluster_clock_says_how_far_and_what_to_check() {
        let mut status = NodeStatus::default();
        assert_eq!(waiting_reason(&settings(3, &["a:1"]), &status, true), None);
        status.clock.in_bounds = false;
        status.clock.offset_ns = Some(-320_000_000);
        let why = waiting_reason(&settings(3, &["a:1"]), &status, false).unwrap();
        assert!(why.contains("+320.0 ms off"), "{why}");
        assert!(why.contains("max_clock_offset (50 ms)"), "{why}");
        assert!(why.contains("chrony"), "{why}");
    }

    #[test]
    fn a_node_waiting_for_its_members_is_told_how_many_and_what_to_check() {
        let why = waiting_reason(&settings(1, &["a:1"]), &NodeStatus::default(), false).unwrap();
        assert!(why.contains("knows of none yet"), "{why}");
        assert!(why.contains("seeds: a:1"), "{why}");
        let mut status = NodeStatus {
            members: vec![0, 2, 3, 4],
            ..NodeStatus::default()
        };
        let why = waiting_reason(&settings(1, &["a:1"]), &status, false).unwrap();
        assert!(
            why.contains("4 other members") && why.contains("majority (2 other nodes)"),
            "{why}"
        );
        status.members = vec![0, 2];
        let why = waiting_reason(&settings(1, &[]), &status, false).unwrap();
        assert!(
            why.contains("2 other members") && why.contains("no seeds"),
            "{why}"
        );
        assert_eq!(waiting_reason(&settings(1, &[]), &status, true), None);
    }
}
