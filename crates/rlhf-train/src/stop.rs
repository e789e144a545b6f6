//! Stopping a run between optimizer steps: the binary turns Ctrl-C (SIGINT) or SIGTERM into
//! a [`StopSignal`] request; each trainer checks it before starting a step, saves a checkpoint
//! of the last completed step and returns [`TrainError::Interrupted`] naming it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::TrainError;

/// A request to stop training, shared between whoever asks (a signal handler thread) and the
/// training loop. Cloning shares the request; the first reason given wins.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    reason: Arc<OnceLock<String>>,
}

impl StopSignal {
    /// A signal nobody has requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop after its current step; `reason` (e.g. `SIGINT`) appears in the
    /// message. Returns whether this was the first request.
    pub fn request(&self, reason: &str) -> bool {
        self.reason.set(reason.to_string()).is_ok()
    }

    /// The reason of the first request, if any.
    pub fn requested(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }
}

/// The [`TrainError::Interrupted`] of a run stopped after `step` of `total` optimizer steps,
/// with the checkpoint that holds that step (`None` before the first step).
pub fn interrupted(reason: &str, step: u64, total: u64, checkpoint: Option<&Path>) -> TrainError {
    let msg = match checkpoint {
        Some(dir) => format!(
            "stopped by {reason} after step {step} of {total}; the state of step {step} is saved in {}\n\
             hint: to continue, run the same command with --resume-from-checkpoint latest",
            dir.display()
        ),
        None => format!(
            "stopped by {reason} before the first optimizer step; nothing was saved\n\
             hint: to start again, run the same command with --overwrite-output-dir"
        ),
    };
    TrainError::Interrupted {
        reason: reason.to_string(),
        checkpoint: checkpoint.map(Path::to_path_buf),
        msg,
    }
}

/// When a stop was requested (on any rank, [`crate::dist::Collective::agree_stop`]): the checkpoint of `step` in `run` (reused when one is already
/// complete there, e.g. the step's regular checkpoint or the one resumed from, else written by
/// `save`), and the [`TrainError::Interrupted`] naming it; `Ok(())` otherwise. Nothing is
/// saved before the first step.
pub fn stop_if_requested(
    stop: &StopSignal,
    run: &crate::checkpoint::RunDir,
    step: u64,
    total: u64,
    save: impl FnOnce() -> crate::Result<PathBuf>,
) -> crate::Result<()> {
    // Every rank stops after the same step, whichever rank the request reached.
    let dist = crate::dist::world();
    let Some(reason) = dist.agree_stop(stop)? else {
        return Ok(());
    };
    let complete = run.complete_checkpoint(step);
    let checkpoint = match (step, dist.main_says(complete.is_some())?) {
        (0, _) => None,
        (_, true) => Some(complete.unwrap_or_else(|| run.root.join(format!("checkpoint-{step}")))),
        (_, false) => Some(save()?),
    };
    Err(interrupted(&reason, step, total, checkpoint.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_clones_share_it() {
        let stop = StopSignal::new();
        let seen_by_loop = stop.clone();
        assert_eq!(seen_by_loop.requested(), None);
        assert!(stop.request("SIGINT"));
        assert!(!stop.request("SIGTERM"));
        assert_eq!(seen_by_loop.requested(), Some("SIGINT"));
    }

    #[test]
    fn a_stop_saves_once_and_names_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let run = crate::checkpoint::RunDir::prepare(tmp.path(), false, false).unwrap();
        let stop = StopSignal::new();
        let save = || -> crate::Result<PathBuf> { unreachable!("nothing to save") };
        assert!(stop_if_requested(&stop, &run, 3, 8, save).is_ok());
        stop.request("SIGINT");
        let err = stop_if_requested(&stop, &run, 0, 8, save).unwrap_err().to_string();
        assert!(
            err.contains("before the first optimizer step; nothing was saved"),
            "{err}"
        );
        let mut saves = 0;
        let err = stop_if_requested(&stop, &run, 3, 8, || {
            saves += 1;
            run.save_checkpoint(3, None, |tmp| {
                crate::checkpoint::write_atomic(&tmp.join("trainer_state.json"), b"{}")
            })
        })
        .unwrap_err()
        .to_string();
        let ckpt = tmp.path().join("checkpoint-3");
        assert!(
            err.contains(&ckpt.display().to_string()) && err.contains("--resume-from-checkpoint latest"),
            "{err}"
        );
        // A checkpoint of the step already there is reused, not written again.
        let err = stop_if_requested(&stop, &run, 3, 8, save).unwrap_err().to_string();
        assert!(err.contains("stopped by SIGINT after step 3 of 8"), "{err}");
        assert_eq!(saves, 1);
    }
}
