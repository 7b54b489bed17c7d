//! The register's ordering and confirmation, on a model network of
//! registers that deliver offers and answers in any order.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn slot(i: usize) -> NodeSlot {
    NodeSlot::new(i as u16)
}

fn register(own: usize, size: usize) -> RulesRegister {
    let text = String::from("initial");
    RulesRegister::new(
        RegisterConfig::new(slot(own), size),
        text.clone(),
        RulesVersion::of_text(0, 0, &text),
    )
}

fn live_but(own: usize, size: usize) -> BTreeSet<NodeSlot> {
    (0..size).filter(|&i| i != own).map(slot).collect()
}

#[test]
fn versions_order_by_counter_then_origin_then_digest() {
    let a = RulesVersion::new(5, 2, 9);
    assert!(RulesVersion::new(6, 0, 0) > a);
    assert!(RulesVersion::new(5, 3, 0) > a);
    assert!(RulesVersion::new(5, 2, 10) > a);
    assert!(RulesVersion::new(5, 1, u64::MAX) < a);
}

#[test]
fn etags_round_trip_and_refuse_anything_else() {
    let v = RulesVersion::new(12, 3, 0x00ab_cdef_0123_4567);
    assert_eq!(v.etag(), "\"12.3.00abcdef01234567\"");
    assert_eq!(RulesVersion::from_etag(&v.etag()), Some(v));
    assert_eq!(RulesVersion::from_etag(" 12.3.00abcdef01234567 "), Some(v));
    for bad in [
        "",
        "*",
        "\"12.3\"",
        "\"12.3.abc\"",
        "\"12.3.00abcdef01234567.1\"",
        "W/\"12.3.00abcdef01234567\"",
        "\"x.3.00abcdef01234567\"",
        "\"12.70000.00abcdef01234567\"",
    ] {
        assert_eq!(RulesVersion::from_etag(bad), None, "{bad}");
    }
}

#[test]
fn a_proposal_is_confirmed_when_every_live_peer_runs_it() {
    let now = Nanos::from_secs(1);
    let mut r = register(0, 3);
    let v = r.next_version("new");
    assert!(r.adopt(v, "new".into()));
    let t = r.propose(now, &live_but(0, 3));
    r.handle_ack(now, slot(1), v.into(), v.into());
    assert_eq!(r.poll_outcome(), None, "node 2 has not answered");
    r.handle_ack(now, slot(2), v.into(), v.into());
    assert_eq!(
        r.poll_outcome(),
        Some((
            t,
            RulesOutcome::Confirmed {
                version: v,
                peers: vec![slot(1), slot(2)],
            }
        ))
    );
}

#[test]
fn a_greater_version_in_an_answer_or_adopted_here_supersedes() {
    let now = Nanos::from_secs(1);
    let mut r = register(0, 3);
    let v = r.next_version("mine");
    r.adopt(v, "mine".into());
    let t = r.propose(now, &live_but(0, 3));
    let w = RulesVersion::of_text(v.counter, 1, "theirs");
    r.handle_ack(now, slot(1), v.into(), w.into());
    assert_eq!(
        r.poll_outcome(),
        Some((
            t,
            RulesOutcome::Superseded {
                version: v,
                winner: w
            }
        ))
    );
    // Adopting a greater version here supersedes as well.
    let v2 = r.next_version("again");
    r.adopt(v2, "again".into());
    let t2 = r.propose(now, &live_but(0, 3));
    let w2 = RulesVersion::of_text(v2.counter + 1, 2, "later");
    assert!(r.adopt(w2, "later".into()));
    assert_eq!(
        r.poll_outcome(),
        Some((
            t2,
            RulesOutcome::Superseded {
                version: v2,
                winner: w2
            }
        ))
    );
    assert!(!r.adopt(v2, "again".into()), "never back to a smaller one");
}

#[test]
fn silence_or_refusal_leaves_the_outcome_unknown() {
    let now = Nanos::from_secs(1);
    let mut r = register(0, 3);
    let v = r.next_version("new");
    r.adopt(v, "new".into());
    let t = r.propose(now, &live_but(0, 3));
    r.handle_ack(now, slot(1), v.into(), v.into());
    // Sent again to the peer that has not answered, then given up on.
    let resend = r.handle_timeout(now + r.config().resend_interval);
    assert_eq!(resend, BTreeSet::from([slot(2)]));
    r.handle_timeout(now + r.config().confirm_timeout);
    assert_eq!(
        r.poll_outcome(),
        Some((
            t,
            RulesOutcome::Unconfirmed {
                version: v,
                confirmed: vec![slot(1)],
                silent: vec![slot(2)],
                refused: vec![],
                majority: 2,
            }
        ))
    );
    // A peer that answers with an older version could not take the rules.
    let v2 = r.next_version("bad there");
    r.adopt(v2, "bad there".into());
    let t2 = r.propose(now, &live_but(0, 3));
    r.handle_ack(now, slot(1), v2.into(), v2.into());
    r.handle_ack(now, slot(2), v2.into(), v.into());
    assert!(matches!(
        r.poll_outcome(),
        Some((t, RulesOutcome::Unconfirmed { refused, .. })) if t == t2 && refused == vec![slot(2)]
    ));
}

