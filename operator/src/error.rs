//! Mapping kube errors onto the control plane's `CpError` (one error enum per layer; the
//! operator binary itself uses `anyhow` only in `main`).

use toma_control::CpError;

/// The HTTP status of an API error, if the apiserver answered.
pub fn status_of(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// A kube error as a `CpError` (`what` names the object, for the message).
pub fn cp_error(what: &str, e: kube::Error) -> CpError {
    match status_of(&e) {
        Some(400 | 422) => CpError::Rejected(format!("{what}: {e}")),
        Some(409) => CpError::Exists(what.to_string()),
        _ => CpError::Unavailable(format!("{what}: {e}")),
    }
}
