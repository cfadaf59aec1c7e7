//! Delayed leave events handed over to the server (MSC4195's delegation, as
//! lk-jwt-service offers it). A MatrixRTC client schedules its membership's leave as a
//! delayed event and, rather than restarting it every few seconds itself, hands it to
//! the server: while the member's participant is in the built-in SFU's call the leave
//! is kept waiting (restarted before it is due); once the participant has left the call
//! (hung up, or gone past the SFU's resume window) the leave is sent at once. Others
//! then see a crashed client leave within seconds, not after the hour-long delay a
//! delegating client picks.
//!
//! Who is in which call comes from the SFU ([`CallLeaves::joined`], [`CallLeaves::left`]);
//! the delegation itself is stored with the delayed event, so that it is watched again
//! after a restart of the server (which ended every call: the participant has a while
//! to come back before its leave is sent).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ruma::UserId;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::Instrument;
use trellis_core::{Error, Result, error::code, now_millis};

use crate::{Services, delayed_events::Action};

/// A participant of one of the SFU's calls: its LiveKit room and identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SfuSeat {
    pub room: String,
    pub identity: String,
}

/// How long a handed-over leave waits for its participant to be in the call: when it
/// was handed over before the participant joined, or was watched again after a restart.
/// Past that it is sent.
const CONNECT_WAIT: Duration = Duration::from_secs(60);
/// The longest a watch sleeps before looking again (clocks may jump).
const LONGEST_SLEEP: Duration = Duration::from_secs(60);
/// After a restart failed for another reason than the event being gone.
const RETRY: Duration = Duration::from_secs(10);

struct Watch {
    delay_id: String,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    /// Connections per participant: a participant that rejoins may be counted in before
    /// its old connection is counted out.
    present: HashMap<SfuSeat, usize>,
    watches: HashMap<SfuSeat, Watch>,
}

#[derive(Default)]
pub struct CallLeaves {
    /// The built-in SFU runs and reports who is in its calls; without it nothing tells
    /// when a participant leaves, so nothing is taken over.
    offered: AtomicBool,
    state: Mutex<State>,
}

impl CallLeaves {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether leaves may be handed over here.
    pub fn offered(&self) -> bool {
        self.offered.load(Ordering::Acquire)
    }

    /// The built-in SFU runs: leaves may be handed over, and those handed over before a
    /// restart are watched again.
    pub fn attach(services: &Arc<Services>) {
        services.call_leaves.offered.store(true, Ordering::Release);
        match services.delayed_events.delegated() {
            Ok(delegated) => {
                for (delay_id, seat) in delegated {
                    services.call_leaves.watch(services, seat, delay_id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the leaves handed over failed"),
        }
    }

    /// The SFU took `identity` into the call `room`.
    pub fn joined(&self, room: &str, identity: &str) {
        let seat = SfuSeat { room: room.to_owned(), identity: identity.to_owned() };
        let mut state = self.state();
        *state.present.entry(seat.clone()).or_default() += 1;
        if let Some(watch) = state.watches.get(&seat) {
            watch.wake.notify_one();
        }
    }

    /// The SFU took `identity` out of the call `room`.
    pub fn left(&self, room: &str, identity: &str) {
        let seat = SfuSeat { room: room.to_owned(), identity: identity.to_owned() };
        let mut state = self.state();
        if let Some(count) = state.present.get_mut(&seat) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.present.remove(&seat);
            }
        }
        if let Some(watch) = state.watches.get(&seat) {
            watch.wake.notify_one();
        }
    }

    /// Takes over `delay_id`, one of `user`'s waiting delayed events: sent when `seat`
    /// leaves its call. A leave handed over for the same participant before is no
    /// longer watched (it runs out on its own delay).
    pub async fn delegate(
        services: &Arc<Services>,
        user: &UserId,
        seat: SfuSeat,
        delay_id: &str,
    ) -> Result<()> {
        if !services.call_leaves.offered() {
            return Err(Error::unrecognized("This server's SFU does not take over delayed leaves"));
        }
        services.delayed_events.delegate(user, delay_id, &seat).await?;
        tracing::info!(delay_id, room = %seat.room, "a delayed leave was handed over");
        services.metrics.sfu.leaves_handed_over.inc();
        services.call_leaves.watch(services, seat, delay_id.to_owned());
        Ok(())
    }

    fn watch(&self, services: &Arc<Services>, seat: SfuSeat, delay_id: String) {
        let wake = Arc::new(Notify::new());
        let watch = Watch { delay_id: delay_id.clone(), wake: wake.clone() };
        if let Some(previous) = self.state().watches.insert(seat.clone(), watch) {
            // It sees it was replaced and ends.
            previous.wake.notify_one();
        }
        let span = tracing::info_span!("delegated_leave", %delay_id, room = %seat.room);
        tokio::spawn(run(services.clone(), seat, delay_id, wake).instrument(span));
    }

    /// Whether `seat` is in its call, or `None` when the watch of `delay_id` was
    /// replaced by another.
    fn look(&self, seat: &SfuSeat, delay_id: &str) -> Option<bool> {
        let state = self.state();
        let current = state.watches.get(seat).is_some_and(|w| w.delay_id == delay_id);
        current.then(|| state.present.contains_key(seat))
    }

    /// Ends the watch of `delay_id` (unless another replaced it).
    fn forget(&self, seat: &SfuSeat, delay_id: &str) {
        let mut state = self.state();
        if state.watches.get(seat).is_some_and(|w| w.delay_id == delay_id) {
            state.watches.remove(seat);
        }
    }

    /// Participants with a leave watched (for tests and the admin view).
    pub fn watched(&self) -> usize {
        self.state().watches.len()
    }
}

/// What a watch does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The participant left (or never came): the leave goes out.
    Send,
    Restart,
    Sleep(Duration),
}

