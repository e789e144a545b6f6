//! Python's `json.dumps` over template values: the `tojson` filter transformers registers.
//!
//! transformers replaces Jinja2's `tojson` (which HTML-escapes `<`, `>`, `&`, `'`) with
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`
//! (`transformers/utils/chat_template_utils.py`, `_cached_compile_jinja_template`). This module
//! reproduces `json.dumps` byte for byte on JSON-like values: separators `", "` / `": "` (or
//! `","` / `": "` with an indent), insertion-ordered keys, Python's float `repr`, and the escapes
//! of `json.encoder` (`ensure_ascii` selects `\uXXXX` for non-ASCII text).

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// The options of `json.dumps` a template can pass.
#[derive(Clone, Debug, Default)]
pub(crate) struct DumpOptions {
    /// `ensure_ascii`: escape every non-ASCII character.
    pub ensure_ascii: bool,
    /// `indent`: `None` for one line, else the string put once per level.
    pub indent: Option<String>,
    /// `separators`: item and key separators (default `", "`/`": "`, or `","`/`": "` with an indent).
    pub separators: Option<(String, String)>,
    /// `sort_keys`.
    pub sort_keys: bool,
}

/// `json.dumps(value, **opts)`.
pub(crate) fn dumps(value: &Value, opts: &DumpOptions) -> Result<String, Error> {
    let (item_sep, key_sep) = match &opts.separators {
        Some((a, b)) => (a.clone(), b.clone()),
        None if opts.indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let mut w = Writer {
        opts,
        item_sep,
        key_sep,
        out: &mut out,
    };
    w.value(value, 0)?;
    Ok(out)
}

struct Writer<'a> {
    opts: &'a DumpOptions,
    item_sep: String,
    key_sep: String,
    out: &'a mut String,
}

impl Writer<'_> {
    fn newline(&mut self, level: usize) {
        if let Some(ind) = &self.opts.indent {
            self.out.push('\n');
            for _ in 0..level {
                self.out.push_str(ind);
            }
        }
    }

    fn value(&mut self, v: &Value, level: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self.out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(v)?,
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.seq(&items, level)?;
            }
            ValueKind::Map => self.map(v, level)?,
            ValueKind::Undefined => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: Object of type Undefined is not JSON serializable",
                ))
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of kind {other} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn seq(&mut self, items: &[Value], level: usize) -> Result<(), Error> {
        if items.is_empty() {
            self.out.push_str("[]");
            return Ok(());
        }
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.out.push_str(&sep);
            }
            self.newline(level + 1);
            self.value(item, level + 1)?;
        }
        self.newline(level);
        self.out.push(']');
        Ok(())
    }

    fn map(&mut self, v: &Value, level: usize) -> Result<(), Error> {
        let mut keys: Vec<Value> = v.try_iter()?.collect();
        if keys.is_empty() {
            self.out.push_str("{}");
            return Ok(());
        }
        if self.opts.sort_keys {
            keys.sort_by_key(|k| k.to_string());
        }
        self.out.push('{');
        for (i, key) in keys.iter().enumerate() {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.out.push_str(&sep);
            }
            self.newline(level + 1);
            // Python turns non-string keys into strings (`1` -> "1", `True` -> "true").
            match key.kind() {
                ValueKind::String => self.string(key.as_str().unwrap_or_default()),
                ValueKind::Bool => self.string(if key.is_true() { "true" } else { "false" }),
                ValueKind::None => self.string("null"),
                ValueKind::Number => {
                    let mut s = String::new();
                    std::mem::swap(self.out, &mut s);
                    self.number(key)?;
                    std::mem::swap(self.out, &mut s);
                    self.string(&s);
                }
                other => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: keys must be str, int, float, bool or None, not {other}"),
                    ))
                }
            }
            let sep = self.key_sep.clone();
            self.out.push_str(&sep);
            let item = v.get_item(key)?;
            self.value(&item, level + 1)?;
        }
        self.newline(level);
        self.out.push('}');
        Ok(())
    }

    fn number(&mut self, v: &Value) -> Result<(), Error> {
        if v.is_integer() {
            // Integers print as they are (i64, u64 or wider).
            self.out.push_str(&v.to_string());
        } else {
            let x = f64::try_from(v.clone())?;
            self.out.push_str(&float_repr(x));
        }
        Ok(())
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{08}' => self.out.push_str("\\b"),
                '\u{0c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 => self.out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.opts.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits that round-trip,
/// positional for decimal exponents in [-4, 16), else `d.ddde±XX`; `NaN`, `Infinity`.
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "1.2345e-5".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("invariant: {:e} has an exponent");
    let exp: i32 = exp.parse().expect("invariant: {:e} exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123.456, "123.456"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5, "-2.5"),
            (0.30000000000000004, "0.30000000000000004"),
            (-0.0, "-0.0"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn dumps_matches_python_separators_indent_and_escapes() {
        let v = Value::from(minijinja::value::Serde(serde_json::json!({
            "b": [1, 2.5, null, true],
            "a": "é<&>'\"\n\u{1f}",
            "e": {},
            "f": []
        })));
        let plain = dumps(&v, &DumpOptions::default()).unwrap();
        assert_eq!(
            plain,
            r#"{"b": [1, 2.5, null, true], "a": "é<&>'\"\n\u001f", "e": {}, "f": []}"#
        );
        let opts = DumpOptions {
            indent: Some("  ".into()),
            sort_keys: true,
            ensure_ascii: true,
            ..DumpOptions::default()
        };
        let pretty = dumps(&v, &opts).unwrap();
        assert_eq!(
            pretty,
            "{\n  \"a\": \"\\u00e9<&>'\\\"\\n\\u001f\",\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"e\": {},\n  \"f\": []\n}"
        );
    }
}
