//! QMP, QEMU's control protocol, through the `qapi` crate.
//!
//! **Architecture Invariant:** QMP JSON stops here. Events become the closed
//! enum [`VmEvent`] in [`VmEvent::from_qmp`]; the session layer never sees a
//! `qapi` type. Every command is bounded by [`COMMAND_TIMEOUT`], so a wedged
//! monitor cannot hang a teardown.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bound on one QMP command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts to connect while QEMU has not created the socket.
const RETRY_EVERY: Duration = Duration::from_millis(20);
/// Events buffered for a reader that is slow; beyond that, `Other` events
/// are dropped (the important ones end the VM anyway).
const EVENT_BUFFER: usize = 256;

/// Something that happened to the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// QEMU is shutting down; `guest` is true when the guest asked for it
    /// (power off, or a reboot turned into a shutdown by `-no-reboot`).
    Shutdown { guest: bool, reason: String },
    /// The guest kernel panicked (reported through pvpanic, if present).
    GuestPanicked,
    /// The VM stopped executing (paused).
    Stop,
    /// The VM was reset.
    Reset,
    /// Any other QMP event, by name.
    Other(String),
    /// The QEMU process is gone. Legal only as the last event.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

impl VmEvent {
    /// Parses a QMP event at the edge.
    pub fn from_qmp(event: &qmp::Event) -> VmEvent {
        use qapi::Enum;
        match event {
            qmp::Event::SHUTDOWN { data, .. } => VmEvent::Shutdown {
                guest: data.guest,
                reason: data.reason.name().to_owned(),
            },
            qmp::Event::GUEST_PANICKED { .. } => VmEvent::GuestPanicked,
            qmp::Event::STOP { .. } => VmEvent::Stop,
            qmp::Event::RESET { .. } => VmEvent::Reset,
            other => VmEvent::Other(event_name(other)),
        }
    }

