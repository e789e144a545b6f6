//! What the online trainers (GRPO, RLOO) share: generation and clipping keys with TRL 1.16's
//! names (`GRPOConfig` / `RLOOConfig`), the reward functions, and the batch plan TRL derives
//! in `__post_init__` and its `RepeatSampler`.
//!
//! **Sizes.** `per_device_train_batch_size` counts *completions* (not prompts). With `P`
//! processes, `G = num_generations`, `GA = gradient_accumulation_steps`:
//! ```text
//! neither generation_batch_size nor steps_per_generation set:
//!     steps_per_generation = GA,  generation_batch_size = bs · P · steps_per_generation
//! generation_batch_size set:  steps_per_generation = generation_batch_size / (bs · P)   (must divide)
//! steps_per_generation set:   generation_batch_size = bs · P · steps_per_generation
//! generation_batch_size % G == 0;  G ≥ 2
//! prompts per generation = generation_batch_size / G
//! ```
//! One generation batch feeds `steps_per_generation × num_iterations` micro-steps (each
//! takes the next `bs` completions of the buffered batch; after `steps_per_generation` of
//! them the buffer is reused, `num_iterations` times in all); an optimizer step takes
//! `GA` micro-steps. An epoch is `⌊prompts / prompts per generation⌋` generation batches
//! (TRL's `RepeatSampler` drops the prompts of an incomplete last batch), so
//! `⌊prompts / prompts per generation⌋ · steps_per_generation · num_iterations` micro-steps,
//! and `⌈micro-steps / GA⌉` optimizer steps (transformers counts a last partial window).

use rlhf_models::GenerationConfig;
use serde::{Deserialize, Serialize};

use crate::collate::PadSide;
use crate::config_values::opt_numbers;
use crate::error::{Result, TrainError};
use crate::reward_fns::{check_weights, RewardArgs};
use crate::trainer::TrainingArgs;

/// The `GRPOConfig` / `RLOOConfig` fields both online trainers have (TRL 1.16 names and
/// defaults; RLOO overrides `num_generations` to 2), plus the reward functions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OnlineArgs {
    /// Completions sampled per prompt (`G`, the group size); at least 2.
    pub num_generations: usize,
    /// `G` in evaluation (default: `num_generations`).
    pub num_generations_eval: Option<usize>,
    /// Tokens generated per completion at most.
    pub max_completion_length: usize,
    /// Completions per generation batch over all processes (exclusive with
    /// `steps_per_generation`; default `per_device_train_batch_size × processes ×
    /// steps_per_generation`).
    pub generation_batch_size: Option<usize>,
    /// Micro-steps served by one generation batch (default: `gradient_accumulation_steps`).
    pub steps_per_generation: Option<usize>,
    /// Sampling temperature; the training log-probs are taken at it too.
    pub temperature: f64,
    /// Nucleus sampling (1.0: off); generation only, the log-probs use the full softmax.
    pub top_p: f64,
    /// Top-k sampling (0: off); generation only.
    pub top_k: usize,
    /// Shuffle the prompts each epoch.
    pub shuffle_dataset: bool,
    /// Optimisation passes over each generation batch (μ in the GRPO paper).
    pub num_iterations: usize,
    /// Lower clip `1 − epsilon` of the ratio.
    pub epsilon: f64,
    /// Upper clip `1 + epsilon_high` (default: `epsilon`; DAPO uses 0.28).
    pub epsilon_high: Option<f64>,
    /// Truncated completions (no EOS within `max_completion_length`) get no loss.
    pub mask_truncated_completions: bool,
    /// One weight per reward function (default: 1.0 each); a list or `1.0,0.5`.
    #[serde(deserialize_with = "opt_numbers")]
    pub reward_weights: Option<Vec<f64>>,
    /// The reward functions.
    #[serde(flatten)]
    pub rewards: RewardArgs,
}

impl Default for OnlineArgs {
    /// `GRPOConfig`'s defaults.
    fn default() -> Self {
        Self {
            num_generations: 8,
            num_generations_eval: None,
            max_completion_length: 512,
            generation_batch_size: None,
            steps_per_generation: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            shuffle_dataset: true,
            num_iterations: 1,
            epsilon: 0.2,
            epsilon_high: None,
            mask_truncated_completions: false,
            reward_weights: None,
            rewards: RewardArgs::default(),
        }
    }
}

/// Where the reference log-probs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceModel {
    /// No reference: the KL weight `beta` is 0 (GRPO's default) and none is loaded.
    None,
    /// The policy with its LoRA adapters disabled (`use_peft`), as TRL does under PEFT.
    AdaptersDisabled,
    /// A frozen copy of the policy's starting weights (`model_name_or_path` loaded again).
    InitialPolicy,
    /// A frozen model from this path (DPO's `ref_model_name_or_path`).
    Model(String),
}

