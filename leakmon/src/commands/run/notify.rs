//! Telling systemd (`Type=notify`) the daemon's state, without ever stalling it.

use tracing::warn;

/// Tells the service manager (systemd `Type=notify`), if there is one. The message
/// goes through a small queue to a thread of its own: a manager that stops reading
/// its socket must not stall the sampling loop (a full datagram queue blocks the
/// sender), so when the queue is full the message is dropped.
pub(super) fn notify(state: sd_notify::NotifyState<'static>) {
    static QUEUE: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<sd_notify::NotifyState<'static>>>> =
        std::sync::OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET")?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<sd_notify::NotifyState<'static>>(16);
        std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for state in rx {
                    if let Err(e) = sd_notify::notify(false, &[state]) {
                        warn!("notify the service manager: {e}");
                    }
                }
            })
            .map_err(|e| warn!("start the service manager notifier: {e}"))
            .ok()?;
        Some(tx)
    });
    if let Some(tx) = queue {
        if tx.try_send(state).is_err() {
            tracing::debug!("service manager not reading its socket; notification dropped");
        }
    }
}
