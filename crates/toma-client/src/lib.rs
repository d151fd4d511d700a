//! The Toma datapath client: registration, RAID engines, topology switching
#![forbid(unsafe_code)]
