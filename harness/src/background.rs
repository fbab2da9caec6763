//! A server run in-process on its own thread and tokio runtime: started when
//! [`Background::spawn`] returns, stopped (told to stop, its runtime shut down, its
//! thread joined) when dropped. The mock model server, the ext_proc stand-in and the
//! fault-injecting tracker all run this way; the test process owns them, so a failed
//! test cannot leave one behind.

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::oneshot;

/// How a server says it has started (listening) or failed to.
pub struct Ready<T>(std::sync::mpsc::Sender<anyhow::Result<T>>);

impl<T> Ready<T> {
    pub fn ok(self, value: T) {
        let _ = self.0.send(Ok(value));
    }

    pub fn fail(self, error: anyhow::Error) {
        let _ = self.0.send(Err(error));
    }
}

/// A running background server; stops when dropped.
pub struct Background {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Runs `serve` on a new thread `name` with a two-worker runtime. `serve` reports its
    /// start through [`Ready`] (the value is returned here) and should return once `stop`
    /// fires. Fails if it reports an error or nothing within 10 s.
    pub fn spawn<T, F, Fut>(name: &str, serve: F) -> anyhow::Result<(Background, T)>
    where
        T: Send + 'static,
        F: FnOnce(Ready<T>, oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<T>>();
        let label = name.to_string();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{label} runtime: {e}")));
                    return;
                }
            };
            rt.block_on(serve(Ready(ready_tx), stop_rx));
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
        let server = Background { stop: Some(stop_tx), thread: Some(thread) };
        let value = ready_rx.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow!("{name} did not start"))??;
        Ok((server, value))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
