//! The running sources, and the replacement of one when a configuration reload changes its
//! section. A replaced source stops taking messages, waits until the pipeline has settled the
//! ones it handed out (acked, or dropped unacked for the broker to redeliver), closes its
//! connection, and only then does the new one connect: for MQTT the new connection takes over
//! the same client id's session, which the old one must have let go of first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::amqp::AmqpSource;
use super::mqtt::MqttSource;
use super::{Delivery, InFlight};
use crate::config::{Config, MqttConfig, RabbitMqConfig};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::TlsSetupError;

/// How long a source that stops waits for its task to end once its messages are settled.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// The sources of a configuration, built (so that every set-up error shows before anything
/// starts) and then running.
pub struct Sources {
    amqp: Slot<RabbitMqConfig, AmqpSource>,
    mqtt: Slot<MqttConfig, MqttSource>,
    max_in_flight: usize,
    stats: Arc<Stats>,
}

/// One source: its section, and the source built but not started, or running.
struct Slot<C, S> {
    config: Option<C>,
    state: State<S>,
}

enum State<S> {
    Built(S),
    Running(Running),
    None,
}

struct Running {
    shutdown: Shutdown,
    in_flight: InFlight,
    task: JoinHandle<()>,
}

/// The sources a new configuration needs built, ready to replace the running ones.
pub struct Replacement {
    amqp: Option<Option<AmqpSource>>,
    mqtt: Option<Option<MqttSource>>,
    config: Config,
}

impl Replacement {
    /// Whether the new configuration changes any source.
    pub fn changes_anything(&self) -> bool {
        self.amqp.is_some() || self.mqtt.is_some()
    }
}

impl Sources {
    /// Builds the sources of `config`; starts nothing. Fails only when TLS cannot be set up.
    pub fn build(config: &Config, stats: Arc<Stats>) -> Result<Sources, TlsSetupError> {
        let max_in_flight = config.service.max_in_flight;
        Ok(Sources {
            amqp: Slot::built(
                config.rabbitmq.clone(),
                build_amqp(config.rabbitmq.as_ref(), max_in_flight, &stats)?,
            ),
            mqtt: Slot::built(
                config.mqtt.clone(),
                build_mqtt(config.mqtt.as_ref(), max_in_flight, &stats)?,
            ),
            max_in_flight,
            stats,
        })
    }

    /// Starts the sources built, each under a stop of its own within `shutdown`.
    pub fn start(&mut self, tx: &mpsc::Sender<Delivery>, shutdown: &Shutdown) {
        self.amqp
            .start(tx, shutdown, AmqpSource::in_flight, AmqpSource::run);
        self.mqtt
            .start(tx, shutdown, MqttSource::in_flight, MqttSource::run);
    }

    /// Builds the sources whose section `config` changes (or adds); fails, changing nothing,
    /// when one cannot be set up.
    pub fn prepare(&self, config: &Config) -> Result<Replacement, TlsSetupError> {
        let amqp = match config.rabbitmq != self.amqp.config {
            true => Some(build_amqp(
                config.rabbitmq.as_ref(),
                self.max_in_flight,
                &self.stats,
            )?),
            false => None,
        };
        let mqtt = match config.mqtt != self.mqtt.config {
            true => Some(build_mqtt(
                config.mqtt.as_ref(),
                self.max_in_flight,
                &self.stats,
            )?),
            false => None,
        };
        Ok(Replacement {
            amqp,
            mqtt,
            config: config.clone(),
        })
    }

