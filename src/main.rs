//! llm-gateway: one static binary that pools a team's Anthropic accounts behind one endpoint.
//! `main` only hands over to the command line; ARCHITECTURE.md maps the modules.

// `sys` holds the crate's only `unsafe` code: two Linux calls std does not offer.
#![deny(unsafe_code)]

#[macro_use]
mod log;

mod access;
mod accounts;
mod anthropic;
mod auth;
mod balance;
mod cli;
mod config;
mod cooldown;
mod encoding;
mod error;
#[cfg(test)]
mod fuzz;
mod http;
mod json;
mod ledger;
mod limits;
mod listener;
mod memory;
mod metrics;
mod oauth;
mod openai;
mod probe;
mod processor;
mod refresh;
mod router;
mod scrub;
mod secret;
mod server;
mod shared;
mod sse;
mod status;
mod sticky;
mod store;
mod supervise;
mod sys;
mod time;
mod upstream;
mod watch;

fn main() -> std::process::ExitCode {
    cli::main()
}
