//! How a process joins the job it was launched in: the launcher's environment, MPI's
//! set-up and tear-down, and ending every rank on an error that only one rank met.

use super::world;
#[cfg(feature = "mpi")]
use super::{mpi_comm, Collective, WORLD};
use crate::error::{Result, TrainError};

/// How the process was started, read from the environment by [`launch_from`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launch {
    /// Alone.
    Single,
    /// As a rank of an MPI job.
    Mpi {
        /// The launcher, for messages (`mpirun (Open MPI)`, `a PMI launcher`, ...).
        launcher: &'static str,
        /// The job's size when the environment says it.
        size: Option<usize>,
    },
}

/// Reads how the process was launched. `RLHF_DIST` decides when set: `single` (run alone
/// even under a launcher), `mpi` (join an MPI job whatever the environment says) or `auto`
/// (the default): an MPI job when a launcher's variables are present — Open MPI's
/// `OMPI_COMM_WORLD_SIZE` (`mpirun`, `srun` with PMIx), `PMI_SIZE` (MPICH's and Intel MPI's
/// Hydra, `srun --mpi=pmi2`) or `PMIX_RANK` (`srun --mpi=pmix`).
pub fn launch_from(env: impl Fn(&str) -> Option<String>) -> Result<Launch> {
    let size = |k: &str| env(k).and_then(|v| v.trim().parse::<usize>().ok());
    match env("RLHF_DIST").as_deref().map(str::trim) {
        Some("single") | Some("none") => return Ok(Launch::Single),
        Some("mpi") => {
            return Ok(Launch::Mpi {
                launcher: "RLHF_DIST=mpi",
                size: size("OMPI_COMM_WORLD_SIZE").or_else(|| size("PMI_SIZE")),
            })
        }
        None | Some("") | Some("auto") => {}
        Some(other) => {
            return Err(TrainError::Dist(format!(
                "RLHF_DIST=`{other}` is not known\nhint: use auto (the default), mpi or single"
            )))
        }
    }
    if let Some(n) = size("OMPI_COMM_WORLD_SIZE") {
        return Ok(Launch::Mpi {
            launcher: "mpirun (Open MPI)",
            size: Some(n),
        });
    }
    if let Some(n) = size("PMI_SIZE") {
        return Ok(Launch::Mpi {
            launcher: "a PMI launcher (mpiexec, srun --mpi=pmi2)",
            size: Some(n),
        });
    }
    if env("PMIX_RANK").is_some() {
        return Ok(Launch::Mpi {
            launcher: "a PMIx launcher (srun --mpi=pmix)",
            size: None,
        });
    }
    Ok(Launch::Single)
}

/// This process's membership in an MPI job; dropping it leaves the job (`MPI_Finalize`).
/// Keep it alive for as long as [`world`] is used, on the thread that called [`start`].
pub struct Session {
    #[cfg(feature = "mpi")]
    /// Held for its `Drop`: `MPI_Finalize` when the session ends.
    _universe: Option<mpi::environment::Universe>,
}

impl Session {
    /// Whether an error must end the whole job at once ([`Session::abort`]) rather than
    /// return on this rank alone. Every rank meets an interrupted or diverged run, and errors
    /// that [`super::Collective::on_main`] shared, at the same point; any other error may be this
    /// rank's alone, and the other ranks would wait for it in their next collective forever.
    pub fn must_abort(&self, e: &TrainError) -> bool {
        world().size() > 1
            && !matches!(
                e,
                TrainError::Interrupted { .. } | TrainError::Diverged(_) | TrainError::Dist(_)
            )
    }

    /// Ends every rank of the job now (`MPI_Abort`; the launcher then stops the others).
    /// Checkpoints are renamed into place when complete, so the last complete one stays
    /// intact; a half-written `.checkpoint-<step>.tmp` is removed by the next run.
    pub fn abort(self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Collective::Mpi(w) = world() {
            w.abort(code)
        }
        std::process::exit(code)
    }
}

/// Joins the MPI job this process was launched in ([`launch_from`] on the process
/// environment), or runs alone. Call once, before any training, on the thread that will run
/// it; keep the [`Session`] until the run is over.
///
/// # Errors
/// Launched as one of several ranks by a binary built without the `mpi` feature (every rank
/// would train alone into the same directory); an unknown `RLHF_DIST`; a second call.
pub fn start() -> Result<Session> {
    match launch_from(|k| std::env::var(k).ok())? {
        Launch::Single => Ok(Session::single()),
        Launch::Mpi { launcher, size } => start_mpi(launcher, size),
    }
}

impl Session {
    fn single() -> Self {
        Self {
            #[cfg(feature = "mpi")]
            _universe: None,
        }
    }
}

#[cfg(feature = "mpi")]
fn start_mpi(_launcher: &str, _size: Option<usize>) -> Result<Session> {
    let (universe, w) = mpi_comm::init()?;
    WORLD
        .set(Collective::Mpi(w))
        .map_err(|_| TrainError::Dist("dist::start called twice in one process".into()))?;
    Ok(Session {
        _universe: Some(universe),
    })
}

#[cfg(not(feature = "mpi"))]
fn start_mpi(launcher: &str, size: Option<usize>) -> Result<Session> {
    if size == Some(1) {
        return Ok(Session::single());
    }
    let ranks = size.map_or("one of several ranks".to_string(), |n| format!("one of {n} ranks"));
    Err(TrainError::Dist(format!(
        "started by {launcher} as {ranks}, but this rlhf was built without MPI, so every rank would \
         train alone into the same output directory\n\
         hint: build with `cargo build --release -p rlhf-cli --features mpi` (needs an MPI library and libclang; \
         docs/scaling.md), or set RLHF_DIST=single to run each process on its own"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn launchers_are_recognised_from_their_variables() {
        assert_eq!(launch_from(env(&[])).unwrap(), Launch::Single);
        let ompi = launch_from(env(&[("OMPI_COMM_WORLD_SIZE", "4")])).unwrap();
        assert!(matches!(ompi, Launch::Mpi { size: Some(4), .. }));
        let hydra = launch_from(env(&[("PMI_SIZE", "2"), ("PMI_RANK", "1")])).unwrap();
        assert!(matches!(hydra, Launch::Mpi { size: Some(2), .. }));
        let pmix = launch_from(env(&[("PMIX_RANK", "0")])).unwrap();
        assert!(matches!(pmix, Launch::Mpi { size: None, .. }));
        let alone = launch_from(env(&[("OMPI_COMM_WORLD_SIZE", "4"), ("RLHF_DIST", "single")])).unwrap();
        assert_eq!(alone, Launch::Single);
        let forced = launch_from(env(&[("RLHF_DIST", "mpi")])).unwrap();
        assert!(matches!(forced, Launch::Mpi { .. }));
        let err = launch_from(env(&[("RLHF_DIST", "nccl")])).unwrap_err().to_string();
        assert!(err.contains("RLHF_DIST=`nccl`") && err.contains("hint:"), "{err}");
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn a_build_without_mpi_refuses_to_be_one_of_several_ranks() {
        let err = start_mpi("mpirun (Open MPI)", Some(2)).err().unwrap().to_string();
        assert!(
            err.contains("one of 2 ranks") && err.contains("--features mpi"),
            "{err}"
        );
        assert!(start_mpi("mpirun (Open MPI)", Some(1)).is_ok());
    }
}