    /// Stops each source that `replacement` changes (waiting up to `settle_within` for its
    /// messages) and starts its successor.
    pub async fn replace(
        &mut self,
        replacement: Replacement,
        tx: &mpsc::Sender<Delivery>,
        shutdown: &Shutdown,
        settle_within: Duration,
    ) {
        if let Some(amqp) = replacement.amqp {
            tracing::info!("the [rabbitmq] section changed: reconnecting RabbitMQ");
            self.amqp.stop("rabbitmq", settle_within, shutdown).await;
            if amqp.is_none() {
                self.stats.forget_source("rabbitmq");
            }
            self.amqp = Slot::built(replacement.config.rabbitmq.clone(), amqp);
            self.amqp
                .start(tx, shutdown, AmqpSource::in_flight, AmqpSource::run);
        }
        if let Some(mqtt) = replacement.mqtt {
            tracing::info!("the [mqtt] section changed: reconnecting to the MQTT broker");
            self.mqtt.stop("mqtt", settle_within, shutdown).await;
            if mqtt.is_none() {
                self.stats.forget_source("mqtt");
            }
            self.mqtt = Slot::built(replacement.config.mqtt.clone(), mqtt);
            self.mqtt
                .start(tx, shutdown, MqttSource::in_flight, MqttSource::run);
        }
    }

    /// Waits up to `within` for the running sources to end (after the whole stop drained).
    pub async fn join(self, within: Duration) {
        let tasks = [self.amqp.state.into_task(), self.mqtt.state.into_task()]
            .into_iter()
            .flatten();
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("a source did not close within {within:?}; exiting anyway");
        }
    }
}

impl<S> State<S> {
    fn into_task(self) -> Option<JoinHandle<()>> {
        match self {
            State::Running(running) => Some(running.task),
            State::Built(_) | State::None => None,
        }
    }
}

fn build_amqp(
    config: Option<&RabbitMqConfig>,
    max_in_flight: usize,
    stats: &Arc<Stats>,
) -> Result<Option<AmqpSource>, TlsSetupError> {
    config
        .map(|c| AmqpSource::new(c.clone(), max_in_flight, stats.clone()))
        .transpose()
}

fn build_mqtt(
    config: Option<&MqttConfig>,
    max_in_flight: usize,
    stats: &Arc<Stats>,
) -> Result<Option<MqttSource>, TlsSetupError> {
    config
        .map(|c| MqttSource::new(c.clone(), max_in_flight, stats.clone()))
        .transpose()
}

impl<C, S> Slot<C, S> {
    fn built(config: Option<C>, source: Option<S>) -> Slot<C, S> {
        Slot {
            config,
            state: source.map_or(State::None, State::Built),
        }
    }

    fn start<F>(
        &mut self,
        tx: &mpsc::Sender<Delivery>,
        shutdown: &Shutdown,
        in_flight: fn(&S) -> InFlight,
        run: fn(S, mpsc::Sender<Delivery>, Shutdown) -> F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let State::Built(source) = std::mem::replace(&mut self.state, State::None) {
            let own = shutdown.child();
            self.state = State::Running(Running {
                in_flight: in_flight(&source),
                task: tokio::spawn(run(source, tx.clone(), own.clone())),
                shutdown: own,
            });
        }
    }

    /// Stops the running source: no new message, its messages settled (up to `settle_within`,
    /// or until courier's own stop is requested), its connection closed (up to
    /// [`CLOSE_WITHIN`], then its task is aborted: a replacement must never run next to it,
    /// where two MQTT connections with one client id would take the session from each other).
    async fn stop(&mut self, name: &str, settle_within: Duration, courier: &Shutdown) {
        let State::Running(mut running) = std::mem::replace(&mut self.state, State::None) else {
            return;
        };
        running.shutdown.request();
        let settled = tokio::select! {
            settled = tokio::time::timeout(settle_within, running.in_flight.settled()) => settled.is_ok(),
            _ = courier.requested() => false,
        };
        if !settled {
            tracing::warn!(
                source = name,
                "messages of the replaced source still unsettled after {settle_within:?} or at the stop: they stay unacked and the broker redelivers them"
            );
        }
        running.shutdown.mark_drained();
        if tokio::time::timeout(CLOSE_WITHIN, &mut running.task)
            .await
            .is_err()
        {
            tracing::warn!(
                source = name,
                "the replaced source did not close within {CLOSE_WITHIN:?}: stopped"
            );
            running.task.abort();
            let _ = (&mut running.task).await;
        }
    }
}
