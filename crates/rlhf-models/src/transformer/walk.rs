//! The weight walk: every parameter and projection of the backbone with its checkpoint name,
//! in one order for loading, saving and LoRA targeting.

use rlhf_peft::{Param, Proj};

use super::{Layer, LmHead, Mlp, Qkv, Transformer};
use crate::error::Result;
use crate::family::{MlpNames, QkvNames};

impl Transformer {
    /// Every weight with its checkpoint name (relative to the backbone prefix; the untied
    /// head is the top-level `lm_head.weight`), in the walk's order. A projection's weight is
    /// `(out, in)` here whatever the file layout ([`Transformer::stored_transposed`]).
    pub fn named_params(&self) -> Vec<(String, &Param)> {
        let names = self.cfg.family.names();
        let mut out = vec![(format!("{}.weight", names.embed_tokens), &self.embed_tokens)];
        if let (Some(p), Some(n)) = (&self.embed_positions, names.embed_positions) {
            out.push((format!("{n}.weight"), p));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let pre = format!("{}.{i}", names.layers);
            l.input_norm
                .push_params(&mut out, format!("{pre}.{}", names.input_norm));
            for (name, proj) in l.projections(&pre, names) {
                for (k, prm) in proj.params() {
                    out.push((format!("{name}.{k}"), prm));
                }
            }
            if let (Some(q), Some(k)) = (&l.attn.q_norm, &l.attn.k_norm) {
                q.push_params(&mut out, format!("{pre}.{}.{}", names.attn, names.q_norm));
                k.push_params(&mut out, format!("{pre}.{}.{}", names.attn, names.k_norm));
            }
            l.post_norm.push_params(&mut out, format!("{pre}.{}", names.post_norm));
        }
        self.norm.push_params(&mut out, names.final_norm.to_string());
        if let LmHead::Untied(p) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), p));
        }
        out
    }

    /// Mutable access to every weight, by the names of [`Transformer::named_params`].
    pub fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let names = self.cfg.family.names();
        let mut out: Vec<(String, &mut Param)> =
            vec![(format!("{}.weight", names.embed_tokens), &mut self.embed_tokens)];
        if let (Some(p), Some(n)) = (&mut self.embed_positions, names.embed_positions) {
            out.push((format!("{n}.weight"), p));
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let pre = format!("{}.{i}", names.layers);
            let Layer {
                input_norm,
                attn,
                post_norm,
                mlp,
            } = l;
            input_norm.push_params_mut(&mut out, format!("{pre}.{}", names.input_norm));
            post_norm.push_params_mut(&mut out, format!("{pre}.{}", names.post_norm));
            if let Some(q) = &mut attn.q_norm {
                q.push_params_mut(&mut out, format!("{pre}.{}.{}", names.attn, names.q_norm));
            }
            if let Some(k) = &mut attn.k_norm {
                k.push_params_mut(&mut out, format!("{pre}.{}.{}", names.attn, names.k_norm));
            }
            for (name, proj) in projections_mut(&mut attn.qkv, &mut attn.o_proj, mlp, &pre, names) {
                for (k, prm) in proj.params_mut() {
                    out.push((format!("{name}.{k}"), prm));
                }
            }
        }
        self.norm.push_params_mut(&mut out, names.final_norm.to_string());
        if let LmHead::Untied(p) = &mut self.lm_head {
            out.push(("lm_head.weight".to_string(), p));
        }
        out
    }

    /// Whether the checkpoint stores the weight `name` (of [`Transformer::named_params`])
    /// transposed: GPT-2's `Conv1D` projection weights.
    pub fn stored_transposed(&self, name: &str) -> bool {
        self.cfg.family.conv1d_weights()
            && name.ends_with(".weight")
            && self
                .projections()
                .iter()
                .any(|(p, _)| name.len() == p.len() + 7 && name.starts_with(p.as_str()))
    }

    /// Every projection with its module name (relative to the backbone prefix), in the
    /// walk's order: GPT-2 `h.{i}.attn.c_attn`, ...; Llama `layers.{i}.self_attn.q_proj`, ...
    pub fn projections(&self) -> Vec<(String, &Proj)> {
        let names = self.cfg.family.names();
        let mut out = Vec::with_capacity(7 * self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            out.extend(l.projections(&format!("{}.{i}", names.layers), names));
        }
        out
    }

    /// Mutable access to the projections, named as in [`Transformer::projections`].
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj)> {
        let names = self.cfg.family.names();
        let mut out = Vec::with_capacity(7 * self.layers.len());
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.extend(l.projections_mut(&format!("{}.{i}", names.layers), names));
        }
        out
    }

    /// Makes every weight trainable (full fine-tuning) or frozen.
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()> {
        for (_, p) in self.named_params_mut() {
            if trainable {
                p.make_trainable()?;
            } else {
                p.freeze();
            }
        }
        Ok(())
    }
}

