//! Can the worker make itself more than it is? Evaluates the worker's identity policies
//! (`policies/karrots-worker-*.json`, all attached to the `karrots-worker` group, read together)
//! against the IAM calls a stolen worker key would use to widen its own permissions, and reports
//! each one they allow.
//!
//! The evaluation follows IAM's rules for one identity's policies: an explicit `Deny` whose
//! action, resource and conditions match wins; otherwise a matching `Allow` allows; otherwise
//! the call is denied. Conditions are evaluated for the context each call is tried with (the
//! permissions boundary it carries, the policy it attaches); a condition operator this module
//! does not know counts as met in an `Allow` and as not met in a `Deny`, so that it can only
//! make the check stricter. Policy variables (`${account_id}`) are compared as written: the
//! calls are made against the same `${account_id}`.

use std::collections::BTreeMap;

use serde_json::Value;

/// The permissions boundary every role the worker creates must carry.
pub const BOUNDARY: &str = "arn:aws:iam::${account_id}:policy/karrots-worker-boundary";

/// The file of the boundary itself: a boundary, not a policy of the worker.
pub const BOUNDARY_FILE: &str = "karrots-worker-boundary.json";

/// One IAM call with the request context it is tried with.
#[derive(Debug, Clone)]
pub struct Call {
    pub action: &'static str,
    pub resource: String,
    pub context: BTreeMap<&'static str, String>,
    /// Why a worker allowed this call could make itself more than it is.
    pub why: &'static str,
}

fn call(action: &'static str, resource: &str, why: &'static str) -> Call {
    Call {
        action,
        resource: format!("arn:aws:iam::${{account_id}}:{resource}"),
        context: BTreeMap::new(),
        why,
    }
}

impl Call {
    fn with(mut self, key: &'static str, value: &str) -> Call {
        self.context.insert(key, value.to_string());
        self
    }
}

const ADMIN: &str = "arn:aws:iam::aws:policy/AdministratorAccess";
const OWN_POLICY: &str = "arn:aws:iam::${account_id}:policy/karrots-worker-iam";

/// The calls a stolen worker key must not be able to make.
pub fn escalation_calls() -> Vec<Call> {
    vec![
        call(
            "iam:CreatePolicyVersion",
            "policy/karrots-worker-iam",
            "a new default version of its own policy can allow * on *",
        ),
        Call {
            action: "sts:AssumeRole",
            resource: "arn:aws:iam::${account_id}:role/karrots-iam-admin".into(),
            context: BTreeMap::new(),
            why: "the role that manages the worker's own identity",
        },
        call(
            "iam:SetDefaultPolicyVersion",
            "policy/karrots-worker-iam",
            "an older or prepared version of its own policy can become the one in force",
        ),
        call(
            "iam:CreatePolicyVersion",
            "policy/karrots-worker-boundary",
            "rewriting the boundary lifts the limit of every role it created",
        ),
        call(
            "iam:AttachGroupPolicy",
            "group/karrots-worker",
            "AdministratorAccess attached to its own group",
        )
        .with("iam:PolicyARN", ADMIN),
        call(
            "iam:PutGroupPolicy",
            "group/karrots-worker",
            "an inline policy on its own group can allow anything",
        ),
        call(
            "iam:PutUserPolicy",
            "user/karrots-worker-deploy",
            "an inline policy on its own user can allow anything",
        ),
        call(
            "iam:AttachUserPolicy",
            "user/karrots-worker-deploy",
            "AdministratorAccess attached to its own user",
        )
        .with("iam:PolicyARN", ADMIN),
        call(
            "iam:AddUserToGroup",
            "group/admins",
            "its user added to another group takes that group's permissions",
        ),
        call(
            "iam:CreateAccessKey",
            "user/someone-else",
            "a key for another user is that user's permissions",
        ),
        call(
            "iam:CreateRole",
            "role/karrots-anything",
            "a role without the boundary can be given any permission, then assumed",
        ),
        call(
            "iam:PutRolePolicy",
            "role/karrots-anything",
            "an inline policy on a role without the boundary can allow anything",
        ),
        call(
            "iam:AttachRolePolicy",
            "role/karrots-anything",
            "AdministratorAccess on a role without the boundary",
        )
        .with("iam:PolicyARN", ADMIN),
        call(
            "iam:AttachRolePolicy",
            "role/karrots-anything",
            "even inside the boundary, only Karrots' own policies (not the worker's) may be attached",
        )
        .with("iam:PolicyARN", OWN_POLICY)
        .with("iam:PermissionsBoundary", BOUNDARY),
        call(
            "iam:DeleteRolePermissionsBoundary",
            "role/karrots-anything",
            "a role rid of its boundary can be given any permission",
        )
        .with("iam:PermissionsBoundary", BOUNDARY),
        call(
            "iam:PutRolePermissionsBoundary",
            "role/karrots-anything",
            "a role given a wider boundary can be given any permission",
        )
        .with("iam:PermissionsBoundary", ADMIN),
    ]
}

