//! Leased local budgets for the `local` degraded mode.
//!
//! Sans-IO. While the cluster answers, the client notes every call per
//! descriptor set. A set called at least `hot_calls` times within one window
//! of its limit is hot; for each hot set the client charges a small budget
//! to the cluster up front: an ordinary check with cost `k`, where
//! `k = min(max_lease, floor(share × remaining), demand)`: `remaining` from
//! the set's last answer, `demand` the set's calls in the current or the
//! previous window (a lease never exceeds what the set recently used).
//! When that check is allowed, the cluster has counted the `k` hits, and the
//! client holds a lease of `k` that it may spend locally while no node
//! answers. A lease expires when the cluster stops counting its charge:
//! at the deciding limit's reset (a fixed window's end), at most one window
//! after it was granted; it is renewed while the set stays hot.
//!
//! So admissions made while cut off were counted by the cluster before they
//! happened: overshoot beyond the cluster's own accounting is zero, and
//! local admissions per set and window are at most `k`. What it costs is the
//! unused part of each lease: at most `k` hits per hot set, per client, per
//! window (so at most that set's own recent demand), that the cluster
//! counted but nobody used.
//!
//! Calling order: `note_call(now, key)` for each call; `handle_answer(now,
//! key, quota)` for each answer from a node; `poll_renewals(now)` gives the
//! lease checks to make, each reported by `handle_grant(now, key, granted)`;
//! `try_spend(now, key, cost)` when no node answered.

use std::collections::HashMap;
use std::sync::Arc;

use drl_core::time::Nanos;

use crate::client::Receipt;

/// A descriptor set, in a canonical order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseKey(Arc<str>);

impl LeaseKey {
    /// The key of a descriptor set (order of fields does not matter).
    pub fn new(fields: &[(String, String)]) -> LeaseKey {
        let mut sorted: Vec<&(String, String)> = fields.iter().collect();
        sorted.sort();
        let mut s = String::new();
        for (n, v) in sorted {
            // Field names and values cannot hold control characters.
            s.push_str(n);
            s.push('\u{1f}');
            s.push_str(v);
            s.push('\u{1e}');
        }
        LeaseKey(s.into())
    }
}

/// How leases are sized and when they are taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeaseConfig {
    /// Fraction of the remaining quota leased, in (0, 1].
    pub share: f64,
    /// The largest lease per descriptor set.
    pub max_lease: u32,
    /// Calls within one window that make a descriptor set hot.
    pub hot_calls: u32,
    /// Most descriptor sets tracked; further sets get no lease.
    pub max_keys: usize,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            share: 0.05,
            max_lease: 100,
            hot_calls: 10,
            max_keys: 10_000,
        }
    }
}

/// What the cluster said of a descriptor set's deciding limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaSeen {
    /// The limit's quota.
    pub limit: u64,
    /// Its window.
    pub window: Nanos,
    /// What was left.
    pub remaining: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    left: u64,
    granted: u64,
    expires: Nanos,
    /// The lease check's receipt: refunding it gives the whole lease back.
    receipt: Option<Receipt>,
    /// A return (refund) is in flight.
    returning: bool,
}

#[derive(Clone, Debug)]
struct KeyState {
    fields: Arc<[(String, String)]>,
    period_start: Nanos,
    calls: u32,
    prev_calls: u32,
    hot_until: Nanos,
    last_call: Nanos,
    quota: Option<QuotaSeen>,
    lease: Option<Lease>,
    renewing: Option<u32>,
}

/// A lease check to make: charge `cost` to the cluster for `fields`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// The set.
    pub key: LeaseKey,
    /// Its fields.
    pub fields: Arc<[(String, String)]>,
    /// The lease to charge.
    pub cost: u32,
}

/// The result of spending from a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spend {
    /// Admitted from the lease; `left` remains.
    Admitted {
        /// What is left of the lease.
        left: u64,
    },
    /// The set has a live lease, but not `cost` left of it.
    Exhausted,
    /// No live lease for this set.
    NoLease,
}

/// Leases of one client.
#[derive(Clone, Debug)]
pub struct LeaseBook {
    config: LeaseConfig,
    keys: HashMap<LeaseKey, KeyState>,
}

/// The window assumed before a set's limit is known.
const DEFAULT_PERIOD: Nanos = Nanos::from_secs(1);

impl LeaseBook {
    /// An empty book.
    pub fn new(config: LeaseConfig) -> Self {
        LeaseBook {
            config,
            keys: HashMap::new(),
        }
    }