impl ReferenceModel {
    /// The reference of a run: none when `needed` is false, else the given path, else the
    /// adapters-disabled policy under PEFT, else a frozen copy of the initial policy.
    pub fn resolve(needed: bool, path: Option<&str>, use_peft: bool) -> Self {
        match (needed, path) {
            (false, _) => Self::None,
            (true, Some(p)) => Self::Model(p.to_string()),
            (true, None) if use_peft => Self::AdaptersDisabled,
            (true, None) => Self::InitialPolicy,
        }
    }
}

/// Every size of an online run, derived once from the config (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct OnlinePlan {
    /// Data-parallel processes `P`.
    pub num_processes: usize,
    /// Group size `G` in training.
    pub num_generations: usize,
    /// Group size in evaluation.
    pub num_generations_eval: usize,
    /// Completions per micro-batch (per process).
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Micro-steps served by one generation batch before the buffer is reused.
    pub steps_per_generation: usize,
    /// Completions per generation batch over all processes.
    pub generation_batch_size: usize,
    /// Completions per generation batch on one process (`bs × steps_per_generation`).
    pub local_generation_batch_size: usize,
    /// Distinct prompts per generation batch (`generation_batch_size / G`).
    pub prompts_per_generation: usize,
    /// Passes over each generation batch.
    pub num_iterations: usize,
    /// Micro-steps per generation batch (`steps_per_generation × num_iterations`).
    pub micro_steps_per_generation: usize,
    /// Completions per optimizer step over all processes (`bs × GA × P`).
    pub completions_per_optimizer_step: usize,
    /// Tokens generated per completion at most.
    pub max_completion_length: usize,
    /// Sampling temperature (also the log-probs' temperature).
    pub temperature: f64,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Top-p (1.0: off).
    pub top_p: f64,
    /// Lower clip ε.
    pub epsilon_low: f64,
    /// Upper clip (`epsilon_high`, else ε).
    pub epsilon_high: f64,
    /// The reward functions' names in scoring order (`rewards/<name>/*`).
    pub reward_names: Vec<String>,
    /// One weight per reward function.
    pub reward_weights: Vec<f64>,
    /// Prompts are padded on the left for generation (TRL requires a left-padding
    /// tokenizer); completions on the right.
    pub prompt_padding: PadSide,
    /// Settings TRL accepts with a warning; the trainer logs them once.
    pub warnings: Vec<String>,
}

/// How long a run is over a prompt set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLength {
    /// Generation batches per epoch.
    pub generations_per_epoch: usize,
    /// Prompts left out of each epoch (the incomplete last generation batch).
    pub prompts_dropped_per_epoch: usize,
    /// Micro-steps per epoch.
    pub micro_steps_per_epoch: u64,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps of the run (`max_steps`, else `⌈num_train_epochs × steps_per_epoch⌉`).
    pub total_steps: u64,
}

fn positive(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(TrainError::setting(key, format!("must be a positive number, got {v}")))
    }
}

fn non_negative(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(TrainError::setting(key, format!("must be a number >= 0, got {v}")))
    }
}

