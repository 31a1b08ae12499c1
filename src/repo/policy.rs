//! Lints `policies/*.json` as IAM policy documents.
//!
//! Identity policies (`karrots-worker-*`) and trust relationships (which name a `Principal` and
//! no `Resource`) are both accepted. The JSON is read strictly, as IAM reads it, with a parser
//! that keeps byte ranges so each problem points at its line.

use std::path::Path;

use jsonc_parser::ast::{Object, ObjectProp, Value};
use jsonc_parser::common::Ranged;
use jsonc_parser::{CollectOptions, ParseOptions};

use crate::problem::{Problem, line_of_offset};

const DOCUMENT_KEYS: [&str; 3] = ["Version", "Id", "Statement"];
const STATEMENT_KEYS: [&str; 9] = [
    "Sid",
    "Effect",
    "Principal",
    "NotPrincipal",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
    "Condition",
];

/// Lints one policy document; `file` is the path used in messages.
pub(crate) fn lint_policy(file: &Path, text: &str) -> Vec<Problem> {
    let strict = ParseOptions {
        allow_comments: false,
        allow_loose_object_property_names: false,
        allow_trailing_commas: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    };
    let parsed = match jsonc_parser::parse_to_ast(text, &CollectOptions::default(), &strict) {
        Ok(parsed) => parsed,
        Err(error) => {
            return vec![Problem::new(
                file,
                error.line_display(),
                format!("not valid JSON: {}", error.kind()),
            )];
        }
    };
    let mut lint = Lint {
        file,
        text,
        problems: Vec::new(),
    };
    match &parsed.value {
        Some(Value::Object(document)) => lint.document(document),
        _ => lint.at(0, "an IAM policy document must be a JSON object"),
    }
    lint.problems
}