#[test]
fn a_peer_going_down_is_not_waited_for_but_a_majority_is() {
    let now = Nanos::from_secs(1);
    let mut r = register(0, 3);
    let v = r.next_version("new");
    r.adopt(v, "new".into());
    let t = r.propose(now, &live_but(0, 3));
    r.handle_peer_down(now, slot(2));
    assert_eq!(r.poll_outcome(), None);
    r.handle_ack(now, slot(1), v.into(), v.into());
    assert!(matches!(r.poll_outcome(), Some((x, RulesOutcome::Confirmed { .. })) if x == t));
    // Alone in a cluster of three: no majority, whatever answers.
    let v2 = r.next_version("alone");
    r.adopt(v2, "alone".into());
    let t2 = r.propose(now, &BTreeSet::new());
    assert!(matches!(r.poll_outcome(), Some((x, RulesOutcome::Unconfirmed { .. })) if x == t2));
    // A cluster of one confirms at once.
    let mut one = register(0, 1);
    let v3 = one.next_version("solo");
    one.adopt(v3, "solo".into());
    let t3 = one.propose(now, &BTreeSet::new());
    assert!(matches!(one.poll_outcome(), Some((x, RulesOutcome::Confirmed { .. })) if x == t3));
}

/// A message between model nodes.
#[derive(Clone, Debug)]
enum Msg {
    Offer(RulesVersion, String),
    Ack(RulesVersion, RulesVersion),
}

/// Model nodes: registers that answer every offer and forward what they
/// adopt, over a network that delivers in the order the test picks.
struct Model {
    nodes: Vec<RulesRegister>,
    /// (from, to, message), delivered in any order.
    net: Vec<(usize, usize, Msg)>,
    outcomes: BTreeMap<(usize, RulesTicket), RulesOutcome>,
    proposed: Vec<(usize, RulesTicket, RulesVersion)>,
    now: Nanos,
}

impl Model {
    fn new(size: usize) -> Model {
        Model {
            nodes: (0..size).map(|i| register(i, size)).collect(),
            net: Vec::new(),
            outcomes: BTreeMap::new(),
            proposed: Vec::new(),
            now: Nanos::from_secs(1),
        }
    }

    fn broadcast(&mut self, from: usize) {
        let (v, text) = (
            self.nodes[from].version(),
            self.nodes[from].text().to_owned(),
        );
        for to in 0..self.nodes.len() {
            if to != from {
                self.net.push((from, to, Msg::Offer(v, text.clone())));
            }
        }
    }

    fn propose(&mut self, at: usize, text: String) {
        let v = self.nodes[at].next_version(&text);
        assert!(self.nodes[at].adopt(v, text));
        let live = live_but(at, self.nodes.len());
        let t = self.nodes[at].propose(self.now, &live);
        self.proposed.push((at, t, v));
        self.broadcast(at);
        self.drain(at);
    }

    fn deliver(&mut self, pick: usize) {
        if self.net.is_empty() {
            return;
        }
        let (from, to, msg) = self.net.remove(pick % self.net.len());
        match msg {
            Msg::Offer(v, text) => {
                let (weighed, offered) = self.nodes[to].weigh(v.counter, v.origin, &text);
                assert_eq!(offered, v);
                if weighed == Weighed::Newer {
                    self.nodes[to].adopt(offered, text);
                    self.broadcast(to);
                }
                let current = self.nodes[to].version();
                self.net.push((to, from, Msg::Ack(offered, current)));
            }
            Msg::Ack(offered, current) => {
                self.nodes[to].handle_ack(self.now, slot(from), offered.into(), current.into())
            }
        }
        self.drain(to);
    }

    /// Records the outcomes of `at`, checking each confirmation against
    /// every node's version at that moment.
    fn drain(&mut self, at: usize) {
        while let Some((t, outcome)) = self.nodes[at].poll_outcome() {
            match &outcome {
                RulesOutcome::Confirmed { version, .. } => {
                    for (i, n) in self.nodes.iter().enumerate() {
                        assert!(
                            n.version() >= *version,
                            "{version} confirmed while node {i} runs {}",
                            n.version()
                        );
                    }
                }
                RulesOutcome::Superseded { version, winner } => assert!(winner > version),
                RulesOutcome::Unconfirmed { .. } => panic!("every node is live and answers"),
            }
            assert!(
                self.outcomes.insert((at, t), outcome).is_none(),
                "one outcome"
            );
        }
    }
}

proptest! {
    /// Concurrent changes on any nodes, offers and answers delivered in any
    /// order: a confirmed version runs on every node when it is confirmed;
    /// every proposal ends exactly once; all nodes end on the greatest
    /// version, which was confirmed; a superseded one names a greater winner.
    #[test]
    fn concurrent_changes_are_ordered_and_never_silently_lost(
        size in 2usize..5,
        steps in proptest::collection::vec((0usize..3, 0usize..5, 0usize..64), 1..60),
    ) {
        let mut m = Model::new(size);
        let mut n = 0;
        for (what, node, pick) in steps {
            if what == 0 {
                n += 1;
                m.propose(node % size, format!("change {n}"));
            } else {
                m.deliver(pick);
            }
        }
        while !m.net.is_empty() {
            m.deliver(0);
        }
        let last = m.nodes[0].version();
        for node in &m.nodes {
            prop_assert_eq!(node.version(), last);
            prop_assert_eq!(node.pending(), 0);
        }
        prop_assert_eq!(m.outcomes.len(), m.proposed.len());
        for (at, t, v) in &m.proposed {
            let outcome = &m.outcomes[&(*at, *t)];
            if *v == last {
                let confirmed = matches!(outcome, RulesOutcome::Confirmed { .. });
                prop_assert!(confirmed, "the winner {} ended {:?}", v, outcome);
            } else {
                let superseded = matches!(outcome, RulesOutcome::Superseded { .. });
                let earlier = *v < last;
                prop_assert!(
                    earlier && (superseded || matches!(outcome, RulesOutcome::Confirmed { .. })),
                    "{} ended {:?} under {}", v, outcome, last
                );
            }
        }
    }
}
