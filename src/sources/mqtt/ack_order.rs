//! PUBACKs in arrival order, whichever protocol: MQTT requires a client to acknowledge QoS 1
//! PUBLISHes in the order they arrived (3.1.1 section 4.6.0-2, 5.0 section 4.6), while courier's
//! deliveries finish in any order. The **sequencer** task receives "done" marks in any order and
//! sends PUBACKs for the longest done prefix ([`AckOrder`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::Client;
use crate::sources::{AckFuture, AckHandle};

/// What the sequencer is told.
pub(super) enum SeqCmd {
    /// A new connection: numbering restarts.
    NewSession(u64),
    /// Message `seq` of connection `generation` is settled.
    Done {
        generation: u64,
        seq: u64,
        pkid: u16,
    },
    /// Answer once every PUBACK due so far is queued.
    Flush(oneshot::Sender<()>),
}

/// Sends PUBACKs in arrival order. Runs apart from the driver, so a full request channel only
/// delays acks; it never stops the event loop from being polled.
///
/// Connections are numbered by `link`, which the driver moves on at every connect and every
/// loss. A PUBACK goes out only while `link` still names the connection its message came on: once
/// that connection is lost, the broker redelivers the message, and the PUBACK belongs to that
/// delivery.
pub(super) async fn sequence<C: Client>(
    client: C,
    mut commands: mpsc::UnboundedReceiver<SeqCmd>,
    link: Arc<AtomicU64>,
) {
    let mut order = AckOrder::default();
    let mut ready = Vec::new();
    while let Some(command) = commands.recv().await {
        match command {
            SeqCmd::NewSession(generation) => order.new_session(generation),
            SeqCmd::Done {
                generation,
                seq,
                pkid,
            } => {
                order.done(generation, seq, pkid, &mut ready);
                for pkid in ready.drain(..) {
                    if link.load(Ordering::Acquire) != generation {
                        tracing::debug!(
                            pkid,
                            "connection lost; PUBACK dropped, the broker will redeliver"
                        );
                        continue;
                    }
                    if let Err(error) = client.ack(pkid).await {
                        tracing::debug!(%error, pkid, "PUBACK not queued; the broker will redeliver");
                    }
                }
            }
            SeqCmd::Flush(done) => {
                tracing::debug!(
                    next = order.next,
                    waiting = order.waiting(),
                    "PUBACKs flushed at shutdown"
                );
                let _ = done.send(());
            }
        }
    }
}

/// The in-order ack rule, apart from any I/O: messages are numbered 0, 1, 2… per connection
/// (`generation`); a PUBACK may go out for message n only once 0..=n are all done.
///
/// Marks from an earlier connection are ignored: the broker redelivers those messages on the
/// resumed session, and their PUBACK belongs to the new delivery.
#[derive(Debug, Default)]
pub struct AckOrder {
    generation: u64,
    next: u64,
    done: BTreeMap<u64, u16>,
}

impl AckOrder {
    /// A new connection: numbering restarts and marks still waiting are forgotten.
    pub fn new_session(&mut self, generation: u64) {
        self.generation = generation;
        self.next = 0;
        self.done.clear();
    }

    /// Marks message `seq` done; appends to `ready` the packet ids that may be acked now, in order.
    pub fn done(&mut self, generation: u64, seq: u64, pkid: u16, ready: &mut Vec<u16>) {
        if generation != self.generation || seq < self.next {
            return;
        }
        self.done.insert(seq, pkid);
        while let Some(pkid) = self.done.remove(&self.next) {
            ready.push(pkid);
            self.next += 1;
        }
    }

    /// Messages done but held behind an earlier one still in delivery.
    pub fn waiting(&self) -> usize {
        self.done.len()
    }
}

/// The ack handle of one QoS 1 message.
pub(super) struct MqttAck {
    pub(super) generation: u64,
    pub(super) seq: u64,
    pub(super) pkid: u16,
    pub(super) sequencer: mpsc::UnboundedSender<SeqCmd>,
}

