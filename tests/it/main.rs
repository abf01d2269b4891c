//! courier's integration tests, in one binary so that the shared helpers (`support`,
//! `courier_testkit`) compile once. Tests run concurrently within it; the ones that stop or
//! restart a broker hold it exclusively (see `support/brokers.rs`).
//!
//! Every test runs against real services on 127.0.0.1: RabbitMQ (5672), Mosquitto (1883) and
//! Redis (6379), which scripts/test.sh starts.

mod support;

mod ack_rule;
mod admin;
mod amqp;
mod bad_input;
mod cli;
mod config_errors;
mod config_reference;
mod demo;
mod deploy;
mod failover;
mod faults;
mod fuzz_seeds;
mod kill_bound;
mod mqtt;
mod mqtt5;
mod mqtt_broker_restart;
mod oauth2;
mod operations;
mod policy;
mod proxy;
mod rate_limit;
mod redis_tls;
mod reload;
mod retries;
mod tls;
mod trace_context;
