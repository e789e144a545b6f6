//! Chat messages: JSON objects with a `role` and a `content`, plus any other field a template
//! reads (`tool_calls`, `reasoning_content`, `name`, ...), kept in file order.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One chat message, as transformers and TRL take it: `{"role": ..., "content": ...}` and
/// any further fields.
///
/// `content` is a string, a list of content blocks (`[{"type": "text", "text": ...}]`) or, in a
/// message that carries `tool_calls`, absent or null.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub struct Message(Map<String, Value>);

impl Message {
    /// A message with a text content.
    pub fn new(role: &str, content: &str) -> Self {
        let mut m = Map::new();
        m.insert("role".into(), Value::String(role.into()));
        m.insert("content".into(), Value::String(content.into()));
        Self(m)
    }

    /// Checks one JSON value; the error says what is wrong (the caller names the file and row).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let Value::Object(m) = v else {
            return Err(format!(
                "a message must be an object with `role` and `content`, found {}",
                kind(v)
            ));
        };
        match m.get("role") {
            Some(Value::String(_)) => {}
            Some(other) => return Err(format!("`role` must be a string, found {}", kind(other))),
            None => return Err("a message needs a `role` (\"system\", \"user\", \"assistant\" or \"tool\")".into()),
        }
        let has_tool_calls = m.get("tool_calls").is_some_and(|t| !t.is_null());
        match m.get("content") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            None | Some(Value::Null) if has_tool_calls => {}
            None => return Err("a message needs a `content`".into()),
            Some(other) => {
                return Err(format!(
                    "`content` must be a string or a list of content blocks, found {}",
                    kind(other)
                ))
            }
        }
        Ok(Self(m.clone()))
    }

    /// The role.
    pub fn role(&self) -> &str {
        self.0.get("role").and_then(Value::as_str).unwrap_or_default()
    }

    /// The content, if it is a string.
    pub fn text(&self) -> Option<&str> {
        self.0.get("content").and_then(Value::as_str)
    }

    /// All fields, in their order.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.0
    }

    /// Sets a field (`tool_calls`, `reasoning_content`, ...).
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.into(), value);
        self
    }
}

impl TryFrom<Value> for Message {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        Self::from_json(&v)
    }
}

impl From<Message> for Value {
    fn from(m: Message) -> Value {
        Value::Object(m.0)
    }
}

/// Parses a list of messages; the error names the element (from 0) and what is wrong.
pub fn messages_from_json(v: &Value) -> Result<Vec<Message>, String> {
    let Value::Array(items) = v else {
        return Err(format!(
            "expected a list of {{\"role\", \"content\"}} messages, found {}",
            kind(v)
        ));
    };
    if items.is_empty() {
        return Err("the list of messages is empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| Message::from_json(m).map_err(|e| format!("message {i}: {e}")))
        .collect()
}

/// Whether `v` looks like a conversation (TRL's `is_conversational` test on one value): a list
/// whose first element is an object with a `role`.
pub fn looks_conversational(v: &Value) -> bool {
    v.as_array()
        .and_then(|a| a.first())
        .and_then(Value::as_object)
        .is_some_and(|m| m.contains_key("role"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_need_a_role_and_a_content() {
        assert!(messages_from_json(&json!([{"role": "user", "content": "hi"}])).is_ok());
        let tool_call = json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]);
        assert!(messages_from_json(&tool_call).is_ok());
        let err = messages_from_json(&json!([{"role": "user", "content": "a"}, {"content": "b"}])).unwrap_err();
        assert!(err.starts_with("message 1: a message needs a `role`"), "{err}");
        let err = messages_from_json(&json!([{"role": "user"}])).unwrap_err();
        assert!(err.contains("needs a `content`"), "{err}");
        let err = messages_from_json(&json!([{"role": "user", "content": 3}])).unwrap_err();
        assert!(err.contains("found a number"), "{err}");
        assert!(messages_from_json(&json!("hi")).unwrap_err().contains("found a string"));
        assert!(messages_from_json(&json!([])).unwrap_err().contains("empty"));
        assert!(messages_from_json(&json!(["hi"])).unwrap_err().contains("message 0"));
    }

    #[test]
    fn messages_keep_their_field_order_through_serde() {
        let text = r#"[{"role":"assistant","content":"","tool_calls":[{"type":"function","function":{"name":"f","arguments":{"b":1,"a":2}}}]}]"#;
        let parsed: Vec<Message> = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), text);
        assert!(looks_conversational(&serde_json::from_str(text).unwrap()));
        assert!(!looks_conversational(&json!("text")));
        assert!(!looks_conversational(&json!([])));
    }
}