impl AckHandle for MqttAck {
    /// Hands the mark to the sequencer and returns at once: the PUBACK itself goes out when every
    /// earlier message is done too, so a slow message never holds a pipeline slot of a later one.
    fn ack(self: Box<Self>) -> AckFuture {
        let sent = self.sequencer.send(SeqCmd::Done {
            generation: self.generation,
            seq: self.seq,
            pkid: self.pkid,
        });
        Box::pin(async move {
            sent.map_err(|_| "the MQTT source stopped; the broker will redeliver".to_string())
        })
    }
}

/// QoS 0 messages have nothing to acknowledge.
pub(super) struct NoAck;

impl AckHandle for NoAck {
    fn ack(self: Box<Self>) -> AckFuture {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_leave_in_arrival_order() {
        let mut order = AckOrder::default();
        order.new_session(1);
        let mut ready = Vec::new();
        order.done(1, 2, 102, &mut ready);
        order.done(1, 1, 101, &mut ready);
        assert!(ready.is_empty(), "0 is still in delivery");
        assert_eq!(order.waiting(), 2);
        order.done(1, 0, 100, &mut ready);
        assert_eq!(ready, vec![100, 101, 102]);
        ready.clear();
        order.done(1, 3, 103, &mut ready);
        assert_eq!(ready, vec![103]);
    }

    /// Records the PUBACKs it is asked to queue.
    #[derive(Clone, Default)]
    struct Recording(Arc<std::sync::Mutex<Vec<u16>>>);

    impl Client for Recording {
        async fn subscribe(&self, _: Vec<String>, _: u8) -> Result<(), String> {
            Ok(())
        }
        async fn ack(&self, pkid: u16) -> Result<(), String> {
            self.0.lock().expect("acks").push(pkid);
            Ok(())
        }
        fn try_disconnect(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// A PUBACK whose connection was lost before it could be queued is not queued at all, even
    /// before the next connection's CONNACK: it would go out on that connection.
    #[tokio::test]
    async fn no_puback_is_queued_once_its_connection_is_lost() {
        let client = Recording::default();
        let link = Arc::new(AtomicU64::new(1));
        let (tx, rx) = mpsc::unbounded_channel();
        let sequencer = tokio::spawn(sequence(client.clone(), rx, link.clone()));
        let done = |seq, pkid| SeqCmd::Done {
            generation: 1,
            seq,
            pkid,
        };
        tx.send(SeqCmd::NewSession(1)).unwrap();
        tx.send(done(0, 10)).unwrap();
        let (flushed, wait) = oneshot::channel();
        tx.send(SeqCmd::Flush(flushed)).unwrap();
        wait.await.unwrap();
        // The driver saw the connection fail; the session task has not heard of it yet.
        link.fetch_add(1, Ordering::AcqRel);
        tx.send(done(1, 11)).unwrap();
        // The next connection.
        let next = link.fetch_add(1, Ordering::AcqRel) + 1;
        tx.send(SeqCmd::NewSession(next)).unwrap();
        tx.send(SeqCmd::Done {
            generation: next,
            seq: 0,
            pkid: 11,
        })
        .unwrap();
        drop(tx);
        sequencer.await.unwrap();
        assert_eq!(*client.0.lock().unwrap(), vec![10, 11]);
    }

    #[test]
    fn marks_of_an_old_connection_are_dropped() {
        let mut order = AckOrder::default();
        order.new_session(1);
        let mut ready = Vec::new();
        order.done(1, 1, 11, &mut ready);
        order.new_session(2);
        assert_eq!(order.waiting(), 0);
        order.done(1, 0, 10, &mut ready);
        assert!(ready.is_empty(), "old generation ignored");
        order.done(2, 0, 20, &mut ready);
        assert_eq!(ready, vec![20]);
    }
}
