//! Waiting for something to happen: the long-poll under `/sync`, sliding sync and each
//! answer of the WebSocket stream. Where they differ (how an answer is built, whether
//! it has anything, how a client's token moves on) is a [`Query`]; the order of the
//! steps, which is what keeps a wait from missing a write or doing work for nothing, is
//! [`wait`]'s alone.

use tokio::time::Instant;
use trellis_core::Result;

use crate::{Services, rooms::stream::Subscription};

/// One client's question "what is new for me since my token?", as [`wait`] asks it.
pub trait Query {
    type Answer;

    /// Registers the wake-ups this query waits for. Called before the visible position
    /// is read, so a write in between still wakes the wait.
    fn subscribe(&mut self, services: &Services) -> Result<Subscription>;

    /// The lowest position to answer at: a client may hold a token from before a restart
    /// or from the future, and must never be answered with a position below it.
    fn floor(&self) -> u64 {
        0
    }

    /// Whether an answer with nothing in it may be held back to wait for more (not for
    /// an initial sync, which answers at once).
    fn may_wait(&self) -> bool;

    /// Whether the token already covers everything up to `now`, so a build would find
    /// nothing: the wait then skips it.
    fn caught_up(&self, _now: u64) -> bool {
        false
    }

    /// The answer with everything up to position `now`.
    fn build(&mut self, services: &Services, now: u64) -> Result<Self::Answer>;

    fn has_updates(answer: &Self::Answer) -> bool;

    /// `answer`, built at `now`, had nothing and the wait goes on: move the token on to
    /// `now` (the next build starts there) and let the answer go, or keep it for
    /// [`Self::timed_out`].
    fn pass(&mut self, answer: Self::Answer, now: u64);

    /// The answer when the deadline passes with nothing new since `now`: one moving the
    /// token on. By default built afresh, so no empty answer was held during the wait.
    fn timed_out(&mut self, services: &Services, now: u64) -> Result<Self::Answer> {
        self.build(services, now)
    }
}

/// The first answer with something in it, or an empty one at `deadline` (`None` waits
/// as long as it takes). An answer that may not wait ([`Query::may_wait`]) comes at once.
pub async fn wait<Q: Query>(
    services: &Services,
    query: &mut Q,
    deadline: Option<Instant>,
) -> Result<Q::Answer> {
    let stream = &services.rooms.stream;
    loop {
        // Subscribe before reading the position: a write in between still wakes us.
        let waiting = query.subscribe(services)?;
        let now = stream.visible().max(query.floor());
        // A deadline already reached answers now: a timer would first wait for the
        // timer wheel's next tick (a millisecond).
        let may_wait = query.may_wait() && deadline.is_none_or(|d| Instant::now() < d);
        // Every part of an answer is written at a stream position, so a token at the
        // visible position has nothing to fetch: wait first instead of building an
        // empty answer (a receiver re-polls after every message, and that build was
        // half of what delivering it cost).
        if !(may_wait && query.caught_up(now)) {
            let answer = query.build(services, now)?;
            if !may_wait || Q::has_updates(&answer) {
                return Ok(answer);
            }
            // Nothing up to `now`: wait from there. A query that can move its token
            // lets the answer go (10,000 waiting polls held 11 MB of empty answers).
            query.pass(answer, now);
        }
        // The subscription was made before `now` was read: nothing after it is missed.
        let woken = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, waiting.woken()).await.is_ok(),
            None => {
                waiting.woken().await;
                true
            }
        };
        if !woken {
            return query.timed_out(services, now);
        }
    }
}