impl Layer {
    /// The projections of this block with their module names under `pre` (`h.{i}` /
    /// `layers.{i}`): attention q/k/v (or the fused one), output, then the MLP's.
    pub(super) fn projections(&self, pre: &str, names: &crate::family::Names) -> Vec<(String, &Proj)> {
        let mut refs: Vec<&Proj> = match &self.attn.qkv {
            Qkv::Fused(p) => vec![p],
            Qkv::Split { q, k, v } => vec![q, k, v],
        };
        refs.push(&self.attn.o_proj);
        refs.extend(match &self.mlp {
            Mlp::Plain { fc_in, fc_out } => vec![fc_in, fc_out],
            Mlp::Gated { gate, up, down } => vec![gate, up, down],
        });
        named(pre, names, refs)
    }

    pub(super) fn projections_mut(&mut self, pre: &str, names: &crate::family::Names) -> Vec<(String, &mut Proj)> {
        projections_mut(&mut self.attn.qkv, &mut self.attn.o_proj, &mut self.mlp, pre, names)
    }
}

/// The projections of a block's attention and MLP, mutably, named as in
/// [`Layer::projections`] (the norms stay free to borrow beside them).
fn projections_mut<'a>(
    qkv: &'a mut Qkv,
    o_proj: &'a mut Proj,
    mlp: &'a mut Mlp,
    pre: &str,
    names: &crate::family::Names,
) -> Vec<(String, &'a mut Proj)> {
    let mut refs: Vec<&mut Proj> = match qkv {
        Qkv::Fused(p) => vec![p],
        Qkv::Split { q, k, v } => vec![q, k, v],
    };
    refs.push(o_proj);
    refs.extend(match mlp {
        Mlp::Plain { fc_in, fc_out } => vec![fc_in, fc_out],
        Mlp::Gated { gate, up, down } => vec![gate, up, down],
    });
    named(pre, names, refs)
}

/// A block's projections in the walk's order, each with its module name under `pre`.
fn named<P>(pre: &str, names: &crate::family::Names, projections: Vec<P>) -> Vec<(String, P)> {
    let attn = format!("{pre}.{}", names.attn);
    let mlp = format!("{pre}.{}", names.mlp);
    let qkv: &[&str] = match &names.qkv {
        QkvNames::Fused(n) => std::slice::from_ref(n),
        QkvNames::Split(n) => n,
    };
    let mlp_proj: &[&str] = match &names.mlp_proj {
        MlpNames::Plain(n) => n,
        MlpNames::Gated(n) => n,
    };
    let module_names: Vec<String> = qkv
        .iter()
        .map(|n| format!("{attn}.{n}"))
        .chain(std::iter::once(format!("{attn}.{}", names.o_proj)))
        .chain(mlp_proj.iter().map(|n| format!("{mlp}.{n}")))
        .collect();
    // Fused and split attention, plain and gated MLPs give 4, 5, 6 or 7 projections, so the
    // counts agree exactly when the family's names match its pieces.
    if module_names.len() != projections.len() {
        unreachable!("invariant: the family's names match its attention and MLP pieces");
    }
    module_names.into_iter().zip(projections).collect()
}
