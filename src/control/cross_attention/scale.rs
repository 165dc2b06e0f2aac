//! IP-Adapter scales: one number, or per-block scales as InstantStyle uses them, with the semantics of
//! diffusers' `set_ip_adapter_scale` (blocks left out get 0).

use std::collections::BTreeMap;
use std::str::FromStr;

use serde_json::Value;

use crate::models::unet::CrossAttentionLayer;
use crate::{Error, Result};

/// How strongly an adapter's image stream is added, per attention layer.
#[derive(Debug, Clone, PartialEq)]
pub enum IpScale {
    /// The same scale in every layer.
    Uniform(f64),
    /// `{"down": S, "mid": S, "up": S}` where each S is a number for the whole part, or (down/up)
    /// `{"block_i": number | [number per attention of the block]}`; parts and blocks left out get 0.
    PerBlock(BTreeMap<String, Value>),
}

impl Default for IpScale {
    fn default() -> Self {
        IpScale::Uniform(1.0)
    }
}

impl FromStr for IpScale {
    type Err = Error;

    /// A number (`0.6`) or a JSON object (`{"up": {"block_0": [0.0, 1.0, 0.0]}}`).
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(v) = s.trim().parse::<f64>() {
            return if v.is_finite() {
                Ok(IpScale::Uniform(v))
            } else {
                Err(Error::invalid("IP-Adapter scale must be finite"))
            };
        }
        let parsed: Value = serde_json::from_str(s).map_err(|e| {
            Error::invalid(format!("IP-Adapter scale `{s}` is neither a number nor a JSON object: {e}"))
        })?;
        match parsed {
            Value::Object(map) => {
                if let Some(part) = map.keys().find(|k| !["down", "mid", "up"].contains(&k.as_str())) {
                    return Err(Error::invalid(format!(
                        "IP-Adapter scale names `{part}`; the parts are \"down\", \"mid\" and \"up\""
                    )));
                }
                Ok(IpScale::PerBlock(map.into_iter().collect()))
            }
            other => Err(Error::invalid(format!("IP-Adapter scale must be a number or a JSON object, got {other}"))),
        }
    }
}

fn number(v: &Value, what: &str) -> Result<f64> {
    v.as_f64().ok_or_else(|| Error::invalid(format!("IP-Adapter scale for {what} must be a number, got {v}")))
}

/// `down_blocks.1.attentions.0` → ("down", 1, 0); `mid_block.attentions.0` → ("mid", 0, 0).
fn attention_of(layer_id: &str) -> Option<(&str, usize, usize)> {
    let parts: Vec<&str> = layer_id.split('.').collect();
    match parts.as_slice() {
        ["mid_block", "attentions", j, ..] => Some(("mid", 0, j.parse().ok()?)),
        [blocks, i, "attentions", j, ..] => {
            let part = blocks.strip_suffix("_blocks")?;
            Some((part, i.parse().ok()?, j.parse().ok()?))
        }
        _ => None,
    }
}