/// A statement of one policy file.
#[derive(Debug, Clone)]
pub struct Statement {
    pub file: String,
    pub sid: String,
    allow: bool,
    actions: Vec<String>,
    not_actions: Option<Vec<String>>,
    resources: Vec<String>,
    not_resources: Option<Vec<String>>,
    conditions: Vec<(String, String, Vec<String>)>,
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|item| item.as_str().map(str::to_string))
            .collect(),
        Value::Bool(b) => vec![b.to_string()],
        _ => Vec::new(),
    }
}

/// The statements of one policy document (already linted: what does not read is skipped).
pub fn statements(file: &str, document: &Value) -> Vec<Statement> {
    let list = match &document["Statement"] {
        Value::Array(items) => items.clone(),
        single @ Value::Object(_) => vec![single.clone()],
        _ => Vec::new(),
    };
    list.iter()
        .map(|s| {
            let mut conditions = Vec::new();
            if let Some(ops) = s["Condition"].as_object() {
                for (op, keys) in ops {
                    for (key, values) in keys.as_object().into_iter().flatten() {
                        conditions.push((op.clone(), key.clone(), strings(values)));
                    }
                }
            }
            Statement {
                file: file.to_string(),
                sid: s["Sid"].as_str().unwrap_or_default().to_string(),
                allow: s["Effect"] == "Allow",
                actions: strings(&s["Action"]),
                not_actions: s.get("NotAction").map(strings),
                resources: strings(&s["Resource"]),
                not_resources: s.get("NotResource").map(strings),
                conditions,
            }
        })
        .collect()
}

/// IAM's wildcard match: `*` any run, `?` one character; actions case-insensitively.
fn matches(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let (p, t) = if ignore_case {
        (pattern.to_ascii_lowercase(), text.to_ascii_lowercase())
    } else {
        (pattern.to_string(), text.to_string())
    };
    let (p, t) = (p.as_bytes(), t.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl Statement {
    fn covers(&self, call: &Call) -> bool {
        let action = match &self.not_actions {
            Some(not) => !not.iter().any(|p| matches(p, call.action, true)),
            None => self.actions.iter().any(|p| matches(p, call.action, true)),
        };
        let resource = match &self.not_resources {
            Some(not) => !not.iter().any(|p| matches(p, &call.resource, false)),
            None => self
                .resources
                .iter()
                .any(|p| matches(p, &call.resource, false)),
        };
        action && resource
    }

    /// Whether every condition holds for the call's context; `unknown` is what an operator
    /// this module does not evaluate counts as.
    fn conditions_hold(&self, call: &Call, unknown: bool) -> bool {
        self.conditions.iter().all(|(op, key, values)| {
            let given = call.context.get(key.as_str());
            let op = match op.strip_suffix("IfExists") {
                // `…IfExists`: a key the request does not carry meets the condition.
                Some(_) if given.is_none() => return true,
                Some(base) => base,
                None => op.as_str(),
            };
            let any = |like: bool, case: bool| {
                given.is_some_and(|v| {
                    values
                        .iter()
                        .any(|p| if like { matches(p, v, case) } else { p == v })
                })
            };
            match op {
                "StringEquals" | "ArnEquals" => any(false, false),
                "StringEqualsIgnoreCase" => any(true, true),
                "StringLike" | "ArnLike" => any(true, false),
                "StringNotEquals" | "ArnNotEquals" => !any(false, false),
                "StringNotLike" | "ArnNotLike" => !any(true, false),
                "Null" => {
                    let absent = given.is_none();
                    values.iter().all(|v| (v == "true") == absent)
                }
                _ => unknown,
            }
        })
    }
}

/// Whether the statements allow `call`: no explicit deny, and an allow.
pub fn allowed<'a>(statements: &'a [Statement], call: &Call) -> Option<&'a Statement> {
    let denied = statements
        .iter()
        .any(|s| !s.allow && s.covers(call) && s.conditions_hold(call, false));
    if denied {
        return None;
    }
    statements
        .iter()
        .find(|s| s.allow && s.covers(call) && s.conditions_hold(call, true))
}