    /// A call for `key` is being made.
    pub fn note_call(&mut self, now: Nanos, key: &LeaseKey, fields: &[(String, String)]) {
        if !self.keys.contains_key(key) {
            if self.keys.len() >= self.config.max_keys {
                return;
            }
            self.keys.insert(
                key.clone(),
                KeyState {
                    fields: fields.to_vec().into(),
                    period_start: now,
                    calls: 0,
                    prev_calls: 0,
                    hot_until: Nanos::ZERO,
                    last_call: now,
                    quota: None,
                    lease: None,
                    renewing: None,
                },
            );
        }
        let hot_calls = self.config.hot_calls;
        if let Some(k) = self.keys.get_mut(key) {
            let period = k.quota.map_or(DEFAULT_PERIOD, |q| q.window);
            if now >= k.period_start.saturating_add(period) {
                // The window just ended counts as the previous one only if
                // it ended less than a window ago.
                let next = k.period_start.saturating_add(period);
                k.prev_calls = if now < next.saturating_add(period) {
                    k.calls
                } else {
                    0
                };
                k.period_start = now;
                k.calls = 0;
            }
            k.calls = k.calls.saturating_add(1);
            k.last_call = now;
            if k.calls >= hot_calls {
                // Hot for this window and the next.
                k.hot_until = now.saturating_add(period).saturating_add(period);
            }
        }
    }

    /// A node answered for `key`; `quota` is the deciding limit (`None`
    /// when no rule limits the set).
    pub fn handle_answer(&mut self, _now: Nanos, key: &LeaseKey, quota: Option<QuotaSeen>) {
        if let Some(k) = self.keys.get_mut(key) {
            k.quota = quota;
        }
    }

    /// The lease checks to make now: hot sets with a known limit whose
    /// lease is missing, spent or expired. Each is marked as renewing until
    /// [`Self::handle_grant`] reports it.
    pub fn poll_renewals(&mut self, now: Nanos) -> Vec<Renewal> {
        let mut out = Vec::new();
        for (key, k) in self.keys.iter_mut() {
            if k.renewing.is_some() || now >= k.hot_until {
                continue;
            }
            let Some(q) = k.quota else { continue };
            let live = k
                .lease
                .as_ref()
                .is_some_and(|l| l.left > 0 && now < l.expires);
            if live {
                continue;
            }
            let share = (q.remaining as f64 * self.config.share).floor();
            let demand = k.calls.max(k.prev_calls);
            let cost = share
                .min(f64::from(self.config.max_lease))
                .min(f64::from(demand)) as u32;
            if cost == 0 {
                continue;
            }
            k.renewing = Some(cost);
            out.push(Renewal {
                key: key.clone(),
                fields: k.fields.clone(),
                cost,
            });
        }
        out
    }

    /// The lease check for `key` was answered: `granted` when the cluster
    /// admitted (and counted) its cost; the lease lives for `life`;
    /// `receipt` gives it back whole while untouched.
    pub fn handle_grant(
        &mut self,
        now: Nanos,
        key: &LeaseKey,
        granted: bool,
        life: Nanos,
        receipt: Option<Receipt>,
    ) {
        if let Some(k) = self.keys.get_mut(key) {
            let Some(cost) = k.renewing.take() else {
                return;
            };
            if granted {
                k.lease = Some(Lease {
                    left: u64::from(cost),
                    granted: u64::from(cost),
                    expires: now.saturating_add(life),
                    receipt,
                    returning: false,
                });
            }
        }
    }

    /// Leases to give back now (refund their receipt): live, untouched
    /// (nothing spent from them), with a receipt, and either of a set that
    /// went cold or, with `all`, every one (the client is stopping). Each
    /// is marked as returning until [`Self::handle_returned`] reports it.
    /// A lease partly spent is never returned: it expires with its window.
    pub fn poll_returns(&mut self, now: Nanos, all: bool) -> Vec<(LeaseKey, Receipt)> {
        let mut out = Vec::new();
        for (key, k) in self.keys.iter_mut() {
            let cold = now >= k.hot_until;
            let Some(l) = &mut k.lease else { continue };
            let untouched = l.left == l.granted && now < l.expires && !l.returning;
            if !(untouched && (all || cold)) {
                continue;
            }
            if let Some(r) = &l.receipt {
                l.returning = true;
                out.push((key.clone(), r.clone()));
            }
        }
        out
    }

    /// A lease return ended: `done` when the cluster refunded it or refused
    /// it for good (the lease is dropped either way); otherwise it is kept
    /// (no node answered: it may be needed).
    pub fn handle_returned(&mut self, key: &LeaseKey, done: bool) {
        if let Some(k) = self.keys.get_mut(key) {
            if done {
                k.lease = None;
            } else if let Some(l) = &mut k.lease {
                l.returning = false;
            }
        }
    }

