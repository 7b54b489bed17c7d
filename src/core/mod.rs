//! The I/O-free core: counters, windows, algorithms, rules and keys.
//!
//! Nothing below this module opens a socket, spawns a task or reads the system
//! clock: time arrives as an argument. That keeps every piece deterministic and
//! testable on virtual time, and lets the simulation harness run the same code
//! as a real node.

pub mod algorithm;
pub mod descriptor;
pub mod key;
pub mod receipt;
pub mod rules;
pub mod share;
pub mod slot;
pub mod time;
pub mod window;
pub mod wire;
