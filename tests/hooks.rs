//! The extension model: a mechanism added without touching the UNet or the sampling loop, defined
//! entirely in this file; hook ids checked against the UNet; the words of a prompt located.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::{DType, Tensor};
use common::{ReplayNoise, load_fixture, max_abs_diff, repo_path};
use diffctl::Result;
use diffctl::control::{ContextInfo, Control, StepContext};
use diffctl::models::unet::{Conditioning, Hooks, UNetControls, UNetHook, UNetInput};
use diffctl::pipeline::{Generated, LoadOptions, StableDiffusion};

const SOURCE: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
const TARGET: &str = "up_blocks.1.attentions.0.transformer_blocks.0.attn2";

/// Observes the input of one self-attention layer and adds a multiple of its mean token to the
/// output of a cross-attention layer further up: a test-only mechanism, no UNet or loop change.
struct Probe {
    scale: f64,
    kept: Option<Tensor>,
    seen: Rc<RefCell<Seen>>,
}

/// What a probe saw, readable after the generation took it.
#[derive(Default)]
struct Seen {
    /// The shape of every input of the observed layer.
    observed: Vec<Vec<usize>>,
    /// Steps it contributed to.
    steps: usize,
    /// The prompt's words as `edit_context` saw them.
    prompt_words: Vec<String>,
}

impl Probe {
    fn new(scale: f64) -> (Self, Rc<RefCell<Seen>>) {
        let seen = Rc::new(RefCell::new(Seen::default()));
        (Self { scale, kept: None, seen: seen.clone() }, seen)
    }
}

impl UNetHook for Probe {
    fn layer_ids(&self) -> Vec<String> {
        vec![SOURCE.into(), TARGET.into()]
    }

    fn before_attention(&mut self, id: &str, hidden: &Tensor) -> Result<Option<Tensor>> {
        if id == SOURCE {
            self.seen.borrow_mut().observed.push(hidden.dims().to_vec());
            // [B, L, C] → [B, 1, 1]: one number per sample.
            self.kept = Some(hidden.mean_keepdim(1)?.mean_keepdim(2)?);
        }
        Ok(None)
    }

    fn after_attention(
        &mut self,
        id: &str,
        output: Tensor,
        _layer: &dyn diffctl::models::unet::AttentionLayerView,
    ) -> Result<Tensor> {
        match (&self.kept, id == TARGET) {
            (Some(kept), true) => Ok(output.broadcast_add(&(kept * self.scale)?)?),
            _ => Ok(output),
        }
    }
}

impl Control for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn edit_context(&mut self, context: Tensor, info: &ContextInfo) -> Result<Tensor> {
        self.seen.borrow_mut().prompt_words = info.prompt_words.iter().map(|w| w.text.clone()).collect();
        Ok(context)
    }

    fn contribute(&mut self, _step: &mut StepContext) -> Result<UNetControls> {
        self.seen.borrow_mut().steps += 1;
        Ok(UNetControls::default())
    }

    fn hook(&mut self) -> Option<&mut dyn UNetHook> {
        Some(self)
    }
}

fn model() -> StableDiffusion {
    StableDiffusion::load(&repo_path("tests/fixtures/models/sd1-tiny"), &LoadOptions::default()).unwrap()
}

fn generate(model: &StableDiffusion, controls: &mut [Box<dyn Control>]) -> Result<Generated> {
    let case = &common::pipeline_cases()[0];
    let fixture = load_fixture(&case.file);
    model.generate(&case.request(&fixture), controls, &mut ReplayNoise::from_fixture(&fixture), &mut |_| {})
}

#[test]
fn a_mechanism_defined_outside_the_crate_observes_one_layer_and_changes_another() {
    let model = model();
    let case = &common::pipeline_cases()[0];
    let plain = generate(&model, &mut []).unwrap();
    let (silent, _) = Probe::new(0.0);
    let same = generate(&model, &mut [Box::new(silent)]).unwrap();
    assert_eq!(max_abs_diff(&same.latents, &plain.latents), 0.0, "a zero contribution changes nothing");

    let (probe, seen) = Probe::new(1.0);
    let changed = generate(&model, &mut [Box::new(probe)]).unwrap();
    assert!(max_abs_diff(&changed.latents, &plain.latents) > 1e-3, "the contribution is visible");

    // One observation per step, of the layer's input [2B, h·w, C] (a guided batch of one).
    let seen = seen.borrow();
    let (h, w) = (plain.latents.dim(2).unwrap(), plain.latents.dim(3).unwrap());
    let channels = model.unet.config().blocks[0].channels;
    assert_eq!(seen.steps, case.steps);
    assert_eq!(seen.observed, vec![vec![2, h * w, channels]; case.steps]);
    // The words of the prompt reached the text-embedding stage.
    let (_, words) = model.tokenizer.encode_padded_words(&case.prompt).unwrap();
    assert_eq!(seen.prompt_words, words.iter().map(|w| w.text.clone()).collect::<Vec<_>>());
    assert!(!seen.prompt_words.is_empty());
}

/// A control whose hook names a layer the UNet does not have.
struct Misspelt;

impl UNetHook for Misspelt {
    fn layer_ids(&self) -> Vec<String> {
        vec!["down_blocks.0.attentions.7.transformer_blocks.0.attn1".into()]
    }
}

impl Control for Misspelt {
    fn name(&self) -> &str {
        "misspelt"
    }

    fn contribute(&mut self, _step: &mut StepContext) -> Result<UNetControls> {
        panic!("a generation with an unknown hook id must not start");
    }