    /// No node answered an atomic batch: admit it only if every check's
    /// lease covers its cost, then spend them all. `NoLease` when no check
    /// has a live lease; `Exhausted` when some do but not all are covered.
    pub fn try_spend_all(&mut self, now: Nanos, checks: &[(LeaseKey, u32)]) -> Spend {
        let mut need: HashMap<&LeaseKey, u64> = HashMap::new();
        for (k, cost) in checks {
            *need.entry(k).or_default() += u64::from(*cost);
        }
        let mut any = false;
        let mut all = true;
        for (k, cost) in &need {
            match self.keys.get(*k).and_then(|s| s.lease.as_ref()) {
                Some(l) if now < l.expires && !l.returning => {
                    any = true;
                    all &= l.left >= *cost;
                }
                _ => all = false,
            }
        }
        if !any {
            return Spend::NoLease;
        }
        if !all {
            return Spend::Exhausted;
        }
        let mut left = u64::MAX;
        for (k, cost) in need {
            if let Some(l) = self.keys.get_mut(k).and_then(|s| s.lease.as_mut()) {
                l.left -= cost;
                left = left.min(l.left);
            }
        }
        Spend::Admitted { left }
    }

    /// The lease check for `key` got no answer: nothing was leased (or, if
    /// the cluster counted it without answering, the hits are wasted).
    pub fn handle_renewal_failed(&mut self, key: &LeaseKey) {
        if let Some(k) = self.keys.get_mut(key) {
            k.renewing = None;
        }
    }

    /// No node answered: admit from `key`'s lease if it has `cost` left.
    pub fn try_spend(&mut self, now: Nanos, key: &LeaseKey, cost: u32) -> Spend {
        let Some(k) = self.keys.get_mut(key) else {
            return Spend::NoLease;
        };
        match &mut k.lease {
            Some(l) if now < l.expires && !l.returning => {
                if l.left >= u64::from(cost) {
                    l.left -= u64::from(cost);
                    Spend::Admitted { left: l.left }
                } else {
                    Spend::Exhausted
                }
            }
            _ => Spend::NoLease,
        }
    }

    /// The live lease of `key`: (left, granted).
    pub fn lease(&self, now: Nanos, key: &LeaseKey) -> Option<(u64, u64)> {
        let l = self.keys.get(key)?.lease.as_ref()?;
        (now < l.expires).then_some((l.left, l.granted))
    }

