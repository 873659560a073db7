//! A boot step that runs on its own thread while PID 1 goes on, and that
//! something later must wait for: the network, which the agent's command
//! needs but the control channel's handshake and provisioning do not.
//!
//! Under emulation the network takes tens of milliseconds (its driver's
//! probe, then the interface ioctls); on its own thread it overlaps the
//! handshake with the host instead of delaying it.
//!
//! **Invariant:** [`Pending::wait`] returns only once the step has finished,
//! and every call gives the same answer, so a step that failed is never
//! taken for done by a later caller.

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};

/// A step that may still be running. Clones share it.
#[derive(Clone)]
pub struct Pending {
    what: &'static str,
    state: Arc<Mutex<State>>,
}

struct State {
    /// Where the step's thread sends its result: it sends as the step
    /// returns, before the thread's own teardown (freeing its stack costs
    /// an emulated guest a few milliseconds, which `join` would wait for).
    /// A thread that panicked drops the sender without sending.
    running: Option<Receiver<Result<(), String>>>,
    result: Result<(), String>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// A step that has already finished with `result`.
    pub fn finished(what: &'static str, result: Result<(), String>) -> Pending {
        Pending {
            what,
            state: Arc::new(Mutex::new(State {
                running: None,
                result,
            })),
        }
    }

    /// Runs `step` on a thread of its own. The error it returns is the
    /// reason [`wait`](Self::wait) reports.
    pub fn spawn<F>(what: &'static str, step: F) -> Pending
    where
        F: FnOnce() -> Result<(), String> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        match std::thread::Builder::new()
            .name(what.to_owned())
            .spawn(move || {
                let _ = tx.send(step());
            }) {
            Ok(_detached) => Pending {
                what,
                state: Arc::new(Mutex::new(State {
                    running: Some(rx),
                    result: Ok(()),
                })),
            },
            Err(err) => Pending::finished(what, Err(format!("cannot start a thread: {err}"))),
        }
    }

    /// Waits until the step has finished; `Err` says which step failed and
    /// why.
    pub fn wait(&self) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(done) = state.running.take() {
            state.result = done
                .recv()
                .unwrap_or_else(|_| Err("its thread panicked".to_owned()));
        }
        state
            .result
            .clone()
            .map_err(|why| format!("{}: {why}", self.what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wait_blocks_until_the_step_is_done() {
        let (go, gate) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let step = Pending::spawn("network", move || {
            gate.recv().map_err(|e| e.to_string())?;
            done_tx.send(()).map_err(|e| e.to_string())
        });
        let waiter = {
            let step = step.clone();
            std::thread::spawn(move || step.wait())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "wait returned before the step ran");
        go.send(()).unwrap();
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert!(done_rx.try_recv().is_ok());
        assert_eq!(step.wait(), Ok(()));
    }

    #[test]
    fn a_failure_is_reported_to_every_caller() {
        let step = Pending::spawn("network", || Err("no interface".to_owned()));
        assert_eq!(step.wait(), Err("network: no interface".to_owned()));
        assert_eq!(step.clone().wait(), Err("network: no interface".to_owned()));
        let panics = Pending::spawn("network", || panic!("boom"));
        assert_eq!(
            panics.wait(),
            Err("network: its thread panicked".to_owned())
        );
        assert_eq!(Pending::finished("network", Ok(())).wait(), Ok(()));
    }
}