impl OnlineArgs {
    /// Validates these keys with the shared `args` into the plan of `trainer` (`GRPO` or
    /// `RLOO`, for messages) on `num_processes` processes; every bad combination is a
    /// [`TrainError::Setting`] saying how to fix it.
    pub fn plan(&self, args: &TrainingArgs, num_processes: usize, trainer: &str) -> Result<OnlinePlan> {
        args.validate()?;
        let bad = |k: &str, msg: String| Err(TrainError::setting(k, msg));
        if num_processes == 0 {
            return Err(TrainError::Config("the run has no process (num_processes = 0)".into()));
        }
        let g = self.num_generations;
        if g < 2 {
            return bad(
                "num_generations",
                format!(
                    "{trainer} needs at least 2 generations per prompt to compute advantages, got {g}\n\
                     hint: set num_generations to 2 or more"
                ),
            );
        }
        for (k, v) in [
            ("max_completion_length", self.max_completion_length),
            ("num_iterations", self.num_iterations),
            ("generation_batch_size", self.generation_batch_size.unwrap_or(1)),
            ("steps_per_generation", self.steps_per_generation.unwrap_or(1)),
            ("num_generations_eval", self.num_generations_eval.unwrap_or(1)),
        ] {
            if v == 0 {
                return bad(k, "must be at least 1".into());
            }
        }
        let bs = args.per_device_train_batch_size;
        let (spg, gen_batch) = self.generation_sizes(args, num_processes)?;
        let g_eval = self.num_generations_eval.unwrap_or(g);
        let eval_global = args.per_device_eval_batch_size * num_processes;
        if args.eval_strategy != "no" && !eval_global.is_multiple_of(g_eval) {
            return bad(
                "per_device_eval_batch_size",
                format!(
                    "the evaluation batch (per_device_eval_batch_size {} × processes {num_processes} = {eval_global}) \
                     must hold whole groups of {g_eval} generations\nhint: make it a multiple of {g_eval} (or set \
                     num_generations_eval)",
                    args.per_device_eval_batch_size
                ),
            );
        }
        positive("temperature", self.temperature)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("must be in (0, 1], got {} (1.0 turns it off)", self.top_p),
            );
        }
        non_negative("epsilon", self.epsilon)?;
        let epsilon_high = self.epsilon_high.unwrap_or(self.epsilon);
        non_negative("epsilon_high", epsilon_high)?;
        self.rewards.rules(self.max_completion_length)?;
        let reward_names = self.rewards.names();
        let reward_weights = check_weights(self.reward_weights.as_deref(), reward_names.len())?;
        Ok(OnlinePlan {
            num_processes,
            num_generations: g,
            num_generations_eval: g_eval,
            per_device_train_batch_size: bs,
            gradient_accumulation_steps: args.gradient_accumulation_steps,
            steps_per_generation: spg,
            generation_batch_size: gen_batch,
            local_generation_batch_size: bs * spg,
            prompts_per_generation: gen_batch / g,
            num_iterations: self.num_iterations,
            micro_steps_per_generation: spg * self.num_iterations,
            completions_per_optimizer_step: bs * num_processes * args.gradient_accumulation_steps,
            max_completion_length: self.max_completion_length,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            epsilon_low: self.epsilon,
            epsilon_high,
            reward_names,
            reward_weights,
            prompt_padding: PadSide::Left,
            warnings: Vec::new(),
        })
    }

    /// `(steps_per_generation, generation_batch_size)` as TRL's `__post_init__` derives them
    /// (module docs), checking that the generation batch holds whole groups.
    fn generation_sizes(&self, args: &TrainingArgs, num_processes: usize) -> Result<(usize, usize)> {
        let bs = args.per_device_train_batch_size;
        let g = self.num_generations;
        let global_bs = bs.saturating_mul(num_processes);
        let (spg, gen_batch) = match (self.generation_batch_size, self.steps_per_generation) {
            (None, None) => (
                args.gradient_accumulation_steps,
                global_bs.saturating_mul(args.gradient_accumulation_steps),
            ),
            (Some(gb), None) => {
                if !gb.is_multiple_of(global_bs) {
                    return Err(TrainError::setting(
                        "generation_batch_size",
                        format!(
                            "({gb}) must be a multiple of the global batch size per_device_train_batch_size × \
                             processes ({bs} × {num_processes} = {global_bs})\nhint: set generation_batch_size to \
                             a multiple of {global_bs}, or set steps_per_generation instead"
                        ),
                    ));
                }
                (gb / global_bs, gb)
            }
            (None, Some(spg)) => (spg, global_bs.saturating_mul(spg)),
            (Some(_), Some(_)) => {
                return Err(TrainError::setting(
                    "generation_batch_size",
                    "and steps_per_generation cannot both be set (each determines the other)\nhint: keep one",
                ))
            }
        };
        if !gen_batch.is_multiple_of(g) {
            return Err(TrainError::setting(
                "num_generations",
                format!(
                    "the generation batch ({gen_batch} completions = per_device_train_batch_size {bs} × processes \
                     {num_processes} × steps_per_generation {spg}) must hold whole groups of num_generations ({g})\n\
                     hint: make per_device_train_batch_size (or generation_batch_size) a multiple of {g}, or pick a \
                     num_generations that divides {gen_batch}"
                ),
            ));
        }
        Ok((spg, gen_batch))
    }
}

impl OnlinePlan {
    /// The sampling settings of generation; `eos` and `pad` come from the model.
    pub fn generation_config(&self, eos_token_id: Vec<u32>, pad_token_id: u32) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_completion_length,
            min_new_tokens: 0,
            do_sample: true,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            eos_token_id,
            pad_token_id,
        }
    }

    /// The run's length over `n_prompts` training prompts with `args`' `max_steps` /
    /// `num_train_epochs`. Fewer prompts than one generation batch needs is an error.
    pub fn run_length(&self, n_prompts: usize, args: &TrainingArgs) -> Result<RunLength> {
        let generations = n_prompts / self.prompts_per_generation;
        if generations == 0 {
            return Err(TrainError::setting(
                "per_device_train_batch_size",
                format!(
                    "one generation batch needs {} prompts (generation_batch_size {} / num_generations {}), but the \
                     training data has {n_prompts}\nhint: add prompts, or lower per_device_train_batch_size, \
                     steps_per_generation or generation_batch_size",
                    self.prompts_per_generation, self.generation_batch_size, self.num_generations
                ),
            ));
        }
        let micro = (generations * self.micro_steps_per_generation) as u64;
        let steps_per_epoch = micro.div_ceil(self.gradient_accumulation_steps as u64).max(1);
        let total_steps = if args.max_steps > 0 {
            args.max_steps as u64
        } else {
            ((args.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1)
        };
        Ok(RunLength {
            generations_per_epoch: generations,
            prompts_dropped_per_epoch: n_prompts - generations * self.prompts_per_generation,
            micro_steps_per_epoch: micro,
            steps_per_epoch,
            total_steps,
        })
    }
}

#[cfg(test)]
mod tests;
