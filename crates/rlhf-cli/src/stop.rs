//! Ctrl-C (SIGINT) and SIGTERM during `rlhf sft`, `rlhf reward` and `rlhf ppo`: the first asks
//! the run to stop after its current step and save a checkpoint; a second exits at once.

use rlhf_train::StopSignal;

/// Installs the signal handler of the training commands and returns the request the run
/// checks between steps.
pub fn install() -> anyhow::Result<StopSignal> {
    let stop = StopSignal::new();
    #[cfg(unix)]
    {
        use anyhow::Context;
        use signal_hook::consts::{SIGINT, SIGTERM};

        let mut signals =
            signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("installing the SIGINT/SIGTERM handler")?;
        let request = stop.clone();
        std::thread::spawn(move || {
            for sig in signals.forever() {
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                if !request.request(name) {
                    eprintln!("{name} again: exiting now, without saving");
                    std::process::exit(exit_code(name).into());
                }
                eprintln!(
                    "{name}: stopping after the current step and saving a checkpoint (Ctrl-C again exits at once)"
                );
            }
        });
    }
    Ok(stop)
}

/// The exit status of a run stopped by `reason`, as a shell reports a signal: 128 + its number.
pub fn exit_code(reason: &str) -> u8 {
    match reason {
        "SIGTERM" => 128 + 15,
        _ => 128 + 2,
    }
}
