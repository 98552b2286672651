//! Shutdown on SIGTERM or SIGINT, shared by our binaries: the signal
//! cancels a token, and everything that got the token stops claiming or
//! consuming, finishes what is in hand within its timeout, and returns.

use tokio_util::sync::CancellationToken;

/// Spawns a task that cancels `shutdown` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let terminate = async {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut stream) => stream.recv().await,
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        tracing::info!("shutdown requested");
        shutdown.cancel();
    });
}