/// The escalation calls the worker's statements allow, each with the statement that allows it.
pub fn escalations(statements: &[Statement]) -> Vec<(Call, Statement)> {
    escalation_calls()
        .into_iter()
        .filter_map(|call| allowed(statements, &call).map(|s| (call.clone(), s.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> Vec<Statement> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if name.starts_with("karrots-worker-") && name != BOUNDARY_FILE {
                let text = std::fs::read_to_string(&path).unwrap();
                all.extend(statements(&name, &serde_json::from_str(&text).unwrap()));
            }
        }
        all
    }

    #[test]
    fn wildcards_follow_iam() {
        assert!(matches("iam:Create*", "iam:CreateRole", true));
        assert!(matches("IAM:createrole", "iam:CreateRole", true));
        assert!(matches(
            "arn:aws:iam::1:role/karrots-*",
            "arn:aws:iam::1:role/karrots-x",
            false
        ));
        assert!(!matches(
            "arn:aws:iam::1:role/karrots-*",
            "arn:aws:iam::1:role/admin",
            false
        ));
        assert!(matches(
            "arn:aws:iam::?:role/*",
            "arn:aws:iam::1:role/a",
            false
        ));
        assert!(matches("*", "", false));
    }

    #[test]
    fn the_reference_worker_policies_allow_no_escalation() {
        let found: Vec<String> = escalations(&worker())
            .iter()
            .map(|(call, s)| {
                format!(
                    "{} on {} (by {} {})",
                    call.action, call.resource, s.file, s.sid
                )
            })
            .collect();
        assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn what_the_platform_does_with_roles_stays_allowed() {
        let all = worker();
        let node = "role/karrots-prod-node";
        let needed = [
            call("iam:CreateRole", node, "").with("iam:PermissionsBoundary", BOUNDARY),
            call("iam:AttachRolePolicy", node, "")
                .with("iam:PermissionsBoundary", BOUNDARY)
                .with(
                    "iam:PolicyARN",
                    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
                ),
            call("iam:AttachRolePolicy", node, "")
                .with("iam:PermissionsBoundary", BOUNDARY)
                .with(
                    "iam:PolicyARN",
                    "arn:aws:iam::${account_id}:policy/karrots-prod-logs",
                ),
            call("iam:DetachRolePolicy", node, "").with("iam:PermissionsBoundary", BOUNDARY),
            call("iam:GetRole", node, ""),
            call("iam:TagRole", node, ""),
            call("iam:DeleteRole", node, ""),
            call("iam:PassRole", node, "").with("iam:PassedToService", "eks.amazonaws.com"),
            call("iam:CreatePolicy", "policy/karrots-prod-logs", ""),
            call("iam:CreatePolicyVersion", "policy/karrots-prod-logs", ""),
        ];
        for each in needed {
            assert!(
                allowed(&all, &each).is_some(),
                "{} on {} {:?} is denied",
                each.action,
                each.resource,
                each.context
            );
        }
    }

    #[test]
    fn each_escalation_is_caught_when_a_statement_grants_it() {
        // One fixture per primitive: the reference policies plus a statement that opens it.
        let fixtures: &[(&str, &str)] = &[
            (
                "iam:CreatePolicyVersion",
                r#"{"Effect":"Allow","Action":"iam:CreatePolicyVersion","Resource":"arn:aws:iam::${account_id}:policy/karrots-*"}"#,
            ),
            (
                "iam:SetDefaultPolicyVersion",
                r#"{"Effect":"Allow","Action":"iam:SetDefaultPolicyVersion","Resource":"*"}"#,
            ),
            (
                "iam:AttachGroupPolicy",
                r#"{"Effect":"Allow","Action":"iam:AttachGroupPolicy","Resource":"arn:aws:iam::${account_id}:group/karrots-worker"}"#,
            ),
            (
                "iam:PutGroupPolicy",
                r#"{"Effect":"Allow","Action":"iam:Put*","Resource":"arn:aws:iam::${account_id}:group/*"}"#,
            ),
            (
                "iam:PutUserPolicy",
                r#"{"Effect":"Allow","Action":"iam:PutUserPolicy","Resource":"arn:aws:iam::${account_id}:user/karrots-worker-*"}"#,
            ),
            (
                "iam:AddUserToGroup",
                r#"{"Effect":"Allow","Action":"iam:AddUserToGroup","Resource":"*"}"#,
            ),
            (
                "iam:CreateAccessKey",
                r#"{"Effect":"Allow","Action":"iam:CreateAccessKey","Resource":"arn:aws:iam::${account_id}:user/*"}"#,
            ),
            (
                "iam:CreateRole",
                r#"{"Effect":"Allow","Action":"iam:CreateRole","Resource":"arn:aws:iam::${account_id}:role/karrots-*"}"#,
            ),
            (
                "iam:PutRolePolicy",
                r#"{"Effect":"Allow","Action":"iam:PutRolePolicy","Resource":"*","Condition":{"StringLikeIfExists":{"iam:PermissionsBoundary":"arn:aws:iam::*:policy/karrots-*"}}}"#,
            ),
            (
                "iam:AttachRolePolicy",
                r#"{"Effect":"Allow","Action":"iam:AttachRolePolicy","Resource":"arn:aws:iam::${account_id}:role/karrots-*","Condition":{"StringEquals":{"iam:PermissionsBoundary":"arn:aws:iam::${account_id}:policy/karrots-worker-boundary"}}}"#,
            ),
            (
                "sts:AssumeRole",
                r#"{"Effect":"Allow","Action":"sts:AssumeRole","Resource":"arn:aws:iam::${account_id}:role/karrots-*"}"#,
            ),
            (
                "iam:PutRolePermissionsBoundary",
                r#"{"Effect":"Allow","Action":"iam:PutRolePermissionsBoundary","Resource":"arn:aws:iam::${account_id}:role/karrots-*"}"#,
            ),
        ];
        for (action, statement) in fixtures {
            let document: Value = serde_json::from_str(&format!(
                r#"{{"Version":"2012-10-17","Statement":[{statement}]}}"#
            ))
            .unwrap();
            let found = escalations(&statements("fixture.json", &document));
            assert!(
                found
                    .iter()
                    .any(|(call, s)| call.action == *action && s.file == "fixture.json"),
                "{action} not caught: {found:?}"
            );
        }
    }

    #[test]
    fn an_explicit_deny_wins_and_conditions_count() {
        let document: Value = serde_json::from_str(
            r#"{"Statement":[
                {"Effect":"Allow","Action":"iam:*","Resource":"*"},
                {"Effect":"Deny","Action":"iam:CreateRole","Resource":"*","Condition":{"Null":{"iam:PermissionsBoundary":"true"}}}
            ]}"#,
        )
        .unwrap();
        let all = statements("p.json", &document);
        let bare = call("iam:CreateRole", "role/x", "");
        assert!(allowed(&all, &bare).is_none(), "no boundary: denied");
        let bounded = bare.clone().with("iam:PermissionsBoundary", BOUNDARY);
        assert!(
            allowed(&all, &bounded).is_some(),
            "with one: the allow holds"
        );
    }
}
