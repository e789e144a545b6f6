//! Errors of finding, parsing and rendering chat templates.

use std::path::PathBuf;

/// What can go wrong finding, parsing or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model directory has no chat template but messages were given.
    #[error(
        "{}: the model has no chat template (no chat_template.jinja, no `chat_template` in tokenizer_config.json)\n\
         hint: base checkpoints often have none: use the instruct model, pass a template file, or give a plain text prompt",
        dir.display()
    )]
    NoTemplate {
        /// The model directory.
        dir: PathBuf,
    },
    /// A template name that the model does not have.
    #[error("{}: no chat template named `{name}` (available: {})\nhint: pick one of the available names", path.display(), available.join(", "))]
    UnknownName {
        /// Where the templates came from.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The names there are.
        available: Vec<String>,
    },
    /// Several named templates and none called `default`.
    #[error("{}: several chat templates ({}) and none is named `default`\nhint: select one by name", path.display(), available.join(", "))]
    NoDefault {
        /// Where the templates came from.
        path: PathBuf,
        /// The names there are.
        available: Vec<String>,
    },
    /// The template does not parse.
    #[error("{}: chat template `{name}` does not parse: {msg}\nhint: fix the Jinja syntax of the template", path.display())]
    Syntax {
        /// Where the template came from.
        path: PathBuf,
        /// The template's name.
        name: String,
        /// The parser's message (with the line).
        msg: String,
    },
    /// The template called `raise_exception(msg)`: the conversation is not one it accepts.
    #[error("{}: chat template `{name}` rejected the conversation: {msg}\nhint: change the messages as the template asks (roles, order)", path.display())]
    Raised {
        /// Where the template came from.
        path: PathBuf,
        /// The template's name.
        name: String,
        /// The template's own message.
        msg: String,
    },
    /// Rendering failed for another reason (an undefined attribute, a type error).
    #[error("{}: chat template `{name}` failed to render: {msg}", path.display())]
    Render {
        /// Where the template came from.
        path: PathBuf,
        /// The template's name.
        name: String,
        /// minijinja's message (with the line).
        msg: String,
    },
    /// The messages or options do not fit (`continue_final_message` with nothing to continue).
    #[error("{}: {msg}", path.display())]
    Input {
        /// Where the template came from.
        path: PathBuf,
        /// What is wrong and how to fix it.
        msg: String,
    },
}
