//! Confirmation near a limit, as one sans-IO state machine: the requests a
//! node has counted provisionally and is waiting to decide.
//!
//! Near a limit, `Limiter::begin_at` counts a request's hits
//! provisionally and hands them back as a [`Pending`]. [`Confirmations`]
//! takes it from there: it sends the claim to the peers (through the
//! [`Replicator`]), keeps the request under a [`Ticket`], and when the
//! claim ends (every peer waited for answered, or the claim timed out)
//! judges it with `Limiter::finish_or_yield_at`: admitted, refused and
//! given back, or, when a peer's later claim on the same keys may still be
//! undecided, yielding to it until that peer is heard from. A decided
//! request comes out of [`Confirmations::poll_confirmed`]. The node's async
//! shell only maps tickets to the tasks that wait on them; the in-memory
//! harness maps them to simulated clients. Both run this same code.
//!
//! # Calling order
//!
//! 1. [`Confirmations::begin`] for each provisional request.
//! 2. After every input to the replicator (a frame, a timeout, a peer
//!    connected or gone), [`Confirmations::settle`].
//! 3. Drain [`Confirmations::poll_confirmed`]; for a decision nobody waits
//!    for any more, [`Confirmations::abandon`].
//! 4. Drain the replicator's transmits.

use std::collections::{HashMap, VecDeque};

use crate::cluster::replication::{ClaimEvent, Replicator};
use crate::limiter::{Decided, Finished, Limiter, Pending};
use crate::time::{Clock, Nanos};

/// The name of one request under confirmation, unique within a node's run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// A request whose confirmation has ended.
#[derive(Clone, Debug)]
pub struct Confirmed {
    /// The ticket [`Confirmations::begin`] gave it.
    pub ticket: Ticket,
    /// Its decision: if allowed, its hits stay counted; if not, they were
    /// given back.
    pub decided: Decided,
    /// Its hits, for [`Confirmations::abandon`] and for the report of when
    /// it was judged ([`Pending::judged_at`]).
    pub pending: Pending,
}

/// The requests of one node waiting for their peers' answers (see the
/// module docs for the calling order).
#[derive(Debug, Default)]
pub struct Confirmations {
    waiting: HashMap<Ticket, Pending>,
    confirmed: VecDeque<Confirmed>,
}

impl Confirmations {
    /// No request waiting.
    pub fn new() -> Self {
        Confirmations::default()
    }

    /// Starts confirming a request that `Limiter::begin_at` counted
    /// provisionally: its claim goes to the peers the node waits for. With
    /// no peer to wait for it is decided at once (see
    /// [`Confirmations::poll_confirmed`]).
    pub fn begin<C: Clock>(
        &mut self,
        now: Nanos,
        pending: Pending,
        repl: &mut Replicator,
        limiter: &Limiter<C>,
    ) -> Ticket {
        let ticket = Ticket(repl.claim(now, pending.started, pending.keys(), limiter));
        self.waiting.insert(ticket, pending);
        self.settle(now, repl, limiter);
        ticket
    }

    /// Decides the requests whose claims have ended since the last call.
    pub fn settle<C: Clock>(&mut self, now: Nanos, repl: &mut Replicator, limiter: &Limiter<C>) {
        let mut gave_back = false;
        while let Some(event) = repl.poll_claim_event() {
            let (ticket, answered) = match event {
                ClaimEvent::Answered { ticket, answered } => (Ticket(ticket), Some(answered)),
                ClaimEvent::Expired { ticket } => (Ticket(ticket), None),
            };
            let Some(mut pending) = self.waiting.remove(&ticket) else {
                continue;
            };
            match limiter.finish_or_yield_at(now, &mut pending, answered.as_ref(), true) {
                Finished::Yield { blocking } => {
                    let deadline = pending.started + repl.config().claim_timeout;
                    repl.yield_to(
                        ticket.0,
                        pending.keys(),
                        blocking,
                        answered.unwrap_or_default(),
                        deadline,
                    );
                    self.waiting.insert(ticket, pending);
                }
                Finished::Decided(decided) => {
                    gave_back |= !decided.is_allowed();
                    self.confirmed.push_back(Confirmed {
                        ticket,
                        decided,
                        pending,
                    });
                }
            }
        }
        if gave_back {
            // The given-back hits leave at once: a conflicting claim may be
            // waiting for exactly that.
            repl.ship_now(now, limiter);
        }
    }

    /// The next request whose confirmation ended.
    pub fn poll_confirmed(&mut self) -> Option<Confirmed> {
        self.confirmed.pop_front()
    }

    /// Nobody waits for `confirmed` any more (its caller gave up or went
    /// away): an admitted request nobody was told about is given back.
    pub fn abandon<C: Clock>(
        &mut self,
        now: Nanos,
        confirmed: &Confirmed,
        repl: &mut Replicator,
        limiter: &Limiter<C>,
    ) {
        if confirmed.decided.is_allowed() {
            limiter.give_back(now, &confirmed.pending);
            repl.ship_now(now, limiter);
        }
    }

    /// Requests waiting for answers.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}
