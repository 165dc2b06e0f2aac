//! Lenient reading of JSON request fields, as A1111's clients send them: unknown fields and
//! `null` ignored, numbers sent as strings accepted; a wrong type is an error naming the field,
//! what was expected and what was found.

use serde_json::{Map, Value};

/// A client error message.
pub type FieldError = String;

/// The fields of a JSON object body.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
}

fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 40 { format!("{}…", &text[..text.floor_char_boundary(40)]) } else { text }
}

impl<'a> Fields<'a> {
    /// The fields of `value`, which must be an object; `what` names it in errors.
    pub fn of(value: &'a Value, what: &str) -> Result<Self, FieldError> {
        match value {
            Value::Object(map) => Ok(Self { map, prefix: String::new() }),
            other => Err(format!("{what} must be a JSON object, found {}", describe(other))),
        }
    }

    /// The fields of the object in field `name` (inside `parent` for messages).
    pub fn nested(map: &'a Map<String, Value>, prefix: &str) -> Self {
        Self { map, prefix: format!("{prefix}.") }
    }

    /// The value of `name` unless absent or null.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn wrong(&self, name: &str, expected: &str, found: &Value) -> FieldError {
        format!("field `{}{name}`: expected {expected}, found {}", self.prefix, describe(found))
    }

    /// A string field.
    pub fn str(&self, name: &str) -> Result<Option<&'a str>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(name, "a string", other)),
        }
    }

    /// A number field (a numeric string too).
    pub fn f64(&self, name: &str) -> Result<Option<f64>, FieldError> {
        let value = match self.get(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(Value::Bool(b)) => Some(f64::from(u8::from(*b))),
            Some(_) => None,
        };
        match value {
            Some(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(self.wrong(name, "a finite number", self.map.get(name).unwrap_or(&Value::Null))),
        }
    }

    /// An integer field in `[min, max]`.
    pub fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, FieldError> {
        let Some(v) = self.f64(name)? else { return Ok(None) };
        if v.fract() != 0.0 {
            return Err(format!("field `{}{name}`: expected a whole number, found {v}", self.prefix));
        }
        if v < min as f64 || v > max as f64 {
            return Err(format!("field `{}{name}`: {v} is outside [{min}, {max}]", self.prefix));
        }
        Ok(Some(v as i64))
    }

    /// A non-negative integer field at most `max`.
    pub fn usize(&self, name: &str, max: usize) -> Result<Option<usize>, FieldError> {
        Ok(self.int(name, 0, max as i64)?.map(|v| v as usize))
    }

    /// A number in `[min, max]`.
    pub fn ranged(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, FieldError> {
        match self.f64(name)? {
            Some(v) if v < min || v > max => {
                Err(format!("field `{}{name}`: {v} is outside [{min}, {max}]", self.prefix))
            }
            other => Ok(other),
        }
    }

    /// A boolean field (`"true"`/`"false"`, 0/1 too).
    pub fn bool(&self, name: &str) -> Result<Option<bool>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => {
                Ok(Some(n.as_f64() == Some(1.0)))
            }
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => Err(self.wrong(name, "true or false", other)),
        }
    }

    /// An array field.
    pub fn array(&self, name: &str) -> Result<Option<&'a Vec<Value>>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(self.wrong(name, "an array", other)),
        }
    }

    /// An object field.
    pub fn object(&self, name: &str) -> Result<Option<&'a Map<String, Value>>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(other) => Err(self.wrong(name, "an object", other)),
        }
    }

    /// A field given as a name or an index into `names` (A1111's enums: `"Crop and Resize"` or
    /// `1`), as the index.
    pub fn choice(&self, name: &str, names: &[&str]) -> Result<Option<usize>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => {
                if let Ok(i) = s.trim().parse::<usize>()
                    && i < names.len()
                {
                    return Ok(Some(i));
                }
                names
                    .iter()
                    .position(|n| n.eq_ignore_ascii_case(s.trim()))
                    .map(Some)
                    .ok_or_else(|| format!("field `{}{name}`: `{s}` is not one of: {}", self.prefix, names.join(", ")))
            }
            Some(Value::Number(n)) => match n.as_u64() {
                Some(i) if (i as usize) < names.len() => Ok(Some(i as usize)),
                _ => Err(format!("field `{}{name}`: {n} is not an index below {}", self.prefix, names.len())),
            },
            Some(other) => Err(self.wrong(name, "a name or an index", other)),
        }
    }
}
