//! A stateright model of Toma's operational protocol
#![forbid(unsafe_code)]
