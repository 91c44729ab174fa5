//! Empty on purpose: the programs are the `agent-monitor` binary target (see Cargo.toml).
#![no_std]