    pub(crate) fn exited(status: ExitStatus) -> VmEvent {
        VmEvent::Exited {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

fn event_name(event: &qmp::Event) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.get("event")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The VM's run state, as `query-status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStatus {
    pub running: bool,
    /// QEMU's run state name (`running`, `paused`, `prelaunch`, …).
    pub state: String,
}

/// Why a QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QEMU's QMP socket {path} did not accept a connection within {bound:?}")]
    ConnectTimeout {
        path: PathBuf,
        bound: Duration,
        #[source]
        last: io::Error,
    },
    #[error("QMP capability negotiation on {path} failed")]
    Negotiate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the QMP command `{command}` failed")]
    Command {
        command: &'static str,
        #[source]
        source: qapi::ExecuteError,
    },
    #[error("QEMU exited ({event:?}) before its monitor came up; see {}", log.display())]
    QemuExited { event: VmEvent, log: PathBuf },
    #[error("the QMP command `{command}` got no answer within {COMMAND_TIMEOUT:?}")]
    Timeout { command: &'static str },
}

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

/// A negotiated QMP connection. A background task reads the socket, answers
/// pending commands and forwards events; it ends when QEMU closes the socket
/// or this value is dropped.
pub struct Qmp {
    service: Service,
    events: mpsc::Receiver<VmEvent>,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to `path`, retrying for up to `bound` while the socket does
    /// not exist yet or refuses, and negotiates capabilities.
    pub async fn connect(path: &Path, bound: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + bound;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(err) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::ConnectTimeout {
                        path: path.to_owned(),
                        bound,
                        last: err,
                    });
                }
                Err(_) => tokio::time::sleep(RETRY_EVERY).await,
            }
        };
        let negotiate = |source| QmpError::Negotiate {
            path: path.to_owned(),
            source,
        };
        let (read, write) = tokio::io::split(stream);
        let handshake = async {
            QmpStreamTokio::open_split(read, write)
                .await?
                .negotiate()
                .await
        };
        let stream = tokio::time::timeout_at(
            deadline.max(tokio::time::Instant::now()) + COMMAND_TIMEOUT,
            handshake,
        )
        .await
        .map_err(|_| negotiate(io::ErrorKind::TimedOut.into()))?
        .map_err(negotiate)?;
        let (service, mut raw_events) = stream.into_parts();
        let (tx, events) = mpsc::channel(EVENT_BUFFER);
        let reader = tokio::spawn(async move {
            while let Some(item) = raw_events.next().await {
                let event = match item {
                    Ok(event) => event,
                    // QEMU exiting (quit, the guest powering off) resets
                    // the socket: the end of the stream, not a fault.
                    Err(err) if closed(&err) => {
                        tracing::debug!(error = %err, "QMP stream closed by QEMU");
                        break;
                    }
                    Err(err) => {
                        // The codec stops after an undecodable line (for
                        // instance an event newer than the `qapi` schema);
                        // events end here, commands then fail and teardown
                        // falls back to SIGKILL.
                        tracing::warn!(error = %err, "QMP stream ended on a decode error");
                        break;
                    }
                };
                let event = VmEvent::from_qmp(&event);
                tracing::debug!(?event, "QMP event");
                match tx.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(event)) => {
                        if matches!(event, VmEvent::Other(_)) {
                            tracing::warn!(?event, "QMP event dropped: reader too slow");
                        } else if tx.send(event).await.is_err() {
                            break;
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        });
        Ok(Qmp {
            service,
            events,
            reader,
        })
    }

    async fn execute<C>(&self, command: C, name: &'static str) -> Result<C::Ok, QmpError>
    where
        C: qapi::Command + qmp::QmpCommand,
    {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.service.execute(command)).await {
            Ok(result) => result.map_err(|source| QmpError::Command {
                command: name,
                source,
            }),
            Err(_) => Err(QmpError::Timeout { command: name }),
        }
    }

    /// `quit`: QEMU exits immediately. QEMU may close the socket before its
    /// answer arrives; that counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(qmp::quit {}, "quit").await {
            Ok(_) => Ok(()),
            Err(QmpError::Command {
                source: qapi::ExecuteError::Io(err),
                ..
            }) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// `system_powerdown`: presses the ACPI power button; the guest decides.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute(qmp::system_powerdown {}, "system_powerdown")
            .await
            .map(drop)
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<VmStatus, QmpError> {
        use qapi::Enum;
        let info = self.execute(qmp::query_status {}, "query-status").await?;
        Ok(VmStatus {
            running: info.running,
            state: info.status.name().to_owned(),
        })
    }

    /// The next event; `None` once QEMU closed the QMP socket.
    pub async fn next_event(&mut self) -> Option<VmEvent> {
        self.events.recv().await
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Whether a read error on the QMP socket only means QEMU went away.
fn closed(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_going_away_is_told_apart_from_a_bad_line() {
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::BrokenPipe,
        ] {
            assert!(closed(&kind.into()), "{kind:?}");
        }
        assert!(!closed(&io::Error::new(
            io::ErrorKind::InvalidData,
            "unknown event"
        )));
    }

    fn parse(json: &str) -> VmEvent {
        let event: qmp::Event = serde_json::from_str(json).unwrap();
        VmEvent::from_qmp(&event)
    }

    const TS: &str = r#""timestamp":{"seconds":1,"microseconds":2}"#;

    #[test]
    fn events_table() {
        let cases = [
            (
                format!(
                    r#"{{"event":"SHUTDOWN","data":{{"guest":true,"reason":"guest-shutdown"}},{TS}}}"#
                ),
                VmEvent::Shutdown {
                    guest: true,
                    reason: "guest-shutdown".into(),
                },
            ),
            (
                format!(
                    r#"{{"event":"SHUTDOWN","data":{{"guest":false,"reason":"host-qmp-quit"}},{TS}}}"#
                ),
                VmEvent::Shutdown {
                    guest: false,
                    reason: "host-qmp-quit".into(),
                },
            ),
            (
                format!(
                    r#"{{"event":"SHUTDOWN","data":{{"guest":true,"reason":"guest-panic"}},{TS}}}"#
                ),
                VmEvent::Shutdown {
                    guest: true,
                    reason: "guest-panic".into(),
                },
            ),
            (
                format!(r#"{{"event":"GUEST_PANICKED","data":{{"action":"pause"}},{TS}}}"#),
                VmEvent::GuestPanicked,
            ),
            (format!(r#"{{"event":"STOP",{TS}}}"#), VmEvent::Stop),
            (
                format!(
                    r#"{{"event":"RESET","data":{{"guest":true,"reason":"guest-reset"}},{TS}}}"#
                ),
                VmEvent::Reset,
            ),
            (
                format!(r#"{{"event":"RESUME",{TS}}}"#),
                VmEvent::Other("RESUME".into()),
            ),
            (
                format!(r#"{{"event":"POWERDOWN",{TS}}}"#),
                VmEvent::Other("POWERDOWN".into()),
            ),
        ];
        for (json, want) in cases {
            assert_eq!(parse(&json), want, "{json}");
        }
    }

    #[test]
    fn unknown_or_malformed_events_do_not_parse() {
        // The codec drops what does not parse; nothing reaches the session.
        for json in [
            format!(r#"{{"event":"NOT_A_QEMU_EVENT",{TS}}}"#),
            format!(r#"{{"event":"SHUTDOWN","data":{{"guest":"yes"}},{TS}}}"#),
            r#"{"event":"STOP"}"#.to_owned(),
            "[]".to_owned(),
        ] {
            assert!(serde_json::from_str::<qmp::Event>(&json).is_err(), "{json}");
        }
    }

    #[test]
    fn exit_status_becomes_an_event() {
        assert_eq!(
            VmEvent::exited(ExitStatus::from_raw(0)),
            VmEvent::Exited {
                code: Some(0),
                signal: None
            }
        );
        assert_eq!(
            VmEvent::exited(ExitStatus::from_raw(9)),
            VmEvent::Exited {
                code: None,
                signal: Some(9)
            }
        );
    }
}
