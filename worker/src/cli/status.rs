//! The live one-line status of `weir-worker run` on a terminal: consumed/s, written/s,
//! lag and dead-lettered, redrawn every second; log lines are printed above it.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use weir_worker::metrics::Metrics;

/// The status line, when standard error is a terminal.
pub fn line() -> Option<ProgressBar> {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix}: {msg}") {
        bar.set_style(style);
    }
    Some(bar)
}

/// Redraws `bar` from the metrics every second, until the process ends.
pub async fn follow(bar: ProgressBar, pipeline: String, metrics: Arc<Metrics>) {
    bar.set_prefix(pipeline);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = (Instant::now(), 0, 0);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let consumed = Metrics::get(&metrics.consumed);
        let written = Metrics::get(&metrics.written);
        let seconds = now.duration_since(last.0).as_secs_f64().max(0.001);
        let rate = |now: u64, before: u64| (now.saturating_sub(before)) as f64 / seconds;
        bar.set_message(format!(
            "consumed {:.0}/s · written {:.0}/s · lag {} · dead-lettered {}{}",
            rate(consumed, last.1),
            rate(written, last.2),
            metrics.total_lag(),
            Metrics::get(&metrics.dead_lettered),
            if metrics.is_ready() {
                ""
            } else {
                " · NOT READY"
            }
        ));
        bar.tick();
        last = (now, consumed, written);
    }
}

/// Standard error for log lines, printed above the status line when there is one.
#[derive(Clone, Debug)]
pub struct Stderr(pub Option<ProgressBar>);

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf).map(|()| buf.len())),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
