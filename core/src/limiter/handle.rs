//! Pre-resolved checks for a caller that checks the same descriptors again
//! and again (a connection's client, a middleware's hot user, a job queue).
//!
//! [`Limiter::handle`] does once what [`Limiter::check`] does on every call
//! before touching a counter: it validates nothing more (the descriptors are
//! already [`Descriptors`]), checks the endpoint list, matches the rules and
//! digests the keys. [`Handle::check`] then goes straight to the key tables.
//! A handle notices a rule reload (one atomic load per check) and resolves
//! again from its own copy of the descriptors, so its decisions are always
//! those `check` would make under the rules in force.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::evaluate::{Begun, Match, Matches, Targets};
use super::table::NO_HINT;
use super::{CheckError, Compiled, Decision, Limiter};
use crate::descriptor::Descriptors;
use crate::time::{Clock, Nanos};

/// Checks of one descriptor set, resolved in advance (see the module docs).
///
/// A handle borrows its limiter and is used by one caller at a time
/// (`check` takes `&mut self`); threads that check the same key each take
/// their own, which costs one resolution.
pub struct Handle<'l, C: Clock> {
    limiter: &'l Limiter<C>,
    /// An owned copy of the descriptors, to resolve again after a reload.
    fields: Box<[(Box<str>, Box<str>)]>,
    /// The limiter's rule generation that `matches` was resolved under.
    generation: u64,
    compiled: Arc<Compiled>,
    /// The limits and keys, sorted (the lock order).
    matches: Box<[Match]>,
    /// Where the key of a handle with one limit was last found in its
    /// table, tried before the table's index.
    hint: u32,
}

impl<C: Clock> Limiter<C> {
    /// Resolves `d` for repeated checks: see [`Handle`]. Fails as
    /// [`Limiter::check`] would on an endpoint outside the rules' list.
    pub fn handle(&self, d: &Descriptors<'_>) -> Result<Handle<'_, C>, CheckError> {
        let fields = d
            .iter()
            .map(|(n, v)| (Box::from(n), Box::from(v)))
            .collect();
        let mut handle = Handle {
            limiter: self,
            fields,
            generation: 0,
            compiled: self.compiled.load_full(),
            matches: Box::new([]),
            hint: NO_HINT,
        };
        handle.resolve()?;
        Ok(handle)
    }
}

impl<C: Clock> Handle<'_, C> {
    /// Checks a request of `cost` hits now: the decision [`Limiter::check`]
    /// would make for the handle's descriptors.
    pub fn check(&mut self, cost: u32) -> Result<Decision, CheckError> {
        self.check_at(self.limiter.clock.now(), cost)
    }

    /// [`Handle::check`] at an explicit time.
    pub fn check_at(&mut self, now: Nanos, cost: u32) -> Result<Decision, CheckError> {
        if self.limiter.generation.load(Ordering::Acquire) != self.generation {
            self.resolve()?;
        }
        if !self.limiter.is_admitting() {
            return Err(CheckError::Recovering);
        }
        let limiter = self.limiter;
        if let (None, &[m]) = (&limiter.cluster, &*self.matches) {
            // One limit, no peers: straight to the entry where the key was
            // last found.
            let targets = Targets::rules(&self.compiled);
            let (table, limit) = (targets.table(m.target), targets.limit(m.target));
            return Ok(limiter.decide_alone(table, limit, now, m.key, cost, &mut self.hint));
        }
        let targets = Targets::rules(&self.compiled);
        match limiter.decide(&targets, now, &self.matches, &[cost], false) {
            Begun::Decided(decided) => Ok(decided.decision()),
            Begun::Confirm(p) => {
                limiter.give_back(now, &p);
                Ok(limiter.denied_for_now(&p).decision())
            }
        }
    }

    /// How many limits apply to the handle's descriptors under the rules in
    /// force when it last resolved.
    pub fn limits(&self) -> usize {
        self.matches.len()
    }

    /// Matches the rules in force and digests the keys again.
    fn resolve(&mut self) -> Result<(), CheckError> {
        let limiter = self.limiter;
        // The generation first: a reload racing with this resolution leaves
        // it older than the rules read, so the next check resolves again.
        let generation = limiter.generation.load(Ordering::Acquire);
        let compiled = limiter.compiled.load_full();
        let pairs: Vec<(&str, &str)> = self.fields.iter().map(|(n, v)| (&**n, &**v)).collect();
        // The fields were valid descriptors when the handle was made.
        let d = Descriptors::new(&pairs)?;
        let mut matches = Matches::new();
        limiter.resolve(&compiled, &d, 0, &mut matches)?;
        matches.sort();
        self.matches = matches.as_slice().into();
        self.compiled = compiled;
        self.generation = generation;
        self.hint = NO_HINT;
        Ok(())
    }
}
