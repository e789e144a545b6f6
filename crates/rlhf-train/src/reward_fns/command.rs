//! An external reward command: one long-lived subprocess (`sh -c COMMAND`) that scores a
//! batch per request.
//!
//! Protocol (one line each way per batch, UTF-8 JSON):
//! - request on the command's stdin: `{"prompts": [...], "completions": [...],
//!   "completion_ids": [[...], ...], "<column>": [...], ...}` — `B` entries each, every other
//!   dataset column under its own name (one value per completion, the row's value repeated
//!   for each of its generations), as TRL calls a reward function with
//!   `prompts=, completions=, completion_ids=, **columns`;
//! - answer on its stdout: a JSON array of `B` entries, each a number or `null` (TRL's
//!   `None`: not applicable to that completion).
//!
//! The command's stderr is passed on to the log (and its last lines quoted in errors).
//! It is started once, in its own process group, and kept for the run; closing its stdin
//! (end of the run) asks it to exit, and the group is killed if it has not half a second later. A crash, no answer within the timeout, or an answer that is not such an array is
//! a [`TrainError::Reward`] that names the command, what happened and what was sent.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::RewardBatch;
use crate::error::{Result, TrainError};

/// Lines of the command's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// What the reader threads report.
enum Event {
    /// One line of stdout (without its newline).
    Line(String),
    /// stdout closed: the command exited (or closed it).
    Eof,
    /// Reading stdout failed.
    ReadFailed(String),
    /// Writing a request to stdin failed (the command closed it or exited).
    WriteFailed(String),
}

/// A running reward command.
pub struct RewardCommand {
    name: String,
    command: String,
    timeout: Duration,
    child: Child,
    /// Requests for the thread that writes them to the command's stdin (a write may block
    /// on a full pipe; the answer's timeout then still applies). `None` once closed.
    requests: Option<Sender<String>>,
    answers: Receiver<Event>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The thread that drains stderr; it finishes when the command's stderr closes.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    /// Why the command can no longer be used (it crashed, hung or was killed).
    failed: Option<String>,
}

impl std::fmt::Debug for RewardCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardCommand")
            .field("name", &self.name)
            .field("command", &self.command)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The name a command's metrics are logged under: the file stem of its last word that is
