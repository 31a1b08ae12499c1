//! The one place that knows which YAML library Karrots uses.
//!
//! `serde_yaml` turns text into the raw serde structs and reports structural errors (unknown
//! keys, wrong types) with a line; `serde_path_to_error` adds the full key path to them. A
//! valid document carries no positions in serde, so [`KeyLines`] reads the same text once more
//! with `yaml-rust2`'s event parser and remembers the line of every key, which the second
//! (validation) stage uses to point at the value it rejects. Swapping the YAML library means
//! changing this file only.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A YAML document that could not be read into the expected shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlError {
    pub line: usize,
    pub message: String,
}

/// Where each key of a document sits: `aws.account_id` → 7, `alerts[1].webhook` → 12,
/// and for sequence items `allow[0]` → the line of the item.
#[derive(Debug, Default, Clone)]
pub(crate) struct KeyLines {
    lines: HashMap<String, usize>,
}

impl KeyLines {
    /// The line of `path`, else of its nearest recorded parent, else 1.
    pub fn line(&self, path: &str) -> usize {
        let mut candidate = path;
        loop {
            if let Some(line) = self.lines.get(candidate) {
                return *line;
            }
            match candidate.rfind(['.', '[']) {
                Some(cut) => candidate = &candidate[..cut],
                None => return 1,
            }
        }
    }
}

/// Parses `text` into `T` and indexes the line of every key.
pub(crate) fn parse<T: DeserializeOwned>(text: &str) -> Result<(T, KeyLines), YamlError> {
    if text.trim().is_empty() {
        return Err(YamlError {
            line: 1,
            message: "the file is empty".to_string(),
        });
    }
    let last_line = text.replace("\r\n", "\n").matches(['\n', '\r']).count() + 1;
    // Parsers may place an end-of-input error on the line after the last one.
    let clamp = |error: YamlError| YamlError {
        line: error.line.min(last_line),
        ..error
    };
    let key_lines = index_key_lines(text).map_err(clamp)?;
    let deserializer = serde_yaml::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(deserializer) {
        Ok(value) => Ok((value, key_lines)),
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.inner();
            let line = inner
                .location()
                .map(|location| location.line())
                .unwrap_or_else(|| key_lines.line(&path));
            Err(clamp(YamlError {
                line,
                message: describe(&path, inner),
            }))
        }
    }
}

/// Converts a YAML value (the free-form `terraform.vars`) into JSON, the form terraform reads.
pub(crate) fn to_json(value: &serde_yaml::Value) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|error| error.to_string())
}

/// A free-form YAML value, for fields whose shape is not Karrots' to decide.
pub(crate) type Value = serde_yaml::Value;

