//! The MPI backend of [`super::Collective`] (rsmpi over Open MPI or MPICH): host buffers on
//! `MPI_COMM_WORLD`, every call from the thread that initialised MPI (`Funneled`).

use std::thread::ThreadId;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::ReduceOp;
use crate::error::{Result, TrainError};

/// Elements per MPI call: counts are C `int`s.
const MAX_COUNT: usize = 1 << 30;

/// This rank of `MPI_COMM_WORLD`.
pub struct MpiWorld {
    rank: usize,
    size: usize,
    thread: ThreadId,
}

/// Initialises MPI (`MPI_Init_thread` with `Funneled`) on the calling thread.
pub fn init() -> Result<(Universe, MpiWorld)> {
    if mpi::environment::is_initialized() {
        return Err(TrainError::Dist("MPI is already initialised in this process".into()));
    }
    let (universe, level) = mpi::initialize_with_threading(Threading::Funneled)
        .ok_or_else(|| TrainError::Dist("MPI could not be initialised".into()))?;
    if level == Threading::Single {
        return Err(TrainError::Dist(
            "the MPI library offers only MPI_THREAD_SINGLE; rlhf needs MPI_THREAD_FUNNELED (its compute threads never call MPI)\n\
             hint: use an MPI built with thread support (Open MPI and MPICH are by default)"
                .into(),
        ));
    }
    let w = universe.world();
    let world = MpiWorld {
        rank: w.rank() as usize,
        size: w.size() as usize,
        thread: std::thread::current().id(),
    };
    Ok((universe, world))
}

impl MpiWorld {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// `MPI_COMM_WORLD`, after checking that the caller is the thread that initialised MPI.
    fn comm(&self) -> Result<SimpleCommunicator> {
        if std::thread::current().id() != self.thread {
            return Err(TrainError::Dist(
                "a collective was called from a thread other than the one that started MPI (MPI_THREAD_FUNNELED)\n\
                 hint: run training on the thread that called rlhf_train::dist::start"
                    .into(),
            ));
        }
        Ok(SimpleCommunicator::world())
    }

    pub fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        let c = self.comm()?;
        // No safe MPI_IN_PLACE in rsmpi: reduce from a copy of each chunk.
        for chunk in buf.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            c.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }

    pub fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        let c = self.comm()?;
        for chunk in buf.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            match op {
                ReduceOp::Sum => c.all_reduce_into(&send[..], chunk, SystemOperation::sum()),
                ReduceOp::Max => c.all_reduce_into(&send[..], chunk, SystemOperation::max()),
                ReduceOp::Min => c.all_reduce_into(&send[..], chunk, SystemOperation::min()),
            }
        }
        Ok(())
    }

    pub fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        let c = self.comm()?;
        let root = c.process_at_rank(0);
        for chunk in buf.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    pub fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let c = self.comm()?;
        if mine.len() > MAX_COUNT {
            return Err(TrainError::Dist(format!(
                "all-gather of {} bytes from one rank: more than one MPI call can carry ({MAX_COUNT})",
                mine.len()
            )));
        }
        let mut counts = vec![0i32; self.size];
        c.all_gather_into(&(mine.len() as i32), &mut counts[..]);
        let total: usize = counts.iter().map(|&n| n as usize).sum();
        if total > MAX_COUNT {
            return Err(TrainError::Dist(format!(
                "all-gather of {total} bytes: more than one MPI call can carry ({MAX_COUNT})"
            )));
        }
        if total == 0 {
            // Every rank knows it: nothing to move (and MPI refuses empty receive buffers).
            return Ok(vec![Vec::new(); self.size]);
        }
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |at, &n| {
                let d = *at;
                *at += n;
                Some(d)
            })
            .collect();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            c.all_gather_varcount_into(mine, &mut part);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&n, &d)| all[d as usize..(d + n) as usize].to_vec())
            .collect())
    }

    pub fn barrier(&self) -> Result<()> {
        self.comm()?.barrier();
        Ok(())
    }

    /// `MPI_Abort` on the world: the launcher ends every rank.
    pub fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}
