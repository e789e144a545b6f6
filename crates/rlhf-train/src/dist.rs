//! The collective layer of data-parallel training: how the ranks of one run talk.
//!
//! One process is [`Collective::Single`], where every operation is the identity and costs
//! nothing; the ranks of an MPI job (`mpirun`, `srun`; cargo feature `mpi`) are
//! [`Collective::Mpi`]. Trainers call this layer, never MPI: a GPU variant (gradients over
//! NCCL on device buffers, set-up and scalars over MPI) takes its place as a third variant
//! (`docs/scaling.md`).
//!
//! The world is a process property, as MPI's is: [`start`] joins the job once (the training
//! commands call it), and [`world`] hands every part of the library the same
//! [`Collective`]; without [`start`] it is [`Collective::Single`].
//!
//! Every method is **collective**: each rank calls it the same number of times in the same
//! order, from the thread that called [`start`] (MPI's `Funneled` level: the compute runs on
//! rayon's workers, MPI on one thread).
//!
//! What the trainers do with it (the design of `docs/scaling.md`):
//! - the global batch of a step is split across ranks, each rank taking a contiguous part
//!   of every micro-batch ([`split`]); losses are normalised by the *global* count (pairs,
//!   tokens, response tokens), so the sum over ranks is the one-process loss;
//! - gradients are summed over ranks once per optimizer step ([`Collective::all_reduce_grads`]),
//!   before the NaN guard and clipping, so every rank takes the same branch and update;
//! - rank 0 broadcasts the initial trainable weights ([`Collective::broadcast_vars`]) and
//!   alone writes the run directory ([`Collective::on_main`]);
//! - a stop request on any rank stops every rank after the same step
//!   ([`Collective::agree_stop`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use crate::error::{Result, TrainError};
use crate::optim::Grads;
use crate::stop::StopSignal;

mod launch;
#[cfg(feature = "mpi")]
mod mpi_comm;

pub use launch::{launch_from, start, Launch, Session};

/// This rank's identity and how ranks talk (see the module docs).
pub enum Collective {
    /// One process: every operation is the identity.
    Single,
    /// The ranks of an MPI job; host buffers (feature `mpi`).
    #[cfg(feature = "mpi")]
    Mpi(mpi_comm::MpiWorld),
}

/// A reduction over ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Maximum.
    Max,
    /// Minimum.
    Min,
}

static WORLD: OnceLock<Collective> = OnceLock::new();
static SINGLE: Collective = Collective::Single;

/// The collective of this process: the MPI world after [`start`] joined one, else
/// [`Collective::Single`].
pub fn world() -> &'static Collective {
    WORLD.get().unwrap_or(&SINGLE)
}

/// Refuses to resume, with ranks different from the run that wrote `ckpt` (`saved`;
/// `None`: one process): the data order, the per-rank random streams and the global batch
/// all depend on the number of ranks.
pub fn check_resume_ranks(ckpt: &std::path::Path, saved: Option<usize>) -> Result<()> {
    let (saved, now) = (saved.unwrap_or(1), world().size());
    if saved == now {
        return Ok(());
    }
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    Err(TrainError::Checkpoint(format!(
        "{} was written by a run of {saved} rank{}, and this run has {now} rank{}; the global batch, the data order \
         and the random streams depend on the number of ranks, so the run would not continue as it started\n\
         hint: resume with {saved} rank{} ({}), or start a new run",
        ckpt.display(),
        plural(saved),
        plural(now),
        plural(saved),
        if saved == 1 {
            "without mpirun".to_string()
        } else {
            format!("mpirun -np {saved} ...")
        }
    )))
}

/// Rank `rank`'s part `[start, end)` of `n` items split over `world` ranks in contiguous,
/// near-equal parts (`floor(r·n/world)` boundaries): a full micro-batch of `world × b`
/// gives every rank exactly `b`, a short last one at most one item more on some ranks.
pub fn split(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let w = world.max(1);
    (rank * n / w)..((rank + 1) * n / w)
}

/// Gradient all-reduce accounting since the process started (every rank counts its own).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// `all_reduce_grads` calls (optimizer steps).
    pub calls: u64,
    /// Bytes of gradient this rank sent into the reductions.
    pub bytes: u64,
    /// Seconds spent in the reductions (waiting for slower ranks included).
    pub seconds: f64,
}

