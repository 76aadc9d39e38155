//! Progress display. Bars and spinners draw on a terminal only (indicatif
//! hides them otherwise, e.g. in CI logs); every long step also prints a plain
//! line when it starts and when it ends, so logs stay readable.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A bar for `len` units of work.
pub fn bar(len: u64, msg: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A spinner for work of unknown length.
pub fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {wide_msg}") {
        pb.set_style(style);
    }
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(150));
    pb
}

/// Print a line above a bar or spinner; plainly when it is hidden (not a terminal).
pub fn line(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}
