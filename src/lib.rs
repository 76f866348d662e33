//! llm-gateway: one static binary that pools a team's Anthropic accounts behind one endpoint.
//! This library is the gateway; `src/main.rs` only hands the command line to `cli::main`.
//! ARCHITECTURE.md maps the modules. The modules are public so the integration tests (the
//! fuzzer among them) can drive the parsers and converters in-process.

// `sys` holds the crate's `unsafe` code (and `memory` its one caller of an `unsafe fn`): the Linux
// calls std does not offer, through libc and socket2.
#![deny(unsafe_code)]
// Unit tests parse JSON as they like; the code they test goes through `json` (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

// `error!`, `warn!`, `info!` and `debug!` everywhere are the `log` facade's; `logger` is its
// backend.
#[macro_use]
extern crate log;

pub mod access;
pub mod accounts;
pub mod anthropic;
pub mod applied;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod encoding;
pub mod error;
pub mod failover;
pub mod gateway;
pub mod http;
pub mod json;
pub mod key_usage;
pub mod ledger;
pub mod limits;
pub mod listener;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod oauth;
pub mod openai;
pub mod pricing;
pub mod probe;
pub mod processor;
pub mod quota;
pub mod records;
pub mod refresh;
pub mod relay;
pub mod reload;
pub mod respond;
pub mod route;
pub mod router;
pub mod scrub;
pub mod secret;
pub mod server;
pub mod shape;
pub mod shared;
pub mod sse;
pub mod status;
pub mod store;
pub mod supervise;
pub mod sys;
pub mod time;
pub mod upstream;
pub mod usage;
pub mod watch;
