//! The node's status as metrics, read at scrape time.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::node::{NodeApi, RulesVersion};
use drl_core::share::SharePolicy;
use drl_core::time::Clock;

/// Reads the node's status at scrape time.
pub(super) struct NodeCollector {
    pub(super) api: NodeApi,
}

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

/// The estimated overshoot (see the module docs), as a fraction of a limit.
pub fn overshoot_estimate(policy: SharePolicy, minority: bool, known: usize, live: usize) -> f64 {
    match policy {
        SharePolicy::Strict => 0.0,
        SharePolicy::Bounded { fraction_ppm } => {
            if minority {
                f64::from(fraction_ppm) / 1e6
            } else {
                0.0
            }
        }
        SharePolicy::Available => {
            let down = known.saturating_sub(live);
            down as f64 / (known as f64 + 1.0)
        }
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

/// A gauge family with one series per peer, labelled by slot and name.
fn peer_gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    peers: &[(String, String, f64)],
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (slot, peer_name, value) in peers {
        let labels = [("peer", slot.as_str()), ("peer_name", peer_name.as_str())];
        ConstGauge::new(*value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One family of the node's status as `/metrics` writes it.
enum Family {
    Gauge(f64),
    Counter(u64),
    /// One gauge per peer, labelled by slot and name.
    PerPeer(Vec<(String, String, f64)>),
    /// One gauge with one label.
    Labelled(&'static str, &'static str, f64),
    /// The node's identity (`name`, `slot`).
    Info(String, String),
    /// A histogram: sum, count, per-bucket counts by upper bound.
    Histogram(f64, u64, Vec<(f64, u64)>),
}

/// A row of the table: name (without the `drl_` prefix), help, value.
type Row = (&'static str, &'static str, Family);

impl NodeCollector {
    /// Every family of the node's status, in the order it is written. One
    /// row per metric: a new metric is a new row.
    fn table(&self) -> Vec<Row> {
        use Family::{Counter, Gauge, Histogram, Info, Labelled, PerPeer};
        let status = self.api.status();
        let limiter = &self.api.limiter;
        let settings = &self.api.settings;
        let now = limiter.clock().now();
        let flag = |b: bool| f64::from(u8::from(b));
        let r = &status.replication;
        let a = status.admission;
        let per_peer = |f: &dyn Fn(u16, &drl_core::cluster::replication::PeerState) -> f64| {
            PerPeer(
                status
                    .peers
                    .iter()
                    .map(|(&slot, p)| (slot.to_string(), p.name.clone(), f(slot, p)))
                    .collect(),
            )
        };
        let lag = PerPeer(
            status
                .peers
                .iter()
                .filter_map(|(slot, p)| {
                    let t = p.last_heard?;
                    let lag = now.saturating_sub(t).as_u64() as f64 / 1e9;
                    Some((slot.to_string(), p.name.clone(), lag))
                })
                .collect(),
        );
        let overshoot = overshoot_estimate(
            settings.policy,
            status.minority,
            status.members.len(),
            status.live.len(),
        );
        let RulesVersion {
            counter: version,
            origin,
            ..
        } = status.rules_version;
        let memory = limiter.memory();
        let journal = self.api.journal();
        vec![
            ("ready", "1 once the node has recovered its counts and admits requests.", Gauge(flag(self.api.is_ready()))),
            ("keys_tracked", "Keys tracked over all limits.", Gauge(limiter.keys_tracked() as f64)),
            ("request_limits_enabled", "1 when requests may carry their own limits (CL.THROTTLE, a check's limit).", Gauge(flag(limiter.request_limit_policy().enabled))),
            ("request_limit_parameter_sets", "Distinct request-defined limits (parameter sets) this node tracks now.", Gauge(limiter.request_parameter_sets() as f64)),
            ("request_limit_parameter_sets_max", "Most distinct request-defined limits a node tracks at once (request_parameter_sets_max).", Gauge(limiter.request_limit_policy().max_parameter_sets as f64)),
            ("evictions", "Live keys pushed out by the key cap (max_keys), since start.", Counter(limiter.evictions())),
            ("expirations", "Keys freed because their window passed, since start.", Counter(limiter.expirations())),
            ("key_memory_bytes", "Bytes held by the key tables of all limits (entries, index share, eviction sketches).", Gauge(memory.used() as f64)),
            ("rules_memory_bytes", "Bytes held by the rules in force (compiled rules, matchers, lookup maps, the key tables' fixed parts); counted against max_memory with key_memory_bytes.", Gauge(memory.rules_bytes() as f64)),
            ("key_memory_limit_bytes", "The node's key memory budget (max_memory); 0 when none is set.", Gauge(memory.limit().unwrap_or(0) as f64)),
            ("memory_evictions", "Live keys pushed out to stay within max_memory, since start.", Counter(memory.evictions())),
            ("gossip_frames_sent", "Replication frames sent to peers.", Counter(r.frames_sent)),
            ("gossip_bytes_sent", "Bytes of replication frames sent to peers.", Counter(r.bytes_sent)),
            ("gossip_frames_received", "Replication frames received from peers.", Counter(r.frames_received)),
            ("gossip_frames_refused", "Replication frames from peers refused as malformed or out of place.", Counter(r.frames_refused)),
            ("gossip_values_merged", "Counter values merged from peers.", Counter(r.values_merged)),
            ("gossip_retransmissions", "Delta rounds sent again for lack of an acknowledgement.", Counter(r.retransmissions)),
            ("gossip_full_syncs", "Full-state syncs to peers.", Counter(r.full_syncs)),
            ("confirm_claims", "Requests near a limit whose provisional hits were sent to the peers for confirmation.", Counter(r.claims_sent)),
            ("confirm_answered", "Confirmations that every peer waited for answered in time.", Counter(r.claims_answered)),
            ("confirm_expired", "Confirmations that timed out (the request was refused and its hits given back).", Counter(r.claims_expired)),
            ("confirm_silent", "Confirmations refused after confirm_timeout because a peer they waited for was silent (counted in confirm_expired too).", Counter(r.claims_silent)),
            ("peers_fenced", "Times a peer silent for fence_after was fenced (its acknowledgements and answers no longer awaited until it is heard again).", Counter(r.peers_fenced)),
            ("fences_withheld", "Times a peer silent for fence_after was still waited for because no majority reported it silent (a one-way or partial link cut).", Counter(r.fences_withheld)),
            ("hearing_reports_sent", "Reports to peers of whom this node has not heard lately (they corroborate fences).", Counter(r.hearing_sent)),
            ("recovery_frames_relayed", "Recovery frames sent to a restarted or joining node with the counts of members that left, died or are out of reach.", Counter(r.recovery_frames_relayed)),
            ("recovery_retries", "Hellos sent again, while recovering, to peers that had not answered within recovery_timeout.", Counter(r.recovery_retries)),
            ("peer_links_reset", "Times a peer's connections were closed and dialed again because nothing arrived on them for a second while open (a connection dead one way).", Counter(r.links_reset)),
            ("confirm_values_relayed", "Values of third nodes' counts that answers to this node's claims carried (what the answering node knew and this one may not have heard).", Counter(r.values_relayed_in)),
            ("peer_heartbeats_sent", "Empty frames sent to peers nothing else went to, so that they keep hearing this node.", Counter(r.heartbeats_sent)),
            ("local_late_ticks", "Sync ticks that came over half of fence_after late (this node was stopped or starved); it fenced nobody on them.", Counter(r.late_ticks)),
            ("peer_fenced", "1 while the peer is fenced: silent for fence_after, not waited for.", per_peer(&|_, p| flag(p.fenced))),
            ("divergence_hits", "Hits admitted here that some peer has not acknowledged: how far the cluster's view lags this node's.", Gauge(status.unacked_hits as f64)),
            ("divergence_rounds", "Delta rounds of this node not yet acknowledged by every peer.", Gauge(status.unacked_rounds as f64)),
            ("minority", "1 when this node cannot reach a majority of the cluster.", Gauge(flag(status.minority))),
            ("overshoot_estimate_ratio", "Estimated cluster-wide overshoot as a fraction of a limit under the share policy (see docs/http-api.md).", Labelled("policy", settings.policy.name(), overshoot)),
            ("peers_known", "Peers ever seen, this node excluded.", Gauge(status.known.len() as f64)),
            ("members", "Members of the cluster as this node knows them, itself included (joined and not forgotten).", Gauge((status.members.len() + 1) as f64)),
            ("peers_live", "Peers alive according to the failure detector.", Gauge(status.live.len() as f64)),
            ("peer_connected", "1 while a verified QUIC connection to the peer is open.", per_peer(&|_, p| flag(p.connected))),
            ("peer_live", "1 while the failure detector considers the peer alive.", per_peer(&|_, p| flag(p.live))),
            ("peer_lag_seconds", "Time since the last frame from the peer arrived.", lag),
            ("clock_offset_seconds", "The cluster's time (median of the peers' clocks) minus this node's corrected clock; 0 before any peer is measured.", Gauge(status.clock.offset_ns.unwrap_or(0) as f64 / 1e9)),
            ("clock_correction_seconds", "What this node adds to its own clock to keep to the cluster's time.", Gauge(status.clock.correction_ns as f64 / 1e9)),
            ("clock_offset_exceeded", "1 while this node's clock is further from the cluster's than max_clock_offset: it admits nothing.", Gauge(flag(!status.clock.in_bounds))),
            ("clock_offset_max_seconds", "The configured max_clock_offset.", Gauge(settings.max_clock_offset.as_u64() as f64 / 1e9)),
            ("peer_clock_offset_seconds", "Estimated peer clock minus this node's clock (smoothed).", per_peer(&|_, p| p.clock_offset_ns as f64 / 1e9)),
            ("peer_rtt_seconds", "Smoothed round-trip time to the peer.", per_peer(&|_, p| p.rtt.as_u64() as f64 / 1e9)),
            ("peer_unacked_rounds", "Delta rounds of this node the peer has not acknowledged.", per_peer(&|slot, _| status.peer_unacked_rounds.get(&slot).copied().unwrap_or(0) as f64)),
            ("rules_version", "Version counter of the rules in force (cluster-wide; the greatest version wins).", Gauge(version as f64)),
            ("rules_origin_slot", "Slot of the node that put the rules in force.", Gauge(f64::from(origin))),
            ("insecure_defaults", "Development defaults this node runs with (the development admin token): 0 in production.", Gauge(settings.insecure_defaults.len() as f64)),
            ("rules_file_error", "1 when the last reload of the rules file failed (the rules in force stay).", Gauge(flag(status.rules_file_error.is_some()))),
            ("rules_limits", "Limits in the rules in force.", Gauge(limiter.rules().limits().len() as f64)),
            ("snapshots_written", "Local snapshots written.", Counter(status.snapshots_written)),
            ("peer_handshakes_retried", "Connection attempts from unknown, unvalidated sources answered with a stateless QUIC Retry.", Counter(a.retried)),
            ("peer_handshakes_refused_busy", "Connection attempts refused because every handshake slot of their pool was taken.", Counter(a.refused_busy)),
            ("peer_handshakes_refused_per_source", "Connection attempts refused because their source IP had too many handshakes in flight.", Counter(a.refused_per_source)),
            ("peer_handshakes_failed", "Incoming handshakes that failed or timed out.", Counter(a.failed)),
            ("snapshots_refused", "Snapshots refused at start (corrupt or unreadable) and moved aside.", Counter(status.snapshots_refused)),
            ("insecure_defaults", "Development defaults this node runs with (the published key seed); 0 in production.", Gauge(f64::from(crate::node::notices::insecure_defaults(settings)))),
            ("node", "This node's identity.", Info(settings.name.clone(), settings.slot.to_string())),
            ("durability", "The write-ahead journal's policy in force (none, interval, sync; none also without snapshot_path).", Labelled("policy", journal.map_or("none", |j| j.policy.name()), 1.0)),
            ("durability_degraded", "1 while the journal cannot keep its promise: a write or fsync failed, or an fsync took over 200 ms. Decisions go on.", Gauge(flag(journal.is_some_and(|j| j.degraded().is_some())))),
            ("journal_bytes", "Bytes of write-ahead journal segments on disk (cut at each snapshot).", Gauge(journal.map_or(0.0, |j| j.bytes() as f64))),
            ("journal_groups", "Groups of changed values appended to the journal.", Counter(journal.map_or(0, |j| j.groups()))),
            ("journal_write_errors", "Journal writes and fsyncs that failed.", Counter(journal.map_or(0, |j| j.write_errors()))),
            ("journal_tail_cuts", "Torn or corrupt journal tails cut at start.", Counter(journal.map_or(0, |j| j.tail_cuts()))),
            ("journal_segments_refused", "Journal segments refused at start (another cluster or format) and moved aside.", Counter(journal.map_or(0, |j| j.segments_refused()))),
            ("journal_fsync_seconds", "Time each journal fsync took.", { let (sum, count, buckets) = journal.map(|j| j.fsync_histogram()).unwrap_or_default(); Histogram(sum, count, buckets) }),
        ]
    }
}

impl prometheus_client::collector::Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        for (name, help, family) in self.table() {
            match family {
                Family::Gauge(v) => gauge(&mut e, name, help, v)?,
                Family::Counter(v) => counter(&mut e, name, help, v)?,
                Family::PerPeer(series) => peer_gauges(&mut e, name, help, &series)?,
                Family::Labelled(label, value, v) => {
                    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
                    ConstGauge::new(v).encode(family.encode_family(&[(label, value)])?)?;
                }
                Family::Histogram(sum, count, buckets) => {
                    let mut family =
                        e.encode_descriptor(name, help, None, MetricType::Histogram)?;
                    family.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
                }
                Family::Info(node, slot) => {
                    let mut family = e.encode_descriptor(name, help, None, MetricType::Info)?;
                    family.encode_info(&[("name", node.as_str()), ("slot", slot.as_str())])?;
                }
            }
        }
        Ok(())
    }
}
