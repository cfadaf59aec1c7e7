//! A send-side bandwidth estimate for each receiving connection, from the transport-wide
//! congestion feedback its receiver sends (draft-holmer-rmcat-transport-wide-cc-extensions).
//!
//! Every packet a connection sends is stamped with a transport-wide sequence number and
//! its send time kept; each feedback says which of them arrived and when. The estimate
//! follows Google Congestion Control (draft-ietf-rmcat-gcc): a delay-based rate, which
//! falls when packets start arriving later and later than they were sent (the trendline
//! of the queueing delay crosses an adaptive threshold) and otherwise climbs, capped by
//! a loss-based one. It is handed on as the REMB a receiver would otherwise send, so the
//! rest of the SFU reads one kind of estimate. Receivers that get stamped packets send
//! this feedback instead of REMB (libwebrtc does), so this is the estimate they get.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Instant,
};

use async_trait::async_trait;
use webrtc::{
    interceptor::{
        Attributes, Interceptor, InterceptorBuilder, RTCPReader, RTCPWriter, RTPReader, RTPWriter,
        stream_info::StreamInfo,
    },
    rtcp::{
        packet::Packet as RtcpPacket,
        payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate,
        transport_feedbacks::transport_layer_cc::{
            PacketStatusChunk, SymbolTypeTcc, TransportLayerCc,
        },
    },
    rtp::extension::transport_cc_extension::TransportCcExtension,
};
use webrtc_util::{Marshal, MarshalSize};

type Result<T> = std::result::Result<T, webrtc::interceptor::Error>;

/// Sent packets remembered for their feedback: several seconds of video at the rates a
/// receiver gets.
const HISTORY: usize = 8192;
/// Where the estimate starts: enough for a camera's top simulcast layer, so a receiver
/// on a good network is not held to a low one while the estimate climbs.
const START_BPS: f64 = 2_500_000.0;
const MIN_BPS: f64 = 50_000.0;
const MAX_BPS: f64 = 100_000_000.0;
/// Growth while the network shows no queueing: 8 % a second, as GCC's multiplicative
/// increase.
const GROWTH_PER_SECOND: f64 = 1.08;
/// Packets sent within this span are one group for the delay comparison (a video frame's
/// packets leave together).
const GROUP_US: i64 = 5_000;
/// Delay-variation points the trendline is fitted over.
const TREND_WINDOW: usize = 20;
const TREND_GAIN: f64 = 4.0;
/// The first hold after a loss-based decrease, its longest, and how long a loss is
/// remembered for doubling it.
const LOSS_BACKOFF_MIN_US: i64 = 2_000_000;
const LOSS_BACKOFF_MAX_US: i64 = 60_000_000;
const LOSS_MEMORY_US: i64 = 60_000_000;
/// How far back the received rate is measured.
const ACKED_WINDOW_US: i64 = 1_000_000;

/// Adds the estimator to every peer connection made from the registry.
pub struct Builder;

impl InterceptorBuilder for Builder {
    fn build(&self, _id: &str) -> Result<Arc<dyn Interceptor + Send + Sync>> {
        Ok(Arc::new(Congestion { shared: Arc::new(Shared::new()) }))
    }
}

/// One peer connection's stamps, history and estimate.
struct Congestion {
    shared: Arc<Shared>,
}

/// The history is locked for every packet sent; the estimator only for feedback, and
/// apart, so that sending never waits for the estimator.
struct Shared {
    epoch: Instant,
    history: Mutex<History>,
    estimator: Mutex<Estimator>,
}

struct History {
    /// The sequence number (unwrapped) the next packet gets.
    next: u64,
    /// Sent packets from `next - sent.len()` on.
    sent: VecDeque<Sent>,
}

#[derive(Clone, Copy)]
struct Sent {
    at_us: i64,
    size: u32,
    report: Report,
}

