//! What a session is doing while it starts, for the person (or CI log)
//! waiting on it, and how long each phase took, for the end-of-session
//! report.
//!
//! [`Progress`] keeps the clock: `phase(next)` ends the current phase and
//! starts `next`. Where the lines go is a [`ProgressSink`]: nothing
//! ([`Quiet`]), plain lines ([`Plain`], for logs and pipes, and `--ci`), or a
//! spinner on a terminal ([`Spinner`]). Only the start-up phases are shown;
//! the agent's own run and the cleanup are timed for the report but print
//! nothing, so they never mix with the agent's output.
//!
//! **Invariant:** progress lines carry phase names and durations only —
//! never a secret, a lease id or a command line.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One step of a session's life, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The image's files against its sealed digests.
    ImageCheck,
    /// Leases granted by the vault for the manifest's credentials.
    Leases,
    /// Tap and nftables table.
    Jail,
    /// The session's proxy listeners.
    Proxy,
    /// Runtime directory, control socket, tap descriptor, QEMU binary.
    VmSetup,
    /// QEMU started until the guest agent's hello.
    Boot,
    /// Provisioning sent until the guest reports the agent provisioned.
    Provisioning,
    /// The agent runs (not shown; timed for the report).
    Agent,
    /// Leases revoked, proxy, VM and jail removed (not shown).
    Cleanup,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::ImageCheck => "image check",
            Phase::Leases => "leases",
            Phase::Jail => "jail",
            Phase::Proxy => "proxy",
            Phase::VmSetup => "VM setup",
            Phase::Boot => "boot (until the guest's hello)",
            Phase::Provisioning => "provisioning",
            Phase::Agent => "agent",
            Phase::Cleanup => "cleanup",
        }
    }

    /// Whether the phase is shown while the session starts.
    pub fn shown(self) -> bool {
        !matches!(self, Phase::Agent | Phase::Cleanup)
    }
}

/// How long one phase took.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PhaseTiming {
    pub phase: Phase,
    pub seconds: f64,
    /// `false` when the session failed in this phase.
    pub ok: bool,
}

/// Where progress goes.
pub trait ProgressSink: Send + std::fmt::Debug {
    fn begin(&mut self, phase: Phase);
    fn end(&mut self, phase: Phase, took: Duration, ok: bool);
}

/// Shows nothing (`--quiet`, and library callers that did not ask).
#[derive(Debug, Default)]
pub struct Quiet;

impl ProgressSink for Quiet {
    fn begin(&mut self, _: Phase) {}
    fn end(&mut self, _: Phase, _: Duration, _: bool) {}
}

/// The line [`Plain`] writes when `phase` ends.
pub fn plain_line(phase: Phase, took: Duration, ok: bool) -> String {
    let what = if ok { "done in" } else { "FAILED after" };
    format!(
        "zerolease: {} {what} {:.2}s",
        phase.label(),
        took.as_secs_f64()
    )
}

/// One line per finished phase, for logs, pipes and `--ci`.
#[derive(Debug)]
pub struct Plain<W> {
    out: W,
}

impl<W: Write + Send + std::fmt::Debug> Plain<W> {
    pub fn new(out: W) -> Self {
        Plain { out }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write + Send + std::fmt::Debug> ProgressSink for Plain<W> {
    fn begin(&mut self, _: Phase) {}

    fn end(&mut self, phase: Phase, took: Duration, ok: bool) {
        if phase.shown() {
            let _ = writeln!(self.out, "{}", plain_line(phase, took, ok));
            let _ = self.out.flush();
        }
    }
}

/// A spinner on stderr while a phase runs, then a ✓ (or ✗) line with its
/// time.
#[derive(Debug, Default)]
pub struct Spinner {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressSink for Spinner {
    fn begin(&mut self, phase: Phase) {
        if !phase.shown() {
            return;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style);
        }
        bar.set_message(phase.label());
        bar.enable_steady_tick(Duration::from_millis(100));
        self.bar = Some(bar);
    }

    fn end(&mut self, phase: Phase, took: Duration, ok: bool) {
        let Some(bar) = self.bar.take() else { return };
        let mark = if ok { "✓" } else { "✗" };
        bar.finish_and_clear();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{mark} {} {:.2}s", phase.label(), took.as_secs_f64());
    }
}

/// The clock of a session's phases.
#[derive(Debug)]
pub struct Progress {
    sink: Box<dyn ProgressSink>,
    current: Option<(Phase, Instant)>,
    timings: Vec<PhaseTiming>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new(Box::new(Quiet))
    }
}

impl Progress {
    pub fn new(sink: Box<dyn ProgressSink>) -> Self {
        Progress {
            sink,
            current: None,
            timings: Vec::new(),
        }
    }