    /// Forgets sets with no call for two windows and no live lease.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.keys.retain(|_, k| {
            let period = k.quota.map_or(DEFAULT_PERIOD, |q| q.window);
            let recent = now < k.last_call.saturating_add(period).saturating_add(period);
            let leased = k.lease.as_ref().is_some_and(|l| now < l.expires);
            recent || leased || k.renewing.is_some()
        });
    }

    /// Descriptor sets tracked.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no set is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(user: &str) -> Vec<(String, String)> {
        vec![
            ("user".into(), user.into()),
            ("endpoint".into(), "/x".into()),
        ]
    }

    fn ms(n: u64) -> Nanos {
        Nanos::from_millis(n)
    }

    fn book() -> LeaseBook {
        LeaseBook::new(LeaseConfig {
            share: 0.1,
            max_lease: 8,
            hot_calls: 3,
            max_keys: 100,
        })
    }

    fn quota(remaining: u64) -> Option<QuotaSeen> {
        Some(QuotaSeen {
            limit: 100,
            window: ms(1000),
            remaining,
        })
    }

    #[test]
    fn key_is_order_independent() {
        let mut f = fields("a");
        let k1 = LeaseKey::new(&f);
        f.reverse();
        assert_eq!(k1, LeaseKey::new(&f));
        assert_ne!(k1, LeaseKey::new(&fields("b")));
    }

    #[test]
    fn only_hot_keys_with_a_known_limit_get_a_lease() {
        let mut b = book();
        let f = fields("a");
        let k = LeaseKey::new(&f);
        b.note_call(ms(0), &k, &f);
        b.handle_answer(ms(0), &k, quota(50));
        assert!(b.poll_renewals(ms(1)).is_empty(), "one call is not hot");
        for t in 2..8 {
            b.note_call(ms(t), &k, &f);
        }
        let r = b.poll_renewals(ms(8));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].cost, 5, "10 % of 50 remaining");
        assert!(b.poll_renewals(ms(9)).is_empty(), "renewal in flight");
        b.handle_grant(ms(10), &k, true, ms(1000), None);
        assert_eq!(b.lease(ms(11), &k), Some((5, 5)));
    }

    #[test]
    fn lease_is_capped_and_never_zero() {
        let mut b = book();
        let f = fields("a");
        let k = LeaseKey::new(&f);
        for t in 0..3 {
            b.note_call(ms(t), &k, &f);
        }
        b.handle_answer(ms(3), &k, quota(1000));
        assert_eq!(b.poll_renewals(ms(4))[0].cost, 3, "no more than the demand");
        b.handle_renewal_failed(&k);
        for t in 4..20 {
            b.note_call(ms(t), &k, &f);
        }
        assert_eq!(b.poll_renewals(ms(20))[0].cost, 8, "the cap");
        b.handle_renewal_failed(&k);
        b.handle_answer(ms(5), &k, quota(9));
        assert!(b.poll_renewals(ms(6)).is_empty(), "10 % of 9 rounds to 0");
    }

    #[test]
    fn spending_stops_at_the_lease_and_expires_with_the_window() {
        let mut b = book();
        let f = fields("a");
        let k = LeaseKey::new(&f);
        for t in 0..5 {
            b.note_call(ms(t), &k, &f);
        }
        b.handle_answer(ms(5), &k, quota(40));
        let r = b.poll_renewals(ms(6));
        assert_eq!(r[0].cost, 4);
        b.handle_grant(ms(10), &k, true, ms(1000), None);
        let mut admitted = 0;
        for _ in 0..10 {
            if let Spend::Admitted { .. } = b.try_spend(ms(20), &k, 1) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 4);
        assert_eq!(b.try_spend(ms(21), &k, 1), Spend::Exhausted);
        assert_eq!(b.try_spend(ms(1010), &k, 1), Spend::NoLease);
    }

    #[test]
    fn denied_lease_check_leases_nothing() {
        let mut b = book();
        let f = fields("a");
        let k = LeaseKey::new(&f);
        for t in 0..3 {
            b.note_call(ms(t), &k, &f);
        }
        b.handle_answer(ms(3), &k, quota(40));
        b.poll_renewals(ms(4));
        b.handle_grant(ms(5), &k, false, ms(1000), None);
        assert_eq!(b.try_spend(ms(6), &k, 1), Spend::NoLease);
        // And it may be asked again.
        assert_eq!(b.poll_renewals(ms(7)).len(), 1);
    }

    #[test]
    fn spent_lease_is_renewed_while_hot_and_not_when_cold() {
        let mut b = book();
        let f = fields("a");
        let k = LeaseKey::new(&f);
        for t in 0..3 {
            b.note_call(ms(t), &k, &f);
        }
        b.handle_answer(ms(3), &k, quota(20));
        b.poll_renewals(ms(4));
        b.handle_grant(ms(5), &k, true, ms(1000), None);
        assert!(b.poll_renewals(ms(6)).is_empty(), "lease live");
        assert!(matches!(
            b.try_spend(ms(7), &k, 2),
            Spend::Admitted { left: 0 }
        ));
        assert_eq!(b.poll_renewals(ms(8)).len(), 1, "spent and still hot");
        b.handle_renewal_failed(&k);
        // Two windows later without calls the set is cold and forgotten.
        assert!(b.poll_renewals(ms(2500)).is_empty());
        b.handle_timeout(ms(2500));
        assert!(b.is_empty());
    }

    #[test]
    fn key_cap_holds() {
        let mut b = LeaseBook::new(LeaseConfig {
            max_keys: 2,
            ..LeaseConfig::default()
        });
        for u in ["a", "b", "c"] {
            let f = fields(u);
            b.note_call(ms(0), &LeaseKey::new(&f), &f);
        }
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn demand_of_the_previous_window_counts_and_older_does_not() {
        let mut b = book();
        let f = fields("a");
        let k = LeaseKey::new(&f);
        for t in 0..6 {
            b.note_call(ms(t), &k, &f);
        }
        b.handle_answer(ms(6), &k, quota(1000));
        // Next window: one call so far, but six in the previous one.
        b.note_call(ms(1001), &k, &f);
        assert_eq!(b.poll_renewals(ms(1002))[0].cost, 6);
        b.handle_renewal_failed(&k);
        // Many windows later the old demand is forgotten (and the set is
        // cold again until it is called enough).
        b.note_call(ms(9000), &k, &f);
        assert!(b.poll_renewals(ms(9001)).is_empty());
    }
}
