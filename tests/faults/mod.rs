//! The fault suite (`make faults`; README: Reliability): hostile clients, broken upstreams,
//! crashes and full disks, signals and live reload, soak. Every test says in its name and
//! first comment what must stay true. Long forms (a soak of 30 minutes, hundreds of kill
//! rounds) run when `FAULTS_LONG=1`; otherwise each test runs its short form, as CI does.

/// Whether the long forms run (`make faults LONG=1`).
#[allow(dead_code)]
pub fn long() -> bool {
    std::env::var_os("FAULTS_LONG").is_some_and(|v| v == "1")
}
mod clients;
mod exhaust;
mod lifecycle;
mod metering;
mod panics;
mod security;
mod soak;
mod state;
mod trust;
mod upstreams;