/// not an option (`python my_reward.py` → `my_reward`, `./score.sh --fast` → `score`).
pub fn command_name(command: &str) -> String {
    command
        .split_whitespace()
        .rev()
        .find(|w| !w.starts_with('-'))
        .map(|w| {
            let w = w.trim_matches(|c| c == '"' || c == '\'');
            std::path::Path::new(w)
                .file_stem()
                .map_or_else(|| w.to_string(), |s| s.to_string_lossy().into_owned())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "reward_command".into())
}

impl RewardCommand {
    /// Starts `sh -c command`, with pipes to its stdin and stdout; `timeout` bounds the wait
    /// for each answer.
    pub fn spawn(command: &str, timeout: Duration) -> Result<Self> {
        let name = command_name(command);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so that stopping it also stops what it started
        // (`sh -c "python r.py"` may leave `python` as a child of the shell).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| TrainError::Reward {
            name: name.clone(),
            msg: format!("cannot start `sh -c {command:?}`: {e}\nhint: reward_command runs under `sh`"),
        })?;
        let (tx, answers) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                loop {
                    let mut line = String::new();
                    let event = match reader.read_line(&mut line) {
                        Ok(0) => Event::Eof,
                        Ok(_) => Event::Line(line.trim_end_matches(['\n', '\r']).to_string()),
                        Err(e) => Event::ReadFailed(e.to_string()),
                    };
                    let last = !matches!(event, Event::Line(_));
                    if tx.send(event).is_err() || last {
                        break;
                    }
                }
            });
        }
        let (requests, to_write) = mpsc::channel::<String>();
        if let Some(mut stdin) = child.stdin.take() {
            std::thread::spawn(move || {
                for request in to_write {
                    let written = stdin
                        .write_all(request.as_bytes())
                        .and_then(|()| stdin.write_all(b"\n"))
                        .and_then(|()| stdin.flush());
                    if let Err(e) = written {
                        let _ = tx.send(Event::WriteFailed(e.to_string()));
                        break;
                    }
                }
                // Dropping stdin here tells the command that no more requests come.
            });
        }
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_reader = child.stderr.take().map(|stderr| {
            let (tail, name) = (stderr_tail.clone(), name.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    tracing::info!("reward command {name}: {line}");
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            })
        });
        Ok(Self {
            requests: Some(requests),
            name,
            command: command.to_string(),
            timeout,
            child,
            answers,
            stderr_tail,
            stderr_reader,
            failed: None,
        })
    }

    /// The name its metrics are logged under ([`command_name`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one batch and reads the answer: one value per completion.
    pub fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Option<f64>>> {
        if let Some(why) = &self.failed {
            return Err(self.err(format!("stopped earlier: {why}")));
        }
        let request = batch.request_json()?;
        let result = self.exchange(&request, batch.len());
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
            self.stop();
        }
        result
    }

    fn exchange(&mut self, request: &str, n: usize) -> Result<Vec<Option<f64>>> {
        let sent = |what: String| format!("{what}\nrequest sent: {}", preview(request, 300));
        let queued = self
            .requests
            .as_ref()
            .is_some_and(|r| r.send(request.to_string()).is_ok());
        let event = if queued {
            self.answers.recv_timeout(self.timeout)
        } else {
            Ok(Event::WriteFailed("the writer has stopped".into()))
        };
        let failure = match event {
            Ok(Event::Line(line)) => {
                return parse_answer(&line, n).map_err(|msg| {
                    self.err(sent(format!(
                        "malformed answer {}: {msg}\nhint: answer each request with one line holding a JSON array \
                         of {n} numbers or nulls; write logs to stderr",
                        preview(&line, 200)
                    )))
                })
            }
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                let exit = self.exit_status(Duration::from_secs(1));
                format!("closed its stdout without answering; the command {exit}")
            }
            Ok(Event::WriteFailed(e)) => {
                let exit = self.exit_status(Duration::from_secs(1));
                format!("cannot send the request ({e}); the command {exit}")
            }
            Ok(Event::ReadFailed(e)) => format!("cannot read the answer: {e}"),
            Err(RecvTimeoutError::Timeout) => format!(
                "no answer within {:.1} s\nhint: raise reward_command_timeout, or make the command print one line \
                 per request and flush stdout (Python: print(..., flush=True))",
                self.timeout.as_secs_f64()
            ),
        };
        let note = self.stderr_note();
        Err(self.err(sent(format!("{failure}{note}"))))
    }

    fn err(&self, msg: String) -> TrainError {
        TrainError::Reward {
            name: self.name.clone(),
            msg: format!("command `{}`: {msg}", self.command),
        }
    }

    /// Waits at most `wait` for the process to exit: `Ok(Some(status))` once it has,
    /// `Ok(None)` while it runs.
    fn wait_exit(&mut self, wait: Duration) -> std::io::Result<Option<std::process::ExitStatus>> {
        let start = Instant::now();
        loop {
            match self.child.try_wait()? {
                None if start.elapsed() < wait => std::thread::sleep(Duration::from_millis(10)),
                done => return Ok(done),
            }
        }
    }

    /// `exited with <status>`, `is still running` (after waiting at most `wait`), or why the
    /// state is unknown; for messages.
    fn exit_status(&mut self, wait: Duration) -> String {
        match self.wait_exit(wait) {
            Ok(Some(status)) => format!("exited with {status}"),
            Ok(None) => "is still running".into(),
            Err(e) => format!("has an unknown state ({e})"),
        }
    }

    /// The last stderr lines for a message. Once the command has exited, its last lines
    /// may still be in the pipe: the reader gets a moment to drain them first.
    fn stderr_note(&mut self) -> String {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            let start = Instant::now();
            while self.stderr_reader.as_ref().is_some_and(|t| !t.is_finished())
                && start.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.is_empty() {
            String::new()
        } else {
            format!(
                "\nits last stderr lines:\n  {}",
                tail.iter().cloned().collect::<Vec<_>>().join("\n  ")
            )
        }
    }

    /// Closes stdin, gives the command a moment to exit, then kills it.
    fn stop(&mut self) {
        self.requests = None;
        if !matches!(self.wait_exit(Duration::from_millis(500)), Ok(None)) {
            return;
        }
        // Kill the whole group: the shell may be waiting on processes it started. The
        // shell is not reaped yet, so its pid (the group's id) cannot have been reused.
        #[cfg(unix)]
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: `kill` only sends a signal, to the group `spawn` created for this
            // command.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        // The process may have exited since the check; errors are moot.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RewardCommand {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads an answer line: a JSON array of `n` numbers or nulls.
fn parse_answer(line: &str, n: usize) -> std::result::Result<Vec<Option<f64>>, String> {
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Array(items) = v else {
        return Err("not a JSON array".into());
    };
    if items.len() != n {
        return Err(format!("{} values for {n} completions", items.len()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::Null => Ok(None),
            Value::Number(num) => num
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("entry {i} ({num}) is out of range")),
            other => Err(format!("entry {i} is {other}, expected a number or null")),
        })
        .collect()
}

/// The start of `s` (at most `max` characters) and its total size.
fn preview(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => format!("{}... ({} bytes)", &s[..end], s.len()),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_named_after_its_script() {
        assert_eq!(command_name("python my_reward.py"), "my_reward");
        assert_eq!(command_name("./score.sh --fast"), "score");
        assert_eq!(command_name("sh -c 'cat'"), "cat");
        assert_eq!(command_name("--x"), "reward_command");
    }

    #[test]
    fn answers_are_arrays_of_numbers_or_nulls() {
        assert_eq!(
            parse_answer(" [1, null, -0.5]\r", 3).unwrap(),
            [Some(1.0), None, Some(-0.5)]
        );
        assert!(parse_answer("[1]", 2)
            .unwrap_err()
            .contains("1 values for 2 completions"));
        assert!(parse_answer("{\"a\": 1}", 1).unwrap_err().contains("not a JSON array"));
        assert!(parse_answer("[\"1\"]", 1).unwrap_err().contains("entry 0"));
        assert!(parse_answer("NaN", 1).unwrap_err().contains("not JSON"));
    }
}