    fn hook(&mut self) -> Option<&mut dyn UNetHook> {
        Some(self)
    }
}

#[test]
fn a_hook_naming_a_missing_layer_stops_the_generation_before_it_starts() {
    let err = generate(&model(), &mut [Box::new(Misspelt)]).err().unwrap().to_string();
    assert!(err.contains("misspelt") && err.contains("down_blocks.0.attentions.7.transformer_blocks.0.attn1"), "{err}");
    assert!(err.contains("not a layer of this UNet"), "{err}");
}

/// A hook that returns a tensor of another shape is an error, not a corrupted pass.
struct Reshaper;

impl UNetHook for Reshaper {
    fn layer_ids(&self) -> Vec<String> {
        vec!["mid_block".into()]
    }

    fn at_output(&mut self, _id: &str, output: Tensor) -> Result<Tensor> {
        Ok(output.narrow(0, 0, 1)?)
    }
}

#[test]
fn a_hook_that_changes_a_shape_is_an_error() {
    let model = model();
    let cfg = model.unet.config();
    let conditioning = Conditioning::text(
        Tensor::zeros((2, 77, cfg.blocks[0].cross_attention_dim), DType::F32, model.device()).unwrap(),
    );
    let sample = Tensor::zeros((2, cfg.in_channels, 8, 8), DType::F32, model.device()).unwrap();
    let t = Tensor::new(&[10f32, 10.0], model.device()).unwrap();
    let mut hook = Reshaper;
    let err = model
        .unet
        .forward(UNetInput::new(&sample, &t, &conditioning).with_hooks(Hooks::new(vec![&mut hook])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("mid_block") && err.contains("shape"), "{err}");
}

#[test]
fn every_layer_of_the_unet_is_a_hook_point() {
    let model = model();
    let points = model.unet.hook_points();
    for id in [
        "conv_in",
        "down_blocks.0",
        "down_blocks.0.resnets.0",
        "down_blocks.0.attentions.0",
        "down_blocks.0.attentions.0.transformer_blocks.0",
        SOURCE,
        "mid_block",
        "mid_block.resnets.1",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0",
        TARGET,
    ] {
        assert!(points.contains(id), "{id} missing from {points:?}");
    }
    let attn2 = points.iter().filter(|p| p.ends_with("attn2")).count();
    assert_eq!(attn2, model.unet.config().cross_attention_layers().len());
}

#[test]
fn prompt_words_map_to_their_rows() {
    let model = model();
    let prompt = "a photo of a man img, smiling";
    let (ids, words) = model.tokenizer.encode_padded_words(prompt).unwrap();
    assert_eq!(ids, model.tokenizer.encode_padded(prompt).unwrap());
    let texts: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
    assert_eq!(texts, ["a", "photo", "of", "a", "man", "img", ",", "smiling"]);
    let man = words.iter().find(|w| w.text == "man").unwrap();
    // Rows are contiguous from 1 (after the start token), each word's tokens in order.
    assert_eq!(words[0].rows.start, 1);
    for pair in words.windows(2) {
        assert_eq!(pair[0].rows.end, pair[1].rows.start);
    }
    let man_ids: Vec<u32> = ids[man.rows.clone()].to_vec();
    assert_eq!(man_ids, model.tokenizer.encode_words("man").unwrap());

    // Truncation keeps only the words that fit in 77.
    let long = "word ".repeat(100);
    let (_, words) = model.tokenizer.encode_padded_words(&long).unwrap();
    assert_eq!(words.last().unwrap().rows.end, 76);
}

/// Switches the text context from step `from` on (as PhotoMaker's `start_merge_step` does) and
/// records the latents after every step.
struct Switch {
    from: usize,
    latents: Rc<RefCell<Vec<Tensor>>>,
}

impl Control for Switch {
    fn name(&self) -> &str {
        "switch"
    }

    fn step_context(&mut self, step_index: usize, context: &Tensor) -> Result<Option<Tensor>> {
        Ok((step_index >= self.from).then(|| context * 0.5).transpose()?)
    }

    fn contribute(&mut self, _step: &mut StepContext) -> Result<UNetControls> {
        Ok(UNetControls::default())
    }

    fn after_step(&mut self, _step_index: usize, latents: &Tensor) -> Result<()> {
        self.latents.borrow_mut().push(latents.clone());
        Ok(())
    }
}

#[test]
fn a_control_can_change_the_context_at_a_step_and_read_the_latents_after_each() {
    let model = model();
    let steps = common::pipeline_cases()[0].steps;
    let plain = generate(&model, &mut []).unwrap();
    let never = Rc::new(RefCell::new(Vec::new()));
    let out = generate(&model, &mut [Box::new(Switch { from: steps, latents: never.clone() })]).unwrap();
    assert_eq!(max_abs_diff(&out.latents, &plain.latents), 0.0);
    assert_eq!(never.borrow().len(), steps);
    assert_eq!(max_abs_diff(never.borrow().last().unwrap(), &plain.latents), 0.0);

    // Switching at the last step changes only that step: the latents before it match.
    let late = Rc::new(RefCell::new(Vec::new()));
    let out = generate(&model, &mut [Box::new(Switch { from: steps - 1, latents: late.clone() })]).unwrap();
    assert!(max_abs_diff(&out.latents, &plain.latents) > 1e-4);
    assert_eq!(max_abs_diff(&late.borrow()[steps - 2], &never.borrow()[steps - 2]), 0.0);
}