struct Lint<'a> {
    file: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Lint<'_> {
    fn at(&mut self, offset: usize, message: impl Into<String>) {
        self.problems.push(Problem::new(
            self.file,
            line_of_offset(self.text, offset),
            message,
        ));
    }

    fn unknown_keys(&mut self, object: &Object, allowed: &[&str], what: &str) {
        for prop in &object.properties {
            let name = prop.name.as_str();
            if !allowed.contains(&name) {
                self.at(
                    prop.range.start,
                    format!(
                        "{what}: unknown key {name:?}, expected one of {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn document(&mut self, document: &Object) {
        self.unknown_keys(document, &DOCUMENT_KEYS, "policy");
        match document.get("Version") {
            Some(ObjectProp {
                value: Value::StringLit(version),
                ..
            }) if matches!(version.value.as_ref(), "2012-10-17" | "2008-10-17") => {}
            Some(prop) => self.at(prop.range.start, "Version must be \"2012-10-17\""),
            None => self.at(document.range.start, "missing Version (use \"2012-10-17\")"),
        }
        match document.get("Statement") {
            Some(ObjectProp {
                value: Value::Object(statement),
                ..
            }) => self.statement(statement),
            Some(ObjectProp {
                value: Value::Array(statements),
                range,
                ..
            }) => {
                if statements.elements.is_empty() {
                    self.at(range.start, "Statement is empty");
                }
                for element in &statements.elements {
                    match element {
                        Value::Object(statement) => self.statement(statement),
                        other => self.at(other.range().start, "a statement must be an object"),
                    }
                }
            }
            Some(prop) => self.at(prop.range.start, "Statement must be an object or a list"),
            None => self.at(document.range.start, "missing Statement"),
        }
    }

    fn statement(&mut self, statement: &Object) {
        let start = statement.range.start;
        self.unknown_keys(statement, &STATEMENT_KEYS, "statement");
        let effect = match statement.get("Effect") {
            Some(ObjectProp {
                value: Value::StringLit(effect),
                ..
            }) if matches!(effect.value.as_ref(), "Allow" | "Deny") => Some(effect.value.as_ref()),
            Some(prop) => {
                self.at(prop.range.start, "Effect must be \"Allow\" or \"Deny\"");
                None
            }
            None => {
                self.at(start, "statement has no Effect");
                None
            }
        };
        let actions = self.exactly_one(statement, "Action", "NotAction");
        let has_principal =
            statement.get("Principal").is_some() || statement.get("NotPrincipal").is_some();
        let resources = if has_principal {
            // A trust relationship or resource policy names who, and may omit the resource.
            optional_strings(statement, "Resource").map(|strings| (true, strings))
        } else {
            self.exactly_one(statement, "Resource", "NotResource")
        };
        for key in ["Action", "NotAction", "Resource", "NotResource"] {
            if let Some(prop) = statement.get(key)
                && string_list(&prop.value).is_none()
            {
                self.at(
                    prop.range.start,
                    format!("{key} must be a string or a list of strings"),
                );
            }
        }
        if let Some(prop) = statement.get("Condition")
            && !matches!(prop.value, Value::Object(_))
        {
            self.at(prop.range.start, "Condition must be an object");
        }
        let allows_everything = effect == Some("Allow")
            && matches!(&actions, Some((true, a)) if a.iter().any(|s| s == "*" || s == "*:*"))
            && matches!(&resources, Some((true, r)) if r.iter().any(|s| s == "*"));
        if allows_everything {
            self.at(
                start,
                "statement allows every action (*) on every resource (*); scope it to the actions and resources Karrots needs",
            );
        }
    }

    /// Exactly one of `positive`/`negative` must be present; returns (is_positive, strings).
    fn exactly_one(
        &mut self,
        statement: &Object,
        positive: &str,
        negative: &str,
    ) -> Option<(bool, Vec<String>)> {
        match (statement.get(positive), statement.get(negative)) {
            (Some(prop), None) => string_list(&prop.value).map(|s| (true, s)),
            (None, Some(prop)) => string_list(&prop.value).map(|s| (false, s)),
            (Some(_), Some(prop)) => {
                self.at(
                    prop.range.start,
                    format!("a statement has either {positive} or {negative}, not both"),
                );
                None
            }
            (None, None) => {
                self.at(
                    statement.range.start,
                    format!("statement has neither {positive} nor {negative}"),
                );
                None
            }
        }
    }
}

fn optional_strings(statement: &Object, key: &str) -> Option<Vec<String>> {
    statement.get(key).and_then(|prop| string_list(&prop.value))
}

fn string_list(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::StringLit(text) => Some(vec![text.value.to_string()]),
        Value::Array(array) if !array.elements.is_empty() => array
            .elements
            .iter()
            .map(|element| match element {
                Value::StringLit(text) => Some(text.value.to_string()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint(text: &str) -> Vec<String> {
        lint_policy(Path::new("policies/p.json"), text)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn identity_and_trust_policies_pass() {
        let identity = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {"Sid": "Ecr", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": "*"},
    {"Effect": "Allow", "NotAction": "iam:*", "Resource": "arn:aws:s3:::karrots-*"}
  ]
}"#;
        assert_eq!(lint(identity), Vec::<String>::new());
        let trust = r#"{
  "Version": "2012-10-17",
  "Statement": {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                "Action": "sts:AssumeRole",
                "Condition": {"Bool": {"aws:MultiFactorAuthPresent": "false"}}}
}"#;
        assert_eq!(lint(trust), Vec::<String>::new());
    }

    #[test]
    fn each_mistake_is_located() {
        let rows: &[(&str, &str)] = &[
            (
                "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [{\n    \"Effect\": \"Allow\",\n    \"Action\": \"*\",\n    \"Resource\": \"*\"\n  }]\n}",
                "policies/p.json:3: statement allows every action (*) on every resource (*); scope it to the actions and resources Karrots needs",
            ),
            (
                "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [{\"Effect\": \"Permit\", \"Action\": \"s3:GetObject\", \"Resource\": \"*\"}]\n}",
                "policies/p.json:3: Effect must be \"Allow\" or \"Deny\"",
            ),
            (
                "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Effect\": \"Allow\", \"Resource\": \"*\"}\n  ]\n}",
                "policies/p.json:4: statement has neither Action nor NotAction",
            ),
            (
                "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Effect\": \"Allow\", \"Action\": \"s3:*\"}\n  ]\n}",
                "policies/p.json:4: statement has neither Resource nor NotResource",
            ),
            (
                "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": []\n}",
                "policies/p.json:3: Statement is empty",
            ),
            (
                "{\"Version\": \"2020-01-01\", \"Statement\": {\"Effect\": \"Deny\", \"Action\": \"*\", \"Resource\": \"*\"}}",
                "policies/p.json:1: Version must be \"2012-10-17\"",
            ),
            (
                "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": {\"Effect\": \"Allow\", \"Action\": \"s3:*\", \"Resource\": \"*\",\n  \"Resources\": \"*\"}\n}",
                "policies/p.json:4: statement: unknown key \"Resources\", expected one of Sid, Effect, Principal, NotPrincipal, Action, NotAction, Resource, NotResource, Condition",
            ),
            (
                "{\n  \"Version\": \"2012-10-17\",\n  // comment\n}",
                "policies/p.json:3: not valid JSON: Comments are not allowed",
            ),
        ];
        for (text, expected) in rows {
            assert_eq!(lint(text), vec![expected.to_string()], "{text}");
        }
    }

    /// The parser bounds nesting itself, before it recurses.
    #[test]
    fn deep_nesting_is_refused_by_the_parser_without_exhausting_the_stack() {
        let text = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let found = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || lint(&text))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(
            found,
            vec!["policies/p.json:1: not valid JSON: Maximum nesting depth exceeded".to_string()]
        );
    }
}