    /// Ends the current phase (successfully) and starts `next`.
    pub fn phase(&mut self, next: Phase) {
        self.end(true);
        self.sink.begin(next);
        self.current = Some((next, Instant::now()));
    }

    /// Ends the current phase, if any; `ok: false` marks it as where the
    /// session failed.
    pub fn end(&mut self, ok: bool) {
        if let Some((phase, since)) = self.current.take() {
            let took = since.elapsed();
            self.sink.end(phase, took, ok);
            self.timings.push(PhaseTiming {
                phase,
                seconds: took.as_secs_f64(),
                ok,
            });
        }
    }

    pub fn timings(&self) -> &[PhaseTiming] {
        &self.timings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_name_the_phase_and_its_time() {
        let cases = [
            (
                Phase::ImageCheck,
                Duration::from_millis(123),
                true,
                "zerolease: image check done in 0.12s",
            ),
            (
                Phase::Boot,
                Duration::from_millis(6_789),
                true,
                "zerolease: boot (until the guest's hello) done in 6.79s",
            ),
            (
                Phase::Provisioning,
                Duration::ZERO,
                false,
                "zerolease: provisioning FAILED after 0.00s",
            ),
            (
                Phase::VmSetup,
                Duration::from_secs(3600),
                true,
                "zerolease: VM setup done in 3600.00s",
            ),
        ];
        for (phase, took, ok, want) in cases {
            assert_eq!(plain_line(phase, took, ok), want);
        }
    }

    #[test]
    fn plain_shows_start_up_phases_only() {
        let buf = SharedBuf::default();
        let mut p = Progress::new(Box::new(Plain::new(buf.clone())));
        for phase in [
            Phase::ImageCheck,
            Phase::Leases,
            Phase::Jail,
            Phase::Proxy,
            Phase::VmSetup,
            Phase::Boot,
            Phase::Provisioning,
            Phase::Agent,
            Phase::Cleanup,
        ] {
            p.phase(phase);
        }
        p.end(false);
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        assert!(lines[0].starts_with("zerolease: image check done in "));
        assert!(lines[6].starts_with("zerolease: provisioning done in "));
        assert!(!text.contains("agent") && !text.contains("cleanup"));
        // Every phase is timed, the last one as failed.
        let t = p.timings();
        assert_eq!(t.len(), 9);
        assert_eq!(t[8].phase, Phase::Cleanup);
        assert!(!t[8].ok && t[..8].iter().all(|t| t.ok));
    }

    #[test]
    fn end_without_a_phase_does_nothing_and_phases_are_not_double_counted() {
        let buf = SharedBuf::default();
        let mut p = Progress::new(Box::new(Plain::new(buf.clone())));
        p.end(true);
        p.end(false);
        assert!(p.timings().is_empty());
        p.phase(Phase::Jail);
        p.end(false);
        p.end(true);
        assert_eq!(p.timings().len(), 1);
        assert_eq!(buf.text().lines().count(), 1);
        assert!(buf.text().contains("jail FAILED after"));
    }

    #[test]
    fn quiet_and_default_show_nothing_but_still_time() {
        let mut p = Progress::default();
        p.phase(Phase::Boot);
        p.end(true);
        assert_eq!(p.timings().len(), 1);
    }

    /// A writer tests can read back while a sink owns a clone of it.
    #[derive(Debug, Clone, Default)]
    struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl SharedBuf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
