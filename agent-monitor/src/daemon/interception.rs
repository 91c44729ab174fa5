//! Glue between the daemon and HTTP interception (intercept/): the CA at start, the CA again on
//! every reload (how `agent-monitor ca rotate` takes effect).

use super::Monitor;
use crate::intercept::{InterceptArgs, Interceptor};

/// Read or create the CA. A failure turns interception off and says so; enforcement of
/// everything else goes on.
pub(super) fn start(args: &InterceptArgs) -> Option<Interceptor> {
    match Interceptor::start(args) {
        Ok((interceptor, note)) => {
            tracing::info!("{note}");
            Some(interceptor)
        }
        Err(e) => {
            tracing::error!(
                "HTTP interception is off: {e}; `run` hands agents no CA bundle, and connections \
                 that method/path rules would judge cannot be intercepted"
            );
            None
        }
    }
}

impl Monitor {
    /// Pick up a CA that `ca rotate` wrote; connections already open keep the old one.
    pub(super) fn reload_ca(&mut self, trigger: &str) {
        let Some(interceptor) = &self.interceptor else {
            return;
        };
        match interceptor.reload_ca() {
            Ok(Some(fingerprint)) => tracing::info!(
                "HTTP interception: new CA (SHA-256 {fingerprint}) read on reload ({trigger})"
            ),
            Ok(None) => {}
            Err(e) => tracing::error!(
                "HTTP interception: the CA could not be re-read on reload ({trigger}), the \
                 previous one stays in use: {e}"
            ),
        }
    }
}
