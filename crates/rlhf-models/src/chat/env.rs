//! The minijinja environment that renders chat templates as transformers' Jinja2 one does.
//!
//! transformers (`utils/chat_template_utils.py`, `_cached_compile_jinja_template`) renders with
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[AssistantTracker, loopcontrols])` plus a `tojson` filter without HTML escaping and
//! the globals `raise_exception` and `strftime_now`. Here:
//! - trim/lstrip blocks through minijinja's `SyntaxConfig`; `{% break %}`/`{% continue %}` with the
//!   `loop_controls` feature; Python's string and dict methods (`.startswith`, `.split`, `.items`)
//!   from `minijinja_contrib::pycompat`; no auto-escaping.
//! - `tojson` is [`pyjson::dumps`](super::pyjson::dumps) with `json.dumps`' arguments.
//! - `raise_exception(msg)` fails the render with an error whose source is [`TemplateRaised`].
//! - `strftime_now(fmt)` formats the [`Clock`]'s time with Python's `strftime` codes.
//! - `{% generation %}...{% endgeneration %}` (AssistantTracker) is rewritten into a
//!   `{% filter %}` block (the same block-tag whitespace rules) whose filter wraps its body in
//!   the noncharacters U+FDD0 / U+FDD1 when spans are tracked; the renderer turns the marks into
//!   byte spans and removes them.

use std::sync::Arc;

use chrono::format::{Item, StrftimeItems};
use chrono::NaiveDateTime;
use minijinja::value::{Kwargs, Rest, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State};

use super::pyjson::{dumps, DumpOptions};

/// Opens a generation span in a tracked render (a Unicode noncharacter, never in real text).
pub(crate) const GEN_OPEN: char = '\u{FDD0}';
/// Closes a generation span.
pub(crate) const GEN_CLOSE: char = '\u{FDD1}';
/// The context variable that switches span marks on.
pub(crate) const TRACK_VAR: &str = "__rlhf_track_generation";
const GEN_FILTER: &str = "__rlhf_generation";

/// The time `strftime_now` reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Clock {
    /// The local time at each render (`datetime.now()`, what transformers uses).
    #[default]
    Local,
    /// A fixed time, for reproducible renders (Llama 3.2 prints "Today Date").
    Fixed(NaiveDateTime),
}

impl Clock {
    /// Parses `YYYY-MM-DD` (midnight) or `YYYY-MM-DDTHH:MM:SS` into a fixed clock.
    pub fn fixed(s: &str) -> Option<Self> {
        let s = s.trim();
        NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
            .ok()
            .or_else(|| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").ok())
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
            })
            .map(Self::Fixed)
    }

    fn now(&self) -> NaiveDateTime {
        match self {
            Self::Local => chrono::Local::now().naive_local(),
            Self::Fixed(t) => *t,
        }
    }
}

/// The source of the error a template's `raise_exception(msg)` raises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateRaised(pub String);

/// Python's `datetime.strftime(fmt)` of `t` (a naive datetime: `%z`/`%Z` print nothing, `%f` is
/// microseconds).
pub(crate) fn strftime(t: &NaiveDateTime, fmt: &str) -> Result<String, String> {
    let mut translated = String::with_capacity(fmt.len());
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            translated.push(c);
            continue;
        }
        match chars.next() {
            Some('f') => translated.push_str("%6f"),
            Some('z') | Some('Z') => {}
            Some(other) => {
                translated.push('%');
                translated.push(other);
            }
            None => translated.push('%'),
        }
    }
    let items: Vec<Item> = StrftimeItems::new(&translated).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(format!("strftime_now: unsupported format {fmt:?}"));
    }
    let mut out = String::new();
    std::fmt::write(&mut out, format_args!("{}", t.format_with_items(items.into_iter())))
        .map_err(|_| format!("strftime_now: cannot format the time with {fmt:?}"))?;
    Ok(out)
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` into a filter block; returns the new
/// source and whether any tag was found.
pub(crate) fn rewrite_generation_tags(src: &str) -> (String, bool) {
    let mut out = String::with_capacity(src.len() + 64);
    let mut found = false;
    let mut rest = src;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        match parse_generation_tag(tag) {
            Some((len, open, left, right)) => {
                found = true;
                let body = if open {
                    format!("filter {GEN_FILTER}")
                } else {
                    "endfilter".to_string()
                };
                out.push_str(&format!("{{%{left} {body} {right}%}}"));
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// `{%[-+]? (end)?generation [-+]?%}` at the start of `s`: its length, whether it opens, and its
/// whitespace-control marks.
fn parse_generation_tag(s: &str) -> Option<(usize, bool, &str, &str)> {
    let after = &s[2..];
    let (left, after) = match after.chars().next() {
        Some(c @ ('-' | '+')) => (&s[2..2 + c.len_utf8()], &after[1..]),
        _ => ("", after),
    };
    let trimmed = after.trim_start();
    let (open, after_word) = if let Some(r) = trimmed.strip_prefix("endgeneration") {
        (false, r)
    } else if let Some(r) = trimmed.strip_prefix("generation") {
        (true, r)
    } else {
        return None;
    };
    let r = after_word.trim_start();
    if after_word.len() == r.len() && !r.starts_with(['-', '+', '%']) {
        return None; // `{% generations %}` or similar: another word
    }
    let (right, r) = match r.chars().next() {
        Some(c @ ('-' | '+')) => (&r[..1], &r[c.len_utf8()..]),
        _ => ("", r),
    };
    let r = r.strip_prefix("%}")?;
    Some((s.len() - r.len(), open, left, right))
}

/// A fresh environment with transformers' settings and globals (see the module docs).
pub(crate) fn environment(clock: Clock) -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("invariant: the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |msg: Value| -> Result<Value, Error> {
        let msg = msg.as_str().map_or_else(|| msg.to_string(), str::to_string);
        Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(TemplateRaised(msg)))
    });
    let clock = Arc::new(clock);
    env.add_function("strftime_now", move |fmt: &str| -> Result<String, Error> {
        strftime(&clock.now(), fmt).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
    });
    env.add_filter(GEN_FILTER, |state: &State, body: Value| -> Value {
        let text = body.as_str().map_or_else(|| body.to_string(), str::to_string);
        if state.lookup(TRACK_VAR).is_some_and(|v| v.is_true()) {
            Value::from_safe_string(format!("{GEN_OPEN}{text}{GEN_CLOSE}"))
        } else {
            Value::from_safe_string(text)
        }
    });
    env
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, positional or
/// keyword, as transformers' filter.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut given: Vec<(&str, Value)> = names.iter().copied().zip(args.iter().cloned()).collect();
    for name in names {
        if kwargs.has(name) {
            given.push((name, kwargs.get::<Value>(name)?));
        }
    }
    kwargs.assert_all_used()?;
    let mut opts = DumpOptions::default();
    for (name, v) in given {
        match name {
            "ensure_ascii" => opts.ensure_ascii = v.is_true(),
            "sort_keys" => opts.sort_keys = v.is_true(),
            "indent" => {
                opts.indent = if v.is_none() || v.is_undefined() {
                    None
                } else if let Some(s) = v.as_str() {
                    Some(s.to_string())
                } else if let Some(n) = v.as_i64() {
                    Some(" ".repeat(n.max(0) as usize))
                } else {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an int or a string",
                    ));
                }
            }
            "separators" => {
                if !v.is_none() && !v.is_undefined() {
                    let parts: Vec<Value> = v.try_iter()?.collect();
                    match parts.as_slice() {
                        [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                            opts.separators = Some((a.to_string(), b.to_string()));
                        }
                        _ => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                "tojson: separators must be two strings",
                            ))
                        }
                    }
                }
            }
            _ => unreachable!("invariant: names are the four tojson options"),
        }
    }
    Ok(Value::from_safe_string(dumps(value, &opts)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_filter_blocks_with_their_whitespace_marks() {
        let (src, found) = rewrite_generation_tags("a{%- generation %}b{% endgeneration -%}c{% if x %}{% endif %}");
        assert!(found);
        assert_eq!(
            src,
            "a{%- filter __rlhf_generation %}b{% endfilter -%}c{% if x %}{% endif %}"
        );
        let (src, found) = rewrite_generation_tags("{% generations %}{%generation%}");
        assert!(found);
        assert_eq!(src, "{% generations %}{% filter __rlhf_generation %}");
        assert!(!rewrite_generation_tags("{{ x }}{% set a = 1 %}").1);
    }

    #[test]
    fn strftime_follows_python_codes() {
        let t = Clock::fixed("2024-07-26T09:05:03").unwrap();
        let Clock::Fixed(t) = t else { unreachable!() };
        assert_eq!(strftime(&t, "%d %b %Y").unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime(&t, "%Y-%m-%d %H:%M:%S.%f%Z").unwrap(),
            "2024-07-26 09:05:03.000000"
        );
        assert_eq!(strftime(&t, "%A %B %j").unwrap(), "Friday July 208");
        assert!(strftime(&t, "%Q").is_err());
        assert_eq!(Clock::fixed("2024-07-26"), Clock::fixed("2024-07-26T00:00:00"));
        assert_eq!(Clock::fixed("26/07/2024"), None);
    }
}