/// What feedback said of a sent packet so far. A packet reported lost may be reported
/// received later (it arrived late: libwebrtc reports it again, and webrtc-rs marks
/// packets not received around a late one); one reported received stays so. The same
/// feedback also reaches this connection once per stream it names (webrtc-srtp hands a
/// compound packet to each destination), so a packet is counted once.
#[derive(Clone, Copy, PartialEq)]
enum Report {
    None,
    Lost,
    Received,
}

impl Shared {
    fn new() -> Self {
        Shared {
            epoch: Instant::now(),
            history: Mutex::new(History { next: 0, sent: VecDeque::with_capacity(256) }),
            estimator: Mutex::new(Estimator::new()),
        }
    }

    fn now_us(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next sequence number, with the packet remembered as sent now.
    fn stamp(&self, size: usize) -> u16 {
        let mut history = self.history();
        // Read under the lock, so send times rise with sequence numbers.
        let at_us = self.now_us();
        let seq = history.next;
        history.next += 1;
        if history.sent.len() == HISTORY {
            history.sent.pop_front();
        }
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        history.sent.push_back(Sent { at_us, size, report: Report::None });
        seq as u16
    }

    /// Reads a feedback against the history; the new estimate (bits per second).
    fn feedback(&self, fb: &TransportLayerCc) -> Option<f64> {
        let results = {
            let mut history = self.history();
            let History { next, sent } = &mut *history;
            let first = *next - sent.len() as u64;
            let base = unwrap_seq(*next, fb.base_sequence_number)?;
            let mut results = Vec::new();
            for (i, fate) in fates(fb).into_iter().enumerate() {
                let seq = base + i as u64;
                if seq < first || seq >= *next {
                    continue;
                }
                let packet = &mut sent[(seq - first) as usize];
                let was_lost = match (packet.report, fate) {
                    (Report::None, Fate::Lost) => false,
                    (Report::None | Report::Lost, Fate::Received(_)) => {
                        packet.report == Report::Lost
                    }
                    _ => continue,
                };
                packet.report =
                    if matches!(fate, Fate::Lost) { Report::Lost } else { Report::Received };
                results.push(PacketResult {
                    sent_us: packet.at_us,
                    size: packet.size,
                    fate,
                    was_lost,
                });
            }
            results
        };
        if results.is_empty() {
            return None;
        }
        let now_us = self.now_us();
        let mut estimator = self.estimator.lock().unwrap_or_else(|e| e.into_inner());
        Some(estimator.update(now_us, &results))
    }
}

/// The unwrapped sequence number nearest below `next` whose low 16 bits are `seq`.
fn unwrap_seq(next: u64, seq: u16) -> Option<u64> {
    let last = next.checked_sub(1)?;
    let behind = u64::from((last as u16).wrapping_sub(seq));
    last.checked_sub(behind)
}

/// What became of each packet a feedback reports on, in sequence order: lost, or
/// received with its arrival time (microseconds on the receiver's clock) when given.
fn fates(fb: &TransportLayerCc) -> Vec<Fate> {
    // No more than the history holds: the count is the receiver's word.
    let count = usize::from(fb.packet_status_count).min(HISTORY);
    let mut symbols = Vec::with_capacity(count);
    for chunk in &fb.packet_chunks {
        match chunk {
            PacketStatusChunk::RunLengthChunk(run) => {
                let n = usize::from(run.run_length).min(count - symbols.len());
                symbols.extend(std::iter::repeat_n(run.packet_status_symbol, n));
            }
            PacketStatusChunk::StatusVectorChunk(vector) => {
                for symbol in &vector.symbol_list {
                    if symbols.len() < count {
                        symbols.push(*symbol);
                    }
                }
            }
        }
        if symbols.len() >= count {
            break;
        }
    }
    let mut at = i64::from(fb.reference_time) * 64_000;
    let mut deltas = fb.recv_deltas.iter();
    symbols
        .into_iter()
        .map(|symbol| match symbol {
            SymbolTypeTcc::PacketReceivedSmallDelta | SymbolTypeTcc::PacketReceivedLargeDelta => {
                Fate::Received(deltas.next().map(|delta| {
                    at += delta.delta;
                    at
                }))
            }
            SymbolTypeTcc::PacketReceivedWithoutDelta => Fate::Received(None),
            SymbolTypeTcc::PacketNotReceived => Fate::Lost,
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Lost,
    /// With its arrival time, when the feedback gives one.
    Received(Option<i64>),
}

/// A packet's fate as a feedback reports it.
#[derive(Clone, Copy, Debug)]
struct PacketResult {
    sent_us: i64,
    size: u32,
    fate: Fate,
    /// An earlier feedback reported it lost.
    was_lost: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Usage {
    Normal,
    Over,
    Under,
}

/// A packet group: packets sent within `GROUP_US` of its first.
#[derive(Clone, Copy)]
struct Group {
    first_sent_us: i64,
    last_sent_us: i64,
    last_arrival_us: i64,
}

impl Group {
    fn starting(sent_us: i64, arrival_us: i64) -> Self {
        Group { first_sent_us: sent_us, last_sent_us: sent_us, last_arrival_us: arrival_us }
    }
}

/// GCC's estimator, fed one feedback at a time.
struct Estimator {
    rate: f64,
    loss_cap: f64,
    last_update_us: Option<i64>,
    /// Bytes each feedback reported received, by when it came (our clock, not the
    /// receiver's, which is its word and wraps), over the last `ACKED_WINDOW_US`, and
    /// their sum.
    acked: VecDeque<(i64, u64)>,
    acked_bytes: u64,
    current: Option<Group>,
    previous: Option<Group>,
    /// The trendline's input: accumulated and smoothed delay variation (ms) by arrival (ms).
    accumulated: f64,
    smoothed: f64,
    first_arrival_us: Option<i64>,
    points: VecDeque<(f64, f64)>,
    deltas: u32,
    threshold: f64,
    last_trend: f64,
    over_count: u32,
    usage: Usage,
    last_threshold_us: Option<i64>,
    /// Loss counted since the last loss decision.
    received: u32,
    lost: u32,
    loss_since_us: Option<i64>,
    /// After a loss-based decrease the cap is held this long before it climbs again,
    /// twice as long each time loss comes back within `LOSS_MEMORY_US`: on a link that
    /// drops rather than queues (a policer), the only test of a higher rate is loss.
    loss_backoff_us: i64,
    loss_hold_until_us: i64,
    last_loss_decrease_us: Option<i64>,
}

impl Estimator {
    fn new() -> Self {
        Estimator {
            rate: START_BPS,
            loss_cap: f64::MAX,
            last_update_us: None,
            acked: VecDeque::new(),
            acked_bytes: 0,
            current: None,
            previous: None,
            accumulated: 0.0,
            smoothed: 0.0,
            first_arrival_us: None,
            points: VecDeque::with_capacity(TREND_WINDOW + 1),
            deltas: 0,
            threshold: 12.5,
            last_trend: 0.0,
            over_count: 0,
            usage: Usage::Normal,
            last_threshold_us: None,
            received: 0,
            lost: 0,
            loss_since_us: None,
            loss_backoff_us: LOSS_BACKOFF_MIN_US,
            loss_hold_until_us: 0,
            last_loss_decrease_us: None,
        }
    }

    /// Takes one feedback's packets (in sequence order); the estimate after it.
    fn update(&mut self, now_us: i64, results: &[PacketResult]) -> f64 {
        let mut bytes = 0;
        for r in results {
            match r.fate {
                Fate::Received(arrival) => {
                    self.received += 1;
                    if r.was_lost {
                        self.lost = self.lost.saturating_sub(1);
                    }
                    bytes += u64::from(r.size);
                    if let Some(arrival) = arrival {
                        self.packet_arrived(r.sent_us, arrival);
                    }
                }
                Fate::Lost => self.lost += 1,
            }
        }
        if bytes > 0 {
            self.acked.push_back((now_us, bytes));
            self.acked_bytes += bytes;
        }
        // One entry per feedback, which comes from the receiver at its pace: bounded by
        // count as well as by age.
        while let Some(&(at, old)) = self.acked.front() {
            if self.acked.len() <= HISTORY && at >= now_us - ACKED_WINDOW_US {
                break;
            }
            self.acked.pop_front();
            self.acked_bytes -= old;
        }
        self.update_loss(now_us);
        self.update_rate(now_us);
        let estimate = self.rate.min(self.loss_cap).clamp(MIN_BPS, MAX_BPS);
        if estimate.is_finite() { estimate } else { MIN_BPS }
    }

    /// The rate the receiver got over the last second, bits per second.
    fn acked_bps(&self) -> Option<f64> {
        let (first, _) = *self.acked.front()?;
        let (last, _) = *self.acked.back()?;
        // Feedback comes every 50-100 ms: a shorter span would read one as a burst.
        let span = (last - first).max(250_000) as f64 / 1e6;
        Some(self.acked_bytes as f64 * 8.0 / span)
    }

    fn packet_arrived(&mut self, sent_us: i64, arrival_us: i64) {
        let Some(mut current) = self.current else {
            self.current = Some(Group::starting(sent_us, arrival_us));
            return;
        };
        if sent_us < current.first_sent_us {
            // Reordered from an earlier group: too late to count.
            return;
        }
        if (arrival_us - current.last_arrival_us).abs() > 10_000_000 {
            // The receiver's clock jumped (its 24-bit reference time wrapped, or it
            // says so): start the delay measurement again.
            self.reset_trend();
            self.current = None;
            self.previous = None;
            return;
        }
        if sent_us - current.first_sent_us <= GROUP_US {
            current.last_sent_us = current.last_sent_us.max(sent_us);
            current.last_arrival_us = current.last_arrival_us.max(arrival_us);
            self.current = Some(current);
            return;
        }
        if let Some(previous) = self.previous {
            let send_delta = current.last_sent_us - previous.last_sent_us;
            let arrival_delta = current.last_arrival_us - previous.last_arrival_us;
            if arrival_delta >= 0 {
                let variation_ms = (arrival_delta - send_delta) as f64 / 1000.0;
                self.trend(current.last_arrival_us, variation_ms, send_delta);
            }
        }
        self.previous = Some(current);
        self.current = Some(Group::starting(sent_us, arrival_us));
    }

    /// One group's delay variation into the trendline, and the usage it shows.
    fn trend(&mut self, arrival_us: i64, variation_ms: f64, send_delta_us: i64) {
        let first = *self.first_arrival_us.get_or_insert(arrival_us);
        self.deltas = (self.deltas + 1).min(60);
        self.accumulated += variation_ms;
        self.smoothed = 0.9 * self.smoothed + 0.1 * self.accumulated;
        self.points.push_back(((arrival_us - first) as f64 / 1000.0, self.smoothed));
        if self.points.len() > TREND_WINDOW {
            self.points.pop_front();
        }
        if self.points.len() < TREND_WINDOW {
            return;
        }
        let slope = slope(&self.points).unwrap_or(0.0);
        let trend = slope * f64::from(self.deltas) * TREND_GAIN;
        self.detect(arrival_us, trend, send_delta_us);
        self.last_trend = trend;
    }

    /// GCC's overuse detector with its adaptive threshold.
    fn detect(&mut self, now_us: i64, trend: f64, send_delta_us: i64) {
        if trend > self.threshold {
            self.over_count += 1;
            // Over-use only once it lasts (two groups) and keeps growing.
            if self.over_count > 1 && send_delta_us > 0 && trend >= self.last_trend {
                self.usage = Usage::Over;
            }
        } else if trend < -self.threshold {
            self.over_count = 0;
            self.usage = Usage::Under;
        } else {
            self.over_count = 0;
            self.usage = Usage::Normal;
        }
        let elapsed_ms =
            self.last_threshold_us.map_or(0.0, |t| ((now_us - t) as f64 / 1000.0).min(100.0));
        self.last_threshold_us = Some(now_us);
        // A spike far above the threshold (a route change) does not drag it up.
        if trend.abs() < self.threshold + 15.0 {
            let k = if trend.abs() < self.threshold { 0.039 } else { 0.0087 };
            self.threshold = (self.threshold + k * (trend.abs() - self.threshold) * elapsed_ms)
                .clamp(6.0, 600.0);
        }
    }

    fn reset_trend(&mut self) {
        self.points.clear();
        self.accumulated = 0.0;
        self.smoothed = 0.0;
        self.first_arrival_us = None;
    }

    fn update_loss(&mut self, now_us: i64) {
        let since = *self.loss_since_us.get_or_insert(now_us);
        let total = self.received + self.lost;
        if total < 20 || now_us - since < 500_000 {
            return;
        }
        // GCC's loss-based rate: down by half the loss over 10 %, up 5 % under 2 % once
        // the hold is over, kept between; it stops counting once it is back above the
        // delay-based rate.
        let loss = f64::from(self.lost) / f64::from(total);
        if loss > 0.1 {
            let remembered =
                self.last_loss_decrease_us.is_some_and(|t| now_us - t < LOSS_MEMORY_US);
            if !remembered {
                self.loss_backoff_us = LOSS_BACKOFF_MIN_US;
            } else if now_us >= self.loss_hold_until_us {
                // A climb after the hold met loss again: wait longer next time.
                self.loss_backoff_us = (self.loss_backoff_us * 2).min(LOSS_BACKOFF_MAX_US);
            }
            self.loss_hold_until_us = now_us + self.loss_backoff_us;
            self.last_loss_decrease_us = Some(now_us);
            // From what got through, not from what was sent.
            let from = self.acked_bps().unwrap_or(self.rate).min(self.rate).min(self.loss_cap);
            self.loss_cap = (from * (1.0 - 0.5 * loss)).max(MIN_BPS);
        } else if loss < 0.02 && self.loss_cap < f64::MAX && now_us >= self.loss_hold_until_us {
            self.loss_cap *= 1.05;
            if self.loss_cap > self.rate {
                self.loss_cap = f64::MAX;
            }
        }
        self.received = 0;
        self.lost = 0;
        self.loss_since_us = Some(now_us);
    }

    fn update_rate(&mut self, now_us: i64) {
        let elapsed_s =
            self.last_update_us.map_or(0.0, |t| ((now_us - t) as f64 / 1e6).clamp(0.0, 1.0));
        self.last_update_us = Some(now_us);
        let acked = self.acked_bps();
        match self.usage {
            Usage::Over => {
                if let Some(acked) = acked {
                    self.rate = self.rate.min(0.85 * acked);
                }
                // Once: the next decrease needs the queue to build again.
                self.usage = Usage::Normal;
                self.reset_trend();
            }
            Usage::Under => {}
            Usage::Normal => {
                self.rate *= GROWTH_PER_SECOND.powf(elapsed_s);
                // Never far above what the receiver shows it can take: what gets sent is
                // the test of a higher rate.
                if let Some(acked) = acked {
                    self.rate = self.rate.min((1.5 * acked).max(acked + START_BPS));
                }
            }
        }
        self.rate = self.rate.clamp(MIN_BPS, MAX_BPS);
    }
}

/// The least-squares slope of `points` (y over x).
fn slope(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in points {
        num += (x - mean_x) * (y - mean_y);
        den += (x - mean_x) * (x - mean_x);
    }
    (den > 0.0).then(|| num / den)
}

#[async_trait]
impl Interceptor for Congestion {
    async fn bind_rtcp_reader(
        &self,
        reader: Arc<dyn RTCPReader + Send + Sync>,
    ) -> Arc<dyn RTCPReader + Send + Sync> {
        Arc::new(FeedbackReader { inner: reader, shared: Arc::clone(&self.shared) })
    }

    async fn bind_rtcp_writer(
        &self,
        writer: Arc<dyn RTCPWriter + Send + Sync>,
    ) -> Arc<dyn RTCPWriter + Send + Sync> {
        writer
    }

    async fn bind_local_stream(
        &self,
        info: &StreamInfo,
        writer: Arc<dyn RTPWriter + Send + Sync>,
    ) -> Arc<dyn RTPWriter + Send + Sync> {
        // Only where the receiver agreed to the extension (and so to the feedback).
        let id = info
            .rtp_header_extensions
            .iter()
            .find(|e| e.uri == webrtc::sdp::extmap::TRANSPORT_CC_URI)
            .and_then(|e| u8::try_from(e.id).ok())
            .filter(|&id| id != 0);
        match id {
            Some(id) => Arc::new(Stamper { inner: writer, id, shared: Arc::clone(&self.shared) }),
            None => writer,
        }
    }

    async fn unbind_local_stream(&self, _info: &StreamInfo) {}

    async fn bind_remote_stream(
        &self,
        _info: &StreamInfo,
        reader: Arc<dyn RTPReader + Send + Sync>,
    ) -> Arc<dyn RTPReader + Send + Sync> {
        reader
    }

    async fn unbind_remote_stream(&self, _info: &StreamInfo) {}

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Stamps each outgoing packet with the connection's next sequence number.
struct Stamper {
    inner: Arc<dyn RTPWriter + Send + Sync>,
    id: u8,
    shared: Arc<Shared>,
}

#[async_trait]
impl RTPWriter for Stamper {
    async fn write(
        &self,
        pkt: &webrtc::rtp::packet::Packet,
        attributes: &Attributes,
    ) -> Result<usize> {
        let mut pkt = pkt.clone();
        // The extension in place first (its value is two bytes whatever the number), so
        // the size recorded is what the wire carries and a packet that cannot take it is
        // never recorded as sent.
        let placeholder = TransportCcExtension { transport_sequence: 0 }.marshal()?;
        pkt.header.set_extension(self.id, placeholder)?;
        let seq = self.shared.stamp(pkt.header.marshal_size() + pkt.payload.len());
        let ext = TransportCcExtension { transport_sequence: seq }.marshal()?;
        pkt.header.set_extension(self.id, ext)?;
        self.inner.write(&pkt, attributes).await
    }
}

/// Whether a REMB is the one this module hands on: it names no sender and no stream,
/// which a receiver's own REMB always does.
pub fn is_send_side(remb: &ReceiverEstimatedMaximumBitrate) -> bool {
    remb.sender_ssrc == 0 && remb.ssrcs.is_empty()
}

/// Turns each transport-wide feedback into the REMB the estimate stands for, after it.
struct FeedbackReader {
    inner: Arc<dyn RTCPReader + Send + Sync>,
    shared: Arc<Shared>,
}

#[async_trait]
impl RTCPReader for FeedbackReader {
    async fn read(
        &self,
        buf: &mut [u8],
        attributes: &Attributes,
    ) -> Result<(Vec<Box<dyn RtcpPacket + Send + Sync>>, Attributes)> {
        let (mut packets, attributes) = self.inner.read(buf, attributes).await?;
        let mut estimate = None;
        for p in &packets {
            if let Some(fb) = p.as_any().downcast_ref::<TransportLayerCc>() {
                estimate = self.shared.feedback(fb).or(estimate);
            }
        }
        if let Some(bps) = estimate {
            tracing::trace!(bps, "send-side estimate");
            packets.push(Box::new(ReceiverEstimatedMaximumBitrate {
                sender_ssrc: 0,
                bitrate: bps as f32,
                ssrcs: Vec::new(),
            }));
        }
        Ok((packets, attributes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use webrtc::rtcp::transport_feedbacks::transport_layer_cc::{
        RecvDelta, RunLengthChunk, StatusChunkTypeTcc, StatusVectorChunk, SymbolSizeTypeTcc,
    };

    /// `frames` video frames of `per_frame` 1,200-byte packets at 30 a second, each
    /// arriving `base_ms` plus `extra_ms(frame)` after it was sent.
    fn frames(
        start_us: i64,
        frames: i64,
        per_frame: i64,
        extra_ms: impl Fn(i64) -> f64,
    ) -> Vec<PacketResult> {
        let mut out = Vec::new();
        for f in 0..frames {
            for p in 0..per_frame {
                let sent = start_us + f * 33_333 + p * 200;
                let arrival = sent + 20_000 + (extra_ms(f) * 1000.0) as i64;
                out.push(PacketResult {
                    sent_us: sent,
                    size: 1200,
                    fate: Fate::Received(Some(arrival)),
                    was_lost: false,
                });
            }
        }
        out
    }

    /// Feeds `results` in feedbacks of 100 ms; the estimate after each.
    fn feed(e: &mut Estimator, results: &[PacketResult]) -> Vec<f64> {
        let mut out = Vec::new();
        let mut batch = Vec::new();
        let mut batch_start = results[0].sent_us;
        for r in results {
            if r.sent_us - batch_start >= 100_000 {
                out.push(e.update(batch_start + 100_000, &batch));
                batch.clear();
                batch_start = r.sent_us;
            }
            batch.push(*r);
        }
        out
    }

    #[test]
    fn a_steady_network_lets_the_estimate_climb() {
        let mut e = Estimator::new();
        // 10 packets a frame: about 2.9 Mbit/s received, with no queueing.
        let rates = feed(&mut e, &frames(0, 300, 10, |_| 0.0));
        let last = *rates.last().unwrap();
        assert!(last > START_BPS * 1.5, "{last}");
        assert!(rates.iter().all(|&r| r >= START_BPS * 0.95), "never falls: {rates:?}");
    }

    #[test]
    fn growing_queueing_delay_brings_the_estimate_below_the_received_rate() {
        let mut e = Estimator::new();
        let mut all = frames(0, 90, 10, |_| 0.0);
        // Then each frame arrives 5 ms later than the one before: a queue building.
        all.extend(frames(3_000_000, 60, 10, |f| 5.0 * f as f64));
        let rates = feed(&mut e, &all);
        let last = *rates.last().unwrap();
        let received = 10.0 * 1200.0 * 8.0 * 30.0;
        assert!(last < received, "{last} against {received}");
    }

    #[test]
    fn heavy_loss_caps_the_estimate() {
        let mut e = Estimator::new();
        let mut all = frames(0, 60, 10, |_| 0.0);
        for (i, r) in all.iter_mut().enumerate() {
            if i % 4 == 0 {
                r.fate = Fate::Lost;
            }
        }
        let rates = feed(&mut e, &all);
        let last = *rates.last().unwrap();
        assert!(last < START_BPS * 0.9, "{last}");
    }

    #[test]
    fn after_loss_the_estimate_recovers_gradually() {
        let mut e = Estimator::new();
        let mut lossy = frames(0, 60, 10, |_| 0.0);
        for (i, r) in lossy.iter_mut().enumerate() {
            if i % 4 == 0 {
                r.fate = Fate::Lost;
            }
        }
        let capped = *feed(&mut e, &lossy).last().unwrap();
        let clean = frames(2_000_000, 180, 10, |_| 0.0);
        let after = feed(&mut e, &clean);
        // Seconds without loss raise it after a hold, by steps of 5 %, not back to the
        // start at once.
        assert!(after.windows(2).all(|w| w[1] <= w[0] * 1.051), "{capped} then {after:?}");
        assert!(after[0] <= capped * 1.051, "{capped} then {after:?}");
        assert!(*after.last().unwrap() > capped, "{capped} then {after:?}");
    }

    #[test]
    fn feedback_reads_runs_vectors_and_deltas() {
        let fb = TransportLayerCc {
            base_sequence_number: 65534,
            packet_status_count: 5,
            reference_time: 2,
            packet_chunks: vec![
                PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                    type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                    packet_status_symbol: SymbolTypeTcc::PacketReceivedSmallDelta,
                    run_length: 2,
                }),
                PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
                    type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
                    symbol_size: SymbolSizeTypeTcc::TwoBit,
                    symbol_list: vec![
                        SymbolTypeTcc::PacketNotReceived,
                        SymbolTypeTcc::PacketReceivedLargeDelta,
                        SymbolTypeTcc::PacketReceivedSmallDelta,
                        // Padding past the count.
                        SymbolTypeTcc::PacketReceivedSmallDelta,
                        SymbolTypeTcc::PacketReceivedSmallDelta,
                    ],
                }),
            ],
            recv_deltas: [1000, 250, -500, 750]
                .into_iter()
                .map(|delta| RecvDelta {
                    type_tcc_packet: SymbolTypeTcc::PacketReceivedSmallDelta,
                    delta,
                })
                .collect(),
            ..Default::default()
        };
        let base: i64 = 128_000;
        let at = |t: i64| Fate::Received(Some(base + t));
        assert_eq!(fates(&fb), vec![at(1000), at(1250), Fate::Lost, at(750), at(1500)]);
        // Sequence numbers wrap: 65534 is two before 0.
        assert_eq!(unwrap_seq(65_536 + 3, 65534), Some(65_534));
        assert_eq!(unwrap_seq(0, 1), None);
    }

    #[test]
    fn a_jump_in_the_receivers_clock_starts_the_delay_measurement_again() {
        let mut e = Estimator::new();
        let mut all = frames(0, 60, 10, |_| 0.0);
        // Then the receiver's reference time wraps: arrivals 12 days earlier.
        all.extend(frames(2_000_000, 60, 10, |_| -1.0e9));
        let rates = feed(&mut e, &all);
        assert!(rates.iter().all(|r| r.is_finite() && *r >= START_BPS * 0.95), "{rates:?}");
    }

    #[test]
    fn a_late_packet_first_reported_lost_counts_once_as_received() {
        let shared = Shared::new();
        for _ in 0..3 {
            shared.stamp(1000);
        }
        let report = |symbols: Vec<SymbolTypeTcc>| {
            let received =
                symbols.iter().filter(|s| **s != SymbolTypeTcc::PacketNotReceived).count();
            TransportLayerCc {
                base_sequence_number: 0,
                packet_status_count: symbols.len() as u16,
                packet_chunks: vec![PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
                    type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
                    symbol_size: SymbolSizeTypeTcc::TwoBit,
                    symbol_list: symbols,
                })],
                recv_deltas: vec![RecvDelta { delta: 1000, ..Default::default() }; received],
                ..Default::default()
            }
        };
        use SymbolTypeTcc::{PacketNotReceived as Lost, PacketReceivedSmallDelta as Got};
        assert!(shared.feedback(&report(vec![Got, Lost, Got])).is_some());
        // The late one arrives and is reported again: it counts.
        assert!(shared.feedback(&report(vec![Got, Got, Got])).is_some());
        // Reported again as lost, or received again: nothing new.
        assert!(shared.feedback(&report(vec![Got, Lost, Got])).is_none());
        assert!(shared.feedback(&report(vec![Got, Got, Got])).is_none());
        let e = shared.estimator.lock().unwrap();
        assert_eq!((e.received, e.lost), (3, 0));
    }

    #[test]
    fn feedback_matches_the_packets_sent() {
        let shared = Shared::new();
        for _ in 0..4 {
            shared.stamp(1000);
        }
        let fb = TransportLayerCc {
            base_sequence_number: 1,
            packet_status_count: 2,
            packet_chunks: vec![PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                packet_status_symbol: SymbolTypeTcc::PacketReceivedSmallDelta,
                run_length: 2,
            })],
            recv_deltas: vec![RecvDelta { delta: 0, ..Default::default() }; 2],
            ..Default::default()
        };
        assert!(shared.feedback(&fb).is_some());
        // Reported packets are not counted twice.
        assert!(shared.feedback(&fb).is_none());
    }
}