/// `serde_yaml` prefixes its message with the parent path and suffixes the position; the
/// position is reported separately and the full path comes from `serde_path_to_error`.
fn describe(path: &str, error: &serde_yaml::Error) -> String {
    let mut message = error.to_string();
    if let Some(location) = error.location() {
        let suffix = format!(" at line {} column {}", location.line(), location.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    if let Some((prefix, rest)) = message.split_once(": ")
        && path.starts_with(prefix)
        && !prefix.contains(' ')
    {
        message = rest.to_string();
    }
    let message = message
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
        .replace("duplicate field", "duplicate key");
    if path == "." || path.is_empty() {
        message
    } else {
        format!("{path}: {message}")
    }
}

/// The deepest nesting of mappings and sequences Karrots reads. Real files nest a handful of
/// levels; a deeper one would cost stack and memory in every parser after this one.
pub(crate) const MAX_DEPTH: usize = 64;

/// Reads the first document's events one at a time (the parser's own `load` recurses once
/// per level, so a deep document would overflow the stack before any check could run),
/// refusing more than [`MAX_DEPTH`] levels.
fn index_key_lines(text: &str) -> Result<KeyLines, YamlError> {
    // Also for text that comes from git rather than a file read through `limits::read_text`.
    if text.len() > crate::limits::MAX_TEXT_BYTES {
        return Err(YamlError {
            line: 1,
            message: crate::limits::too_large(text.len() as u64),
        });
    }
    let mut indexer = KeyLineIndexer::default();
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser.next_token().map_err(|error| YamlError {
            line: error.marker().line(),
            message: format!("not valid YAML: {}", error.info()),
        })?;
        let done = matches!(event, Event::DocumentEnd | Event::StreamEnd);
        indexer.on_event(event, mark);
        if indexer.stack.len() > MAX_DEPTH {
            return Err(YamlError {
                line: mark.line(),
                message: format!("nested more than {MAX_DEPTH} levels deep"),
            });
        }
        if done {
            break;
        }
    }
    Ok(KeyLines {
        lines: indexer.lines,
    })
}

/// Walks parser events keeping the path of the node being read.
#[derive(Default)]
struct KeyLineIndexer {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

enum Frame {
    Mapping {
        path: String,
        /// The key whose value comes next; `None` while a key is expected.
        pending_key: Option<String>,
    },
    Sequence {
        path: String,
        next_index: usize,
    },
}

impl KeyLineIndexer {
    /// The path of a value starting now, recording its line; `None` when this node is a key.
    fn begin_value(&mut self, key_text: Option<&str>, line: usize) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Mapping { path, pending_key }) => match pending_key.take() {
                Some(key) => Some(join(path, &key)),
                None => {
                    // This node is a key. Complex (non-scalar) keys get a placeholder name.
                    let key = key_text.unwrap_or("?").to_string();
                    self.lines.insert(join(path, &key), line);
                    *pending_key = Some(key);
                    None
                }
            },
            Some(Frame::Sequence { path, next_index }) => {
                let item = format!("{path}[{next_index}]");
                *next_index += 1;
                self.lines.insert(item.clone(), line);
                Some(item)
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for KeyLineIndexer {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let line = mark.line();
        match event {
            Event::Scalar(text, ..) => {
                self.begin_value(Some(&text), line);
            }
            Event::Alias(_) => {
                self.begin_value(None, line);
            }
            Event::MappingStart(..) => {
                let path = self.begin_value(None, line).unwrap_or_default();
                self.stack.push(Frame::Mapping {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.begin_value(None, line).unwrap_or_default();
                self.stack.push(Frame::Sequence {
                    path,
                    next_index: 0,
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_follow_nesting_and_sequences() {
        let text = "name: prod\naws:\n  account_id: '1'\n  region: us-east-1\nallow:\n  - local-exec\n  - http\nalerts:\n  - webhook: a\n  - webhook: b\n";
        let lines = index_key_lines(text).unwrap();
        assert_eq!(lines.line("name"), 1);
        assert_eq!(lines.line("aws.account_id"), 3);
        assert_eq!(lines.line("aws.region"), 4);
        assert_eq!(lines.line("allow[1]"), 7);
        assert_eq!(lines.line("alerts[1].webhook"), 10);
        // Unknown paths fall back to the nearest parent.
        assert_eq!(lines.line("aws.profile"), 2);
        assert_eq!(lines.line("nothing.here"), 1);
    }

    #[test]
    fn flow_mappings_are_indexed_too() {
        let text = "terraform:\n  backend: { s3: { bucket: b, key: k } }\n";
        let lines = index_key_lines(text).unwrap();
        assert_eq!(lines.line("terraform.backend.s3.key"), 2);
    }

    #[test]
    fn errors_point_at_a_line_that_exists() {
        // Found by the fuzz target: the parser reports the end of "[0bb" on line 2.
        let error = parse::<serde_yaml::Value>("[0bb").unwrap_err();
        assert_eq!(error.line, 1, "{error:?}");
        // A bare CR is a YAML line break.
        let error = parse::<bool>("\r\r4").unwrap_err();
        assert_eq!(error.line, 3, "{error:?}");
    }

    #[test]
    fn deep_and_large_documents_are_refused_before_any_parser_recurses() {
        let deep = format!("{}a\n", "- ".repeat(100_000));
        let error = parse::<serde_yaml::Value>(&deep).unwrap_err();
        assert_eq!(
            error.message, "nested more than 64 levels deep",
            "{error:?}"
        );
        // The scanner has its own limit for flow collections, which comes first.
        let flow = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let error = parse::<serde_yaml::Value>(&flow).unwrap_err();
        assert!(error.message.contains("recursion limit"), "{error:?}");
        let flow = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let error = parse::<serde_yaml::Value>(&flow).unwrap_err();
        assert_eq!(
            error.message, "nested more than 64 levels deep",
            "{error:?}"
        );
        // 64 levels are read.
        let nested = format!("{}a\n", "- ".repeat(MAX_DEPTH));
        parse::<serde_yaml::Value>(&nested).unwrap();
        let large = format!("a: \"{}\"\n", "x".repeat(crate::limits::MAX_TEXT_BYTES));
        let error = parse::<serde_yaml::Value>(&large).unwrap_err();
        assert!(error.message.contains("at most 1048576 bytes"), "{error:?}");
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let error = index_key_lines("a: 1\nb: [\n").unwrap_err();
        assert!(error.line >= 2, "{error:?}");
        assert!(error.message.starts_with("not valid YAML"));
    }
}