static GRAD_CALLS: AtomicU64 = AtomicU64::new(0);
static GRAD_BYTES: AtomicU64 = AtomicU64::new(0);
static GRAD_NANOS: AtomicU64 = AtomicU64::new(0);

/// What the gradient all-reduces of this process cost so far.
pub fn grad_traffic() -> Traffic {
    Traffic {
        calls: GRAD_CALLS.load(Ordering::Relaxed),
        bytes: GRAD_BYTES.load(Ordering::Relaxed),
        seconds: GRAD_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

/// Parameters per gradient bucket: small tensors are reduced together, and the extra memory
/// of a reduction stays bounded (two buffers of 64 MiB).
const BUCKET: usize = 1 << 24;

impl Collective {
    /// This rank, `0..size`.
    pub fn rank(&self) -> usize {
        match self {
            Self::Single => 0,
            #[cfg(feature = "mpi")]
            Self::Mpi(w) => w.rank(),
        }
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        match self {
            Self::Single => 1,
            #[cfg(feature = "mpi")]
            Self::Mpi(w) => w.size(),
        }
    }

    /// Whether this is rank 0, the one that writes files and the console.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Sums `buf` element-wise over ranks, in place.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(w) => w.all_reduce_f32(buf),
        }
    }

    /// Reduces `buf` element-wise over ranks with `op`, in place (f64: sums of counts stay
    /// exact).
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        match (self, op) {
            (Self::Single, _) => Ok(()),
            #[cfg(feature = "mpi")]
            (Self::Mpi(w), op) => w.all_reduce_f64(buf, op),
        }
    }

    /// Replaces `buf` on every rank by rank 0's (lengths must agree).
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(w) => w.broadcast_f32(buf),
        }
    }

    /// Every rank's `mine`, in rank order.
    pub fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        match self {
            Self::Single => Ok(vec![mine.to_vec()]),
            #[cfg(feature = "mpi")]
            Self::Mpi(w) => w.all_gather_bytes(mine),
        }
    }

    /// Waits until every rank is here.
    pub fn barrier(&self) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(w) => w.barrier(),
        }
    }

    // ---- built on the primitives above (backend-independent) ----

    /// Runs `f` on rank 0 only and gives every rank its outcome: `Ok` everywhere, or the
    /// error on rank 0 and [`TrainError::Dist`] with its text elsewhere. Also a barrier:
    /// no rank returns before rank 0 is done (e.g. before a checkpoint is complete).
    pub fn on_main(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.size() == 1 {
            return f();
        }
        let out = if self.is_main() { Some(f()) } else { None };
        let msg = match &out {
            Some(Err(e)) => e.to_string(),
            _ => String::new(),
        };
        let gathered = self.all_gather_bytes(msg.as_bytes())?;
        let main_msg = String::from_utf8_lossy(&gathered[0]).into_owned();
        match out {
            Some(out) => out,
            None if main_msg.is_empty() => Ok(()),
            None => Err(TrainError::Dist(format!("rank 0 failed: {main_msg}"))),
        }
    }

    /// Rank 0's value of `flag` on every rank (e.g. what rank 0 sees on disk).
    pub fn main_says(&self, flag: bool) -> Result<bool> {
        let mut v = [if self.is_main() && flag { 1.0 } else { 0.0 }];
        self.all_reduce_f64(&mut v, ReduceOp::Max)?;
        Ok(v[0] > 0.0)
    }

    /// Whether `flag` holds on any rank.
    pub fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [f64::from(u8::from(flag))];
        self.all_reduce_f64(&mut v, ReduceOp::Max)?;
        Ok(v[0] > 0.0)
    }

    /// The stop request of the run: this rank's reason, or another rank's (`SIGTERM` wins
    /// over `SIGINT`), so every rank stops after the same step. One collective per call.
    pub fn agree_stop(&self, stop: &StopSignal) -> Result<Option<String>> {
        let local = stop.requested();
        if self.size() == 1 {
            return Ok(local.map(str::to_string));
        }
        let code = |r: &str| match r {
            "SIGINT" => 1.0,
            "SIGTERM" => 2.0,
            _ => 3.0,
        };
        let mut v = [local.map_or(0.0, code)];
        self.all_reduce_f64(&mut v, ReduceOp::Max)?;
        Ok(match (local, v[0] as u8) {
            (Some(r), _) => Some(r.to_string()),
            (None, 0) => None,
            (None, 1) => Some("SIGINT".into()),
            (None, 2) => Some("SIGTERM".into()),
            (None, _) => Some("a stop request on another rank".into()),
        })
    }

    /// Sums gradients over ranks, in place, once per optimizer step. A parameter that has a
    /// gradient on any rank gets one everywhere (zeros where a rank had none); one that has
    /// none anywhere stays `None`. `sizes`: each parameter's element count.
    pub fn all_reduce_grads(&self, grads: &mut Grads, sizes: &[usize]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let t = Instant::now();
        let mut present: Vec<f64> = grads.sums.iter().map(|g| f64::from(u8::from(g.is_some()))).collect();
        self.all_reduce_f64(&mut present, ReduceOp::Max)?;
        let todo: Vec<usize> = (0..grads.sums.len()).filter(|&i| present[i] > 0.0).collect();
        let mut bytes = 0u64;
        let mut k = 0;
        while k < todo.len() {
            // One bucket: consecutive parameters up to BUCKET elements (at least one).
            let mut end = k + 1;
            let mut n = sizes[todo[k]];
            while end < todo.len() && n + sizes[todo[end]] <= BUCKET {
                n += sizes[todo[end]];
                end += 1;
            }
            let mut buf = Vec::with_capacity(n);
            for &i in &todo[k..end] {
                match &grads.sums[i] {
                    Some(g) if g.len() == sizes[i] => buf.extend_from_slice(g),
                    Some(g) => {
                        return Err(TrainError::Dist(format!(
                            "gradient {i} has {} values, its parameter {}",
                            g.len(),
                            sizes[i]
                        )))
                    }
                    None => buf.resize(buf.len() + sizes[i], 0.0),
                }
            }
            self.all_reduce_f32(&mut buf)?;
            bytes += 4 * buf.len() as u64;
            let mut off = 0;
            for &i in &todo[k..end] {
                grads.sums[i] = Some(buf[off..off + sizes[i]].to_vec());
                off += sizes[i];
            }
            k = end;
        }
        GRAD_CALLS.fetch_add(1, Ordering::Relaxed);
        GRAD_BYTES.fetch_add(bytes, Ordering::Relaxed);
        GRAD_NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Gives every rank rank 0's values of `vars` (the initial trainable weights: cheap
    /// insurance against any rank-dependent initialisation).
    pub fn broadcast_vars(&self, vars: &[&Var]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        for v in vars {
            let t = v.as_tensor();
            let mut host = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.broadcast_f32(&mut host)?;
            let new = Tensor::from_vec(host, t.shape(), t.device())?.to_dtype(t.dtype())?;
            v.set(&new)?;
        }
        Ok(())
    }

    /// Makes per-rank metrics global: keys starting `min_` / `max_` take the minimum /
    /// maximum over ranks, every other key the mean weighted by `weight` (this rank's
    /// examples or tokens), so a mean over examples stays a mean over all ranks' examples.
    /// A key missing on some rank counts there with weight 0; a value that is not finite on
    /// any rank is NaN everywhere (so the NaN guard trips on every rank together).
    pub fn reduce_metrics(&self, m: &mut BTreeMap<String, f64>, weight: f64) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let keys = self.all_keys(m)?;
        let n = keys.len();
        // sums: [Σ v·w per key, Σ w per key, non-finite count per key]; extremes: [min, -max].
        let mut sums = vec![0.0; 3 * n];
        let mut extremes = vec![f64::INFINITY; n];
        for (i, k) in keys.iter().enumerate() {
            let Some(&v) = m.get(k) else { continue };
            if !v.is_finite() {
                sums[2 * n + i] = 1.0;
                continue;
            }
            sums[i] = v * weight;
            sums[n + i] = weight;
            extremes[i] = if k.starts_with("max_") { -v } else { v };
        }
        self.all_reduce_f64(&mut sums, ReduceOp::Sum)?;
        self.all_reduce_f64(&mut extremes, ReduceOp::Min)?;
        m.clear();
        for (i, k) in keys.into_iter().enumerate() {
            let v = if sums[2 * n + i] > 0.0 {
                f64::NAN
            } else if k.starts_with("min_") {
                extremes[i]
            } else if k.starts_with("max_") {
                -extremes[i]
            } else if sums[n + i] > 0.0 {
                sums[i] / sums[n + i]
            } else {
                0.0
            };
            m.insert(k, v);
        }
        Ok(())
    }

    /// The keys of every rank's `m`, sorted (the same list on every rank).
    pub fn all_keys<V>(&self, m: &BTreeMap<String, V>) -> Result<Vec<String>> {
        let joined = m.keys().cloned().collect::<Vec<_>>().join("\n");
        let mut keys = BTreeSet::new();
        for bytes in self.all_gather_bytes(joined.as_bytes())? {
            let s = String::from_utf8_lossy(&bytes).into_owned();
            keys.extend(s.split('\n').filter(|k| !k.is_empty()).map(str::to_string));
        }
        Ok(keys.into_iter().collect())
    }

    /// Every rank's `mine`, concatenated in rank order.
    pub fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        self.all_gather_le(mine, f32::to_le_bytes, f32::from_le_bytes)
    }

    /// Every rank's `mine`, concatenated in rank order, in f64 (rewards keep their precision;
    /// NaN travels as NaN).
    pub fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<f64>> {
        self.all_gather_le(mine, f64::to_le_bytes, f64::from_le_bytes)
    }

    /// Every rank's `mine` in rank order, each value sent as its `N` little-endian bytes.
    fn all_gather_le<T: Copy, const N: usize>(
        &self,
        mine: &[T],
        to: fn(T) -> [u8; N],
        from: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        if self.size() == 1 {
            return Ok(mine.to_vec());
        }
        let bytes: Vec<u8> = mine.iter().flat_map(|&x| to(x)).collect();
        Ok(self
            .all_gather_bytes(&bytes)?
            .iter()
            .flat_map(|b| {
                b.chunks_exact(N).map(|c| {
                    let mut w = [0u8; N];
                    w.copy_from_slice(c);
                    from(w)
                })
            })
            .collect())
    }

    /// Every rank's token sequences, concatenated in rank order.
    pub fn all_gather_seqs(&self, mine: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
        if self.size() == 1 {
            return Ok(mine.to_vec());
        }
        // Layout: count, then each sequence as (length, tokens...), all u32 little-endian.
        let mut words = vec![mine.len() as u32];
        for s in mine {
            words.push(s.len() as u32);
            words.extend_from_slice(s);
        }
        let bytes: Vec<u8> = words.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut out = Vec::new();
        for b in self.all_gather_bytes(&bytes)? {
            let w: Vec<u32> = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let (mut at, count) = (1, w.first().copied().unwrap_or(0) as usize);
            for _ in 0..count {
                let len = w[at] as usize;
                out.push(w[at + 1..at + 1 + len].to_vec());
                at += 1 + len;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_give_full_batches_to_every_rank_and_cover_short_ones() {
        assert_eq!((0..2).map(|r| split(8, r, 2)).collect::<Vec<_>>(), vec![0..4, 4..8]);
        assert_eq!(
            (0..3).map(|r| split(7, r, 3)).collect::<Vec<_>>(),
            vec![0..2, 2..4, 4..7]
        );
        assert_eq!((0..2).map(|r| split(1, r, 2)).collect::<Vec<_>>(), vec![0..0, 0..1]);
        assert_eq!(split(5, 0, 1), 0..5);
    }

    #[test]
    fn one_process_collectives_are_the_identity() {
        let w = Collective::Single;
        let mut g = Grads {
            sums: vec![Some(vec![1.0, 2.0]), None],
        };
        w.all_reduce_grads(&mut g, &[2, 3]).unwrap();
        assert_eq!(g.sums, vec![Some(vec![1.0, 2.0]), None]);
        let mut m = BTreeMap::from([("loss".to_string(), 0.5), ("min_reward".to_string(), -1.0)]);
        w.reduce_metrics(&mut m, 3.0).unwrap();
        assert_eq!(m["loss"], 0.5);
        assert_eq!(
            w.all_gather_seqs(&[vec![1, 2], vec![]]).unwrap(),
            vec![vec![1, 2], vec![]]
        );
        assert_eq!(w.all_gather_f64(&[1.5, f64::NAN]).unwrap()[0], 1.5);
        let stop = StopSignal::new();
        assert_eq!(w.agree_stop(&stop).unwrap(), None);
        stop.request("SIGTERM");
        assert_eq!(w.agree_stop(&stop).unwrap().as_deref(), Some("SIGTERM"));
        let mut ran = false;
        w.on_main(|| {
            ran = true;
            Ok(())
        })
        .unwrap();
        assert!(ran);
    }
}
