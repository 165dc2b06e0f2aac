//! Layer hooks: code that reads and writes the UNet's intermediate tensors by layer id, the way
//! diffusers swaps an attention processor or registers a forward hook on a module by its name.
//!
//! Every hookable point is named by its diffusers module path:
//! - `conv_in`;
//! - module outputs [B, C, H, W]: `down_blocks.{i}`, `mid_block`, `up_blocks.{i}`, each block's
//!   `resnets.{j}` and `attentions.{j}` (a whole spatial transformer), and each transformer block
//!   `….attentions.{j}.transformer_blocks.{t}` (output [B, L, C] tokens);
//! - attention layers `….transformer_blocks.{t}.attn1` (self-attention) and `….attn2`
//!   (cross-attention), whose input can be read, whose keys/values can take joined tokens, and
//!   whose output can be replaced.
//!
//! A hook names the points it acts on ([`UNetHook::layer_ids`]); the pipeline checks them against
//! the loaded UNet ([`super::UNet::hook_points`]) before a generation starts, so a misspelt id is
//! an error rather than a silent no-op.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::Tensor;

use crate::{Error, Result};

/// An attention layer as a hook sees it after it attended: its input and a way to compute what it
/// gives without joined tokens.
pub trait AttentionLayerView {
    /// The layer's input hidden states [B, L, C] (the normed tokens it attends from).
    fn input(&self) -> &Tensor;
    /// The layer's output for the batch rows `rows` of its input, attending to its own keys and
    /// values only (no tokens joined): `attn1(x[rows], x[rows])` for self-attention.
    fn plain(&self, rows: Range<usize>) -> Result<Tensor>;
}

/// Reads and writes the UNet's intermediate tensors at the points it names. Every method has a
/// default that leaves the tensor alone, so a hook implements only the points it uses.
pub trait UNetHook {
    /// The ids (diffusers module paths) of the points this hook acts on.
    fn layer_ids(&self) -> Vec<String>;

    /// Before attention layer `id` attends, with its input `hidden` [B, L, C]: may keep `hidden`
    /// (observe) and may return tokens [B, S, C] to join to the layer's keys and values (they go
    /// through its `to_k`/`to_v` as its own input does).
    fn before_attention(&mut self, _id: &str, _hidden: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// After attention layer `id` attended (joined tokens included): returns its output [B, L, C],
    /// `output` itself or a replacement (e.g. blended with `layer.plain(…)`).
    fn after_attention(&mut self, _id: &str, output: Tensor, _layer: &dyn AttentionLayerView) -> Result<Tensor> {
        Ok(output)
    }

    /// At the output of module `id`: may keep it and returns it or a replacement of the same shape.
    fn at_output(&mut self, _id: &str, output: Tensor) -> Result<Tensor> {
        Ok(output)
    }
}

/// The hooks of one UNet call, indexed by the ids they name.
#[derive(Default)]
pub struct Hooks<'a> {
    hooks: Vec<&'a mut dyn UNetHook>,
    by_id: HashMap<String, Vec<usize>>,
}

impl<'a> Hooks<'a> {
    /// No hooks.
    pub fn none() -> Self {
        Self::default()
    }

    /// The hooks in `hooks`, each called at the points it names, in list order where several name
    /// the same point.
    pub fn new(hooks: Vec<&'a mut dyn UNetHook>) -> Self {
        let mut by_id: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, hook) in hooks.iter().enumerate() {
            for id in hook.layer_ids() {
                let entry = by_id.entry(id).or_default();
                if entry.last() != Some(&i) {
                    entry.push(i);
                }
            }
        }
        Self { hooks, by_id }
    }

    /// Whether no hook acts anywhere.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn at(&self, id: &str) -> &[usize] {
        self.by_id.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Runs the `before_attention` of every hook at `id`; their tokens joined along the sequence.
    pub(crate) fn before_attention(&mut self, id: &str, hidden: &Tensor) -> Result<Option<Tensor>> {
        let mut joined: Option<Tensor> = None;
        for i in self.at(id).to_vec() {
            if let Some(tokens) = self.hooks[i].before_attention(id, hidden)? {
                let (b, _, c) = tokens.dims3()?;
                let (hb, _, hc) = hidden.dims3()?;
                if (b, c) != (hb, hc) {
                    return Err(Error::invalid(format!(
                        "a hook joined tokens of shape {:?} to `{id}`, whose input is {:?}: batch and width must match",
                        tokens.dims(),
                        hidden.dims()
                    )));
                }
                joined = Some(match joined {
                    Some(prev) => Tensor::cat(&[prev, tokens], 1)?,
                    None => tokens,
                });
            }
        }
        Ok(joined)
    }

    /// Runs the `after_attention` of every hook at `id` in turn.
    pub(crate) fn after_attention(
        &mut self,
        id: &str,
        mut output: Tensor,
        layer: &dyn AttentionLayerView,
    ) -> Result<Tensor> {
        for i in self.at(id).to_vec() {
            output = self.hooks[i].after_attention(id, output, layer)?;
        }
        Ok(output)
    }

    /// Runs the `at_output` of every hook at `id` in turn, checking each keeps the shape.
    pub(crate) fn at_output(&mut self, id: &str, mut output: Tensor) -> Result<Tensor> {
        for i in self.at(id).to_vec() {
            let dims = output.dims().to_vec();
            output = self.hooks[i].at_output(id, output)?;
            if output.dims() != dims {
                return Err(Error::invalid(format!(
                    "a hook at `{id}` changed its output's shape from {dims:?} to {:?}",
                    output.dims()
                )));
            }
        }
        Ok(output)
    }

    /// Checks that every id the hooks name is one of `points`; `owner` names the hooks in the error.
    pub fn check(&self, points: &std::collections::BTreeSet<String>, owner: &str) -> Result<()> {
        let mut unknown: Vec<&String> = self.by_id.keys().filter(|id| !points.contains(*id)).collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(id) => Err(Error::invalid(format!(
                "{owner}: hook point `{id}` is not a layer of this UNet{} (ids are diffusers module paths, e.g. \
                 `{}`)",
                if unknown.len() > 1 { format!(" ({} such ids)", unknown.len()) } else { String::new() },
                points
                    .iter()
                    .find(|p| p.ends_with("attn1"))
                    .or(points.first())
                    .map(String::as_str)
                    .unwrap_or("conv_in")
            ))),
        }
    }
}
