//! The integration test binary: every test drives the real `llm-gateway` executable.
//!
//! `support` holds the harness (temp dirs, the gateway process, a scripted fake
//! upstream, a fake OAuth token endpoint and a raw HTTP client); the other modules
//! group the tests by the part of the contract they check.

// Tests parse JSON as they like; the limit on nesting is the gateway's (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod balance;
mod cli;
mod dashboard;
mod egress;
mod faults;
mod fuzz;
mod limits;
mod oauth;
mod openai;
mod proxy;
mod quota;
mod scale;
mod status;
mod support;
mod team;