/// The next step for a watched leave: `present` says whether the participant is in the
/// call, `seen` whether it ever was since the watch began, `restart_due` (ms) when the
/// delayed event wants restarting (when 80 % of its delay has run).
fn next_step(
    present: bool,
    seen: bool,
    now: Instant,
    connect_by: Instant,
    now_ms: u64,
    restart_due: u64,
) -> Step {
    if !present {
        if seen || now >= connect_by {
            return Step::Send;
        }
        return Step::Sleep(connect_by - now);
    }
    if now_ms >= restart_due {
        return Step::Restart;
    }
    Step::Sleep(Duration::from_millis(restart_due - now_ms))
}

fn restart_due(running_since: u64, delay_ms: u64) -> u64 {
    running_since.saturating_add(delay_ms / 5 * 4)
}

fn gone(e: &Error) -> bool {
    e.errcode == code::NOT_FOUND
}

/// Watches one handed-over leave until it is sent, the client finishes it itself, or
/// another replaces it.
async fn run(services: Arc<Services>, seat: SfuSeat, delay_id: String, wake: Arc<Notify>) {
    let leaves = &services.call_leaves;
    let delayed = &services.delayed_events;
    let connect_by = Instant::now() + CONNECT_WAIT;
    let mut seen = false;
    loop {
        let Some(present) = leaves.look(&seat, &delay_id) else { return };
        seen |= present;
        let Some(record) = delayed.waiting_record(&delay_id).ok().flatten() else {
            // Sent or cancelled: by the client itself, or its delay ran out.
            leaves.forget(&seat, &delay_id);
            return;
        };
        let due = restart_due(record.running_since, record.delay_ms);
        let pause = match next_step(present, seen, Instant::now(), connect_by, now_millis(), due) {
            Step::Send => {
                match delayed.update(&services, &delay_id, Action::Send, None).await {
                    Ok(()) => {
                        tracing::info!("the participant left the call: its leave was posted");
                        services.metrics.sfu.leaves_posted.inc();
                    }
                    Err(e) if gone(&e) => {}
                    Err(e) => tracing::warn!(error = %e, "sending a handed-over leave failed"),
                }
                leaves.forget(&seat, &delay_id);
                return;
            }
            Step::Restart => {
                match delayed.update(&services, &delay_id, Action::Restart, None).await {
                    Ok(()) => continue,
                    Err(e) if gone(&e) => {
                        leaves.forget(&seat, &delay_id);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "restarting a handed-over leave failed");
                        RETRY
                    }
                }
            }
            Step::Sleep(pause) => pause,
        };
        tokio::select! {
            () = tokio::time::sleep(pause.min(LONGEST_SLEEP)) => {}
            () = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leave_goes_out_once_its_participant_has_gone() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        // In the call, the delay far from running out: it sleeps until the restart.
        assert_eq!(
            next_step(true, true, now, later, 1_000, 61_000),
            Step::Sleep(Duration::from_secs(60))
        );
        // Left after being there: sent at once, however long the delay has to run.
        assert_eq!(next_step(false, true, now, later, 1_000, 61_000), Step::Send);
        // Not there yet: it waits for the participant until the connect deadline...
        assert_eq!(
            next_step(false, false, now, later, 1_000, 61_000),
            Step::Sleep(Duration::from_secs(30))
        );
        // ...and sends the leave if it never came.
        assert_eq!(next_step(false, false, later, later, 1_000, 61_000), Step::Send);
    }

    #[test]
    fn a_leave_is_restarted_when_four_fifths_of_its_delay_have_run() {
        let now = Instant::now();
        // An hour's delay started at t=0 wants restarting at 48 minutes.
        let due = restart_due(0, 3_600_000);
        assert_eq!(due, 2_880_000);
        assert_eq!(
            next_step(true, true, now, now, due - 1, due),
            Step::Sleep(Duration::from_millis(1))
        );
        assert_eq!(next_step(true, true, now, now, due, due), Step::Restart);
        assert_eq!(restart_due(u64::MAX, 10), u64::MAX);
    }

    #[test]
    fn presence_counts_connections_and_a_replaced_watch_ends() {
        let leaves = CallLeaves::default();
        let seat = SfuSeat { room: "r".into(), identity: "i".into() };
        leaves
            .state()
            .watches
            .insert(seat.clone(), Watch { delay_id: "a".into(), wake: Arc::default() });
        assert_eq!(leaves.look(&seat, "a"), Some(false));
        // A rejoin counted in before the old connection is counted out.
        leaves.joined("r", "i");
        leaves.joined("r", "i");
        leaves.left("r", "i");
        assert_eq!(leaves.look(&seat, "a"), Some(true));
        leaves.left("r", "i");
        assert_eq!(leaves.look(&seat, "a"), Some(false));
        // Replaced by another delay id: the old watch sees it and stops.
        leaves
            .state()
            .watches
            .insert(seat.clone(), Watch { delay_id: "b".into(), wake: Arc::default() });
        assert_eq!(leaves.look(&seat, "a"), None);
        leaves.forget(&seat, "a");
        assert_eq!(leaves.watched(), 1, "forgetting a replaced watch leaves the new one");
        leaves.forget(&seat, "b");
        assert_eq!(leaves.watched(), 0);
    }
}