impl IpScale {
    /// The scale of each of `layers` (in their order).
    pub fn per_layer(&self, layers: &[CrossAttentionLayer]) -> Result<Vec<f64>> {
        let map = match self {
            IpScale::Uniform(s) => return Ok(vec![*s; layers.len()]),
            IpScale::PerBlock(map) => map,
        };
        let positions = layers
            .iter()
            .map(|l| attention_of(&l.id).ok_or_else(|| Error::invalid(format!("unexpected layer id `{}`", l.id))))
            .collect::<Result<Vec<_>>>()?;
        // Attentions per block, by part.
        let mut blocks: BTreeMap<(&str, usize), usize> = BTreeMap::new();
        for &(part, i, j) in &positions {
            let count = blocks.entry((part, i)).or_default();
            *count = (*count).max(j + 1);
        }
        let mut scales: BTreeMap<(&str, usize, usize), f64> = BTreeMap::new();
        if let Some(mid) = map.get("mid") {
            let value = match mid {
                Value::Array(list) if list.len() == 1 => &list[0],
                Value::Array(list) => {
                    return Err(Error::invalid(format!(
                        "IP-Adapter scale: expected 1 scale for mid, got {}",
                        list.len()
                    )));
                }
                v => v,
            };
            scales.insert(("mid", 0, 0), number(value, "mid")?);
        }
        for part in ["down", "up"] {
            let Some(spec) = map.get(part) else { continue };
            let with_attention: Vec<(usize, usize)> =
                blocks.iter().filter(|((p, _), _)| *p == part).map(|(&(_, i), &n)| (i, n)).collect();
            let per_block: BTreeMap<usize, &Value> = match spec {
                Value::Object(named) => {
                    let mut out = BTreeMap::new();
                    for (name, value) in named {
                        let i = name.strip_prefix("block_").and_then(|i| i.parse::<usize>().ok()).ok_or_else(|| {
                            Error::invalid(format!("IP-Adapter scale: `{part}.{name}` is not of the form block_<i>"))
                        })?;
                        if !with_attention.iter().any(|&(b, _)| b == i) {
                            let names: Vec<String> = with_attention.iter().map(|(b, _)| format!("block_{b}")).collect();
                            return Err(Error::invalid(format!(
                                "IP-Adapter scale names {part}.{name}, which has no attention layers in this UNet \
                                 ({part} blocks with attention: {})",
                                names.join(", ")
                            )));
                        }
                        out.insert(i, value);
                    }
                    out
                }
                v => with_attention.iter().map(|&(i, _)| (i, v)).collect(),
            };
            for (i, value) in per_block {
                let count = with_attention.iter().find(|&&(b, _)| b == i).map_or(0, |&(_, n)| n);
                let what = format!("{part}.block_{i}");
                let values: Vec<f64> = match value {
                    Value::Array(list) if list.len() == 1 => vec![number(&list[0], &what)?; count],
                    Value::Array(list) if list.len() == count => {
                        list.iter().map(|v| number(v, &what)).collect::<Result<_>>()?
                    }
                    Value::Array(list) => {
                        return Err(Error::invalid(format!(
                            "IP-Adapter scale: expected {count} scales for {what}, got {}",
                            list.len()
                        )));
                    }
                    v => vec![number(v, &what)?; count],
                };
                for (j, s) in values.into_iter().enumerate() {
                    scales.insert((part, i, j), s);
                }
            }
        }
        Ok(positions.iter().map(|p| scales.get(p).copied().unwrap_or(0.0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(id: &str) -> CrossAttentionLayer {
        CrossAttentionLayer {
            id: id.into(),
            channels: 8,
            context_dim: 32,
            downsamplings: 0,
            only_cross_attention: false,
        }
    }

    fn layers() -> Vec<CrossAttentionLayer> {
        let mut out = Vec::new();
        for (b, n) in [(0, 2), (1, 2)] {
            for j in 0..n {
                out.push(layer(&format!("down_blocks.{b}.attentions.{j}.transformer_blocks.0.attn2")));
            }
        }
        for (b, n) in [(1, 3), (2, 3)] {
            for j in 0..n {
                out.push(layer(&format!("up_blocks.{b}.attentions.{j}.transformer_blocks.0.attn2")));
            }
        }
        out.push(layer("mid_block.attentions.0.transformer_blocks.0.attn2"));
        out
    }

    #[test]
    fn per_block_scales_expand_like_diffusers() {
        let s: IpScale = r#"{"down": {"block_1": [0.0, 1.0]}, "up": {"block_1": [0.0, 0.5, 0.0]}}"#.parse().unwrap();
        let got = s.per_layer(&layers()).unwrap();
        assert_eq!(got, vec![0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let s: IpScale = r#"{"down": 0.3, "mid": [0.7], "up": {"block_2": 2}}"#.parse().unwrap();
        let got = s.per_layer(&layers()).unwrap();
        assert_eq!(got, vec![0.3, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.7]);
        assert_eq!("0.6".parse::<IpScale>().unwrap().per_layer(&layers()).unwrap(), vec![0.6; 11]);
    }

    #[test]
    fn bad_scales_are_rejected() {
        for bad in [r#"{"up": {"block_0": 1.0}}"#, r#"{"down": {"block_1": [1, 2, 3]}}"#, r#"{"side": 1}"#, "[1, 2]"] {
            let parsed = bad.parse::<IpScale>().and_then(|s| s.per_layer(&layers()));
            assert!(parsed.is_err(), "{bad}");
        }
    }
}
