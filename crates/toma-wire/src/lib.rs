//! Toma's datapath and control message formats
#![forbid(unsafe_code)]
