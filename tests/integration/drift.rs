//! Drift: the daemon re-plans the last applied commit on `drift.interval`, and the tests make
//! real drift in moto with the aws CLI. Who made it comes from a local stand-in for CloudTrail
//! `LookupEvents` (moto does not implement it), speaking the same awsJson1.1 protocol.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::daemon::{Fixture, read_body};

/// Two VPCs: one to re-tag by hand, one to delete by hand.
const VPCS: &str = r#"terraform {
  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}

provider "aws" {}

variable "label" {
  type    = string
  default = "v1"
}

resource "aws_vpc" "main" {
  cidr_block = "10.0.0.0/16"
  tags = {
    Name  = "karrots-drift"
    Label = var.label
  }
}

resource "aws_vpc" "extra" {
  cidr_block = "10.1.0.0/16"
  tags = {
    Name = "karrots-drift-extra"
  }
}
"#;

/// CloudTrail `LookupEvents` on a free loopback port: answers from the events given to it
/// for a resource name, two to a page; throttles the first `throttled` requests. A silent
/// one reads each request and never answers.
pub(crate) struct FakeCloudTrail {
    url: String,
    events: Arc<Mutex<Vec<(String, Value)>>>,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeCloudTrail {
    pub(crate) fn start(throttled: usize) -> FakeCloudTrail {
        FakeCloudTrail::serve(throttled, true)
    }

    pub(crate) fn silent() -> FakeCloudTrail {
        FakeCloudTrail::serve(0, false)
    }

    fn serve(throttled: usize, answers: bool) -> FakeCloudTrail {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the CloudTrail fake");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let events: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (known, seen) = (events.clone(), requests.clone());
        std::thread::spawn(move || {
            let mut unanswered = Vec::new();
            for mut stream in listener.incoming().flatten() {
                let Some(body) = read_body(&mut stream) else {
                    continue;
                };
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let count = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(request.clone());
                    seen.len()
                };
                if !answers {
                    unanswered.push(stream);
                    continue;
                }
                let (status, answer) = if count <= throttled {
                    (
                        "400 Bad Request",
                        json!({"__type": "ThrottlingException", "message": "Rate exceeded"}),
                    )
                } else {
                    ("200 OK", page(&known.lock().unwrap(), &request))
                };
                let answer = answer.to_string();
                let _ = std::io::Write::write_all(
                    &mut stream,
                    format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    )
                    .as_bytes(),
                );
            }
        });
        FakeCloudTrail {
            url,
            events,
            requests,
        }
    }

    pub(crate) fn add(&self, resource: &str, event: Value) {
        self.events
            .lock()
            .unwrap()
            .push((resource.to_string(), event));
    }

    fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

/// One page of the events for the request's `ResourceName`.
fn page(events: &[(String, Value)], request: &Value) -> Value {
    let wanted = request["LookupAttributes"][0]["AttributeValue"]
        .as_str()
        .unwrap_or_default();
    let matching: Vec<&Value> = events
        .iter()
        .filter(|(resource, _)| resource == wanted)
        .map(|(_, event)| event)
        .collect();
    let start: usize = request["NextToken"]
        .as_str()
        .and_then(|token| token.strip_prefix("page-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let end = (start + 2).min(matching.len());
    let mut answer = json!({"Events": matching[start.min(end)..end]});
    if end < matching.len() {
        answer["NextToken"] = json!(format!("page-{end}"));
    }
    answer
}

/// A CloudTrail event as `LookupEvents` returns it.
pub(crate) fn event(
    id: &str,
    name: &str,
    read_only: bool,
    identity: Value,
    resource: &str,
) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let record = json!({"eventName": name, "readOnly": read_only, "userIdentity": identity});
    json!({
        "EventId": id,
        "EventName": name,
        "ReadOnly": read_only.to_string(),
        "AccessKeyId": identity["accessKeyId"],
        "EventTime": now.as_secs_f64(),
        "EventSource": "ec2.amazonaws.com",
        "Username": identity["arn"].as_str().unwrap_or_default().rsplit('/').next(),
        "Resources": [{"ResourceType": "AWS::EC2::VPC", "ResourceName": resource}],
        "CloudTrailEvent": record.to_string(),
    })
}

pub(crate) fn assumed(role: &str, session: &str, key: &str) -> Value {
    json!({
        "type": "AssumedRole",
        "arn": format!("arn:aws:sts::123456789012:assumed-role/{role}/{session}"),
        "accessKeyId": key,
        "sessionContext": {"sessionIssuer": {"arn": format!("arn:aws:iam::123456789012:role/{role}")}},
    })
}

pub(crate) fn vpc_id(fixture: &Fixture, name: &str) -> String {
    let vpcs: Value = serde_json::from_str(&fixture.moto.aws(&[
        "ec2",
        "describe-vpcs",
        "--filters",
        &format!("Name=tag:Name,Values={name}"),
    ]))
    .unwrap();
    vpcs["Vpcs"][0]["VpcId"]
        .as_str()
        .unwrap_or_else(|| panic!("no VPC named {name} in moto: {vpcs}"))
        .to_string()
}

fn name_tag(fixture: &Fixture, vpc: &str) -> String {
    let vpcs: Value =
        serde_json::from_str(
            &fixture
                .moto
                .aws(&["ec2", "describe-vpcs", "--vpc-ids", vpc]),
        )
        .unwrap();
    vpcs["Vpcs"][0]["Tags"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|tag| tag["Key"] == "Name")
        .and_then(|tag| tag["Value"].as_str())
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn retag(fixture: &Fixture, vpc: &str, name: &str) {
    fixture.moto.aws(&[
        "ec2",
        "create-tags",
        "--resources",
        vpc,
        "--tags",
        &format!("Key=Name,Value={name}"),
    ]);
}

fn count(fixture: &Fixture, kind: &str) -> usize {
    fixture
        .sink
        .kinds("prod")
        .iter()
        .filter(|k| *k == kind)
        .count()
}

/// Drift checks (kind `drift`) of prod that have finished.
fn finished_checks(fixture: &Fixture) -> usize {
    fixture
        .runs("prod")
        .iter()
        .filter(|run| run["kind"] == "drift" && !run["finished_at"].is_null())
        .count()
}

/// Drift checks of prod that failed.
fn failed_checks(fixture: &Fixture) -> usize {
    fixture
        .runs("prod")
        .iter()
        .filter(|run| run["kind"] == "drift" && run["result"] == "failed")
        .count()
}

/// prod built from [`VPCS`] with `drift` settings (the lines under `drift:`), asking `trail`
/// for CloudTrail, once applied: the fixture and that first commit.
pub(crate) fn drifting_prod(drift: &str, trail: Option<&FakeCloudTrail>) -> (Fixture, String) {
    let fixture = Fixture::build()
        .prod_extra(&format!("drift:\n{drift}"))
        .prod_module(VPCS)
        .cloudtrail(trail.map(|trail| trail.url.clone()))
        .start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));
    (fixture, first)
}

/// Pushes to `main` a commit that moves prod's label from `v{round - 1}` to `v{round}`: a
/// merged change that is no drift. Returns the commit.
fn push_label(fixture: &Fixture, round: usize) -> String {
    fixture.clone.replace(
        "modules/prod-app/main.tf",
        &format!("default = \"v{}\"", round - 1),
        &format!("default = \"v{round}\""),
    );
    let head = fixture.clone.commit_all(&format!("label v{round}"));
    fixture.push("main");
    head
}

fn alerts(fixture: &Fixture, kind: &str) -> Vec<Value> {
    fixture.sink.all("prod", kind)
}

#[test]
fn drift_is_alerted_once_per_change_with_who_made_it_and_cleared() {
    // The first LookupEvents answer is a throttle: retried, then answered.
    let trail = FakeCloudTrail::start(1);
    let (fixture, first) = drifting_prod("  interval: 2s\n", Some(&trail));
    fixture.wait_for("a clean drift check", |f| {
        f.environment("prod")["drift"]["status"] == "in_sync"
    });
    assert_eq!(count(&fixture, "drift_detected"), 0, "no drift yet");

    let main = vpc_id(&fixture, "karrots-drift");
    let alice = assumed("admin", "alice", "ASIAALICE");
    let own = assumed(
        "karrots-worker",
        &format!("karrots-prod-{}", &first[..7]),
        "ASIAOWN",
    );
    let carol = json!({"type": "IAMUser", "arn": "arn:aws:iam::123456789012:user/carol", "accessKeyId": "AKIACAROL"});
    // Five events over three pages: the daemon's own session, a read, alice's change (twice:
    // the same event id on two pages) and carol's.
    trail.add(&main, event("e-own", "CreateTags", false, own, &main));
    trail.add(
        &main,
        event("e-read", "DescribeVpcs", true, carol.clone(), &main),
    );
    trail.add(
        &main,
        event("e-alice", "CreateTags", false, alice.clone(), &main),
    );
    trail.add(&main, event("e-alice", "CreateTags", false, alice, &main));
    trail.add(&main, event("e-carol", "DeleteTags", false, carol, &main));
    let tagged_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    retag(&fixture, &main, "changed-by-hand");

    fixture.wait_for("drift_detected", |f| count(f, "drift_detected") == 1);
    let alert = &alerts(&fixture, "drift_detected")[0];
    assert_eq!(alert["commit"], first.as_str());
    let resources = alert["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 1, "{alert:#}");
    assert_eq!(resources[0]["address"], "aws_vpc.main");
    assert_eq!(resources[0]["actions"], json!(["update"]));
    assert_eq!(resources[0]["id"], main.as_str());
    assert!(
        resources[0]["changed_attributes"]
            .as_array()
            .unwrap()
            .contains(&json!("tags")),
        "{alert:#}"
    );
    let who: Vec<(&str, &str, &str)> = resources[0]["changed_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["principal"].as_str().unwrap(),
                c["event"].as_str().unwrap(),
                c["access_key_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        who,
        vec![
            (
                "arn:aws:iam::123456789012:role/admin",
                "CreateTags",
                "ASIAALICE"
            ),
            (
                "arn:aws:iam::123456789012:user/carol",
                "DeleteTags",
                "AKIACAROL"
            ),
        ],
        "the own session and the read are left out, the duplicate counted once: {alert:#}"
    );
    assert_eq!(resources[0]["changed_by"][0]["session"], "alice");

    // The throttled request was retried; all three pages were read; the window starts at
    // least the 15-minute delivery margin before the last in-sync check.
    let requests = trail.requests();
    assert!(requests.len() >= 4, "{requests:#?}");
    assert_eq!(
        requests[0]["LookupAttributes"][0]["AttributeKey"],
        "ResourceName"
    );
    assert_eq!(
        requests[0]["LookupAttributes"][0]["AttributeValue"],
        main.as_str()
    );
    let start = requests[0]["StartTime"].as_f64().expect("a StartTime");
    assert!(
        start <= tagged_at.as_secs_f64() - 900.0,
        "{start} vs {tagged_at:?}"
    );
    assert!(
        start >= tagged_at.as_secs_f64() - 900.0 - 120.0,
        "{start} vs {tagged_at:?}"
    );
    assert!(
        requests.iter().any(|r| r["NextToken"] == "page-4"),
        "pagination followed: {requests:#?}"
    );

    let env = fixture.environment("prod");
    assert_eq!(env["status"], "drifted");
    assert_eq!(env["drift"]["status"], "drifted");
    assert_eq!(env["drift"]["resources"], json!(["aws_vpc.main"]));
    assert!(env["drift"]["checked_at"].is_string());
    assert_eq!(
        env["last_applied"],
        first.as_str(),
        "drift never moves the applied commit"
    );
    let status = std::process::Command::new(crate::support::karrots_binary())
        .args(["status", "--server", &format!("http://{}", fixture.address)])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("prod") && l.contains("drifted") && l.contains("1 drifted")),
        "{table}"
    );
    let metrics = crate::support::daemon::http(&fixture.address, "GET", "/metrics", &[], b"").1;
    assert!(
        metrics.contains("karrots_drift_status{env=\"prod\",status=\"drifted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("karrots_drifted_resources{env=\"prod\"} 1"),
        "{metrics}"
    );

    // The same drift, checked twice more: still one alert, and nothing applied.
    let checks = finished_checks(&fixture);
    fixture.wait_for("two more drift checks", |f| {
        finished_checks(f) >= checks + 2
    });
    assert_eq!(
        count(&fixture, "drift_detected"),
        1,
        "{:?}",
        fixture.sink.kinds("prod")
    );
    assert_eq!(
        name_tag(&fixture, &main),
        "changed-by-hand",
        "remediation is off"
    );
    assert!(
        fixture
            .runs("prod")
            .iter()
            .all(|run| run["kind"] != "apply" || run["commit"] == first.as_str()),
        "nothing but the first commit's apply"
    );

    // Put back by hand: cleared.
    retag(&fixture, &main, "karrots-drift");
    fixture.wait_for("drift_cleared", |f| count(f, "drift_cleared") == 1);
    assert_eq!(fixture.environment("prod")["status"], "in_sync");
    assert_eq!(fixture.environment("prod")["drift"]["resources"], json!([]));

    // A resource deleted by hand: applying the commit would create it.
    let extra = vpc_id(&fixture, "karrots-drift-extra");
    fixture.moto.aws(&["ec2", "delete-vpc", "--vpc-id", &extra]);
    fixture.wait_for("the deletion detected", |f| count(f, "drift_detected") == 2);
    let alert = &alerts(&fixture, "drift_detected")[1];
    assert_eq!(
        alert["resources"],
        json!([{"address": "aws_vpc.extra", "actions": ["create"], "id": extra, "changed_by": []}]),
        "{alert:#}"
    );

    // A merge while drifted heals it the normal way.
    let second = push_label(&fixture, 2);
    fixture.wait_for("the merge applied", |f| f.applied("prod", &second));
    fixture.wait_for("drift cleared by the apply", |f| {
        count(f, "drift_cleared") == 2
    });
    let cleared = &alerts(&fixture, "drift_cleared")[1];
    assert!(
        cleared["message"].as_str().unwrap().contains("apply of"),
        "{cleared:#}"
    );
    assert!(
        !vpc_id(&fixture, "karrots-drift-extra").is_empty(),
        "created again"
    );

    // A merged commit that arrives during a drift check goes first: the check is cancelled
    // (`superseded`) and the commit applied. Pushed while a check runs — which it nearly
    // always does with a 2 s interval; tried again if that check ended just before the push.
    let mut superseded = false;
    for round in 3..6 {
        fixture.wait_for("a drift check in progress", |f| {
            f.runs("prod")
                .first()
                .is_some_and(|run| run["kind"] == "drift" && run["finished_at"].is_null())
        });
        let head = push_label(&fixture, round);
        fixture.wait_for("the commit applied", |f| f.applied("prod", &head));
        if fixture.runs("prod").iter().any(|run| {
            run["kind"] == "drift"
                && run["result"] == "superseded"
                && run["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("goes first")
        }) {
            superseded = true;
            break;
        }
    }
    assert!(superseded, "{:#?}", fixture.runs("prod"));
}

#[test]
fn a_merged_commit_cuts_short_the_search_for_who_changed_a_drifted_resource() {
    let trail = FakeCloudTrail::silent();
    let (fixture, _) = drifting_prod("  interval: 2s\n", Some(&trail));
    let main = vpc_id(&fixture, "karrots-drift");
    retag(&fixture, &main, "changed-by-hand");
    fixture.wait_for("the search for who changed it", |_| {
        !trail.requests().is_empty()
    });
    let check = fixture.runs("prod")[0].clone();
    assert_eq!(check["kind"], "drift", "{check:#}");
    assert!(
        check["finished_at"].is_null()
            && fixture.environment("prod")["drift"]["status"] != "drifted",
        "while the search runs, the check is not shown finished: {check:#}"
    );

    let second = push_label(&fixture, 2);
    fixture.wait_for("the merge applied", |f| f.applied("prod", &second));
    let detected = &alerts(&fixture, "drift_detected")[0];
    let message = detected["message"].as_str().unwrap();
    assert!(
        message.contains("cut short") && message.contains("merged commit goes first"),
        "{message}"
    );
    assert_eq!(detected["resources"][0]["id"], main.as_str());
    let runs = fixture.runs("prod");
    let check = runs
        .iter()
        .find(|run| run["id"] == check["id"])
        .expect("the drift check's run");
    assert_eq!(check["result"], "changes", "{check:#}");
    fixture.wait_for("drift cleared by the apply", |f| {
        f.environment("prod")["drift"]["status"] == "in_sync"
    });
}

#[test]
fn remediation_puts_it_back_and_a_throttling_cloudtrail_does_not_hold_the_alert() {
    let trail = FakeCloudTrail::start(usize::MAX);
    let (fixture, first) = drifting_prod("  interval: 2s\n  remediate: true\n", Some(&trail));
    let main = vpc_id(&fixture, "karrots-drift");
    retag(&fixture, &main, "changed-by-hand");

    fixture.wait_for("the remediation applied", |f| count(f, "applied") == 2);
    assert_eq!(
        name_tag(&fixture, &main),
        "karrots-drift",
        "the tag is back in moto"
    );
    let applied = &alerts(&fixture, "applied")[1];
    assert_eq!(
        applied["commit"],
        first.as_str(),
        "the last applied commit, nothing else"
    );
    assert!(
        applied["message"].as_str().unwrap().contains("remediation"),
        "{applied:#}"
    );
    let detected = &alerts(&fixture, "drift_detected")[0];
    assert_eq!(detected["resources"][0]["address"], "aws_vpc.main");
    assert_eq!(detected["resources"][0]["changed_by"], json!([]));
    let message = detected["message"].as_str().unwrap();
    assert!(
        message.contains("unknown") && message.contains("throttled"),
        "{message}"
    );
    let requests = trail.requests().len();
    assert!(
        (2..=5).contains(&requests),
        "retried, then given up: {requests} requests"
    );

    let runs = fixture.runs("prod");
    let remediation = runs
        .iter()
        .find(|run| run["kind"] == "apply" && run["result"] == "applied" && run["message"] != "")
        .expect("a remediation apply run");
    assert_eq!(remediation["commit"], first.as_str());
    assert!(
        runs.iter()
            .any(|run| run["kind"] == "drift" && run["result"] == "changes"),
        "{runs:#?}"
    );
    fixture.wait_for("back in sync", |f| {
        f.environment("prod")["drift"]["status"] == "in_sync"
            && f.environment("prod")["status"] == "in_sync"
    });

    // The remediation left prod where it was: a commit that changes none of its inputs is
    // passed over with the fingerprint of its last applied commit, not planned.
    let plans = count_runs(&fixture, "plan");
    fixture
        .clone
        .write("README.md", "# the config repository\n");
    let readme = fixture.clone.commit_all("a README");
    fixture.push("main");
    fixture.wait_for("prod at the README commit", |f| f.applied("prod", &readme));
    assert_eq!(
        count_runs(&fixture, "plan"),
        plans,
        "{:#?}",
        fixture.runs("prod")
    );
}

fn count_runs(fixture: &Fixture, kind: &str) -> usize {
    let runs = fixture.runs("prod");
    runs.iter().filter(|run| run["kind"] == kind).count()
}

#[test]
fn a_drift_check_that_fails_is_a_drift_error_never_drift() {
    let (mut fixture, _) = drifting_prod("  interval: 2s\n  remediate: true\n", None);

    // dev's own branch turns its drift checks on (the trust branch says nothing of them):
    // the settings of the applied commit are the ones that count.
    fixture.clone.git(&["checkout", "-q", "-b", "dev"]);
    fixture
        .clone
        .append("environments/dev/karrots.yaml", "drift:\n  interval: 1s\n");
    let dev = fixture.clone.commit_all("dev: check drift");
    fixture.push("dev");
    fixture.wait_for("a drift check of dev", |f| {
        f.applied("dev", &dev)
            && f.runs("dev")
                .iter()
                .any(|run| run["kind"] == "drift" && run["result"] == "no_changes")
    });
    assert_eq!(fixture.environment("dev")["drift"]["status"], "in_sync");
    fixture.wait_for("a drift check of prod", |f| {
        f.environment("prod")["drift"]["status"] == "in_sync"
    });

    fixture.stop("-TERM");
    let main = vpc_id(&fixture, "karrots-drift");
    retag(&fixture, &main, "changed-by-hand");
    fixture.credentials = false;
    fixture.start();

    fixture.wait_for("drift_error", |f| count(f, "drift_error") == 1);
    let checks_then = failed_checks(&fixture);
    let deadline = Instant::now() + Duration::from_secs(60);
    while failed_checks(&fixture) < checks_then + 2 {
        assert!(Instant::now() < deadline, "retried: {}", fixture.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(count(&fixture, "drift_error"), 1, "alerted once");
    assert_eq!(
        count(&fixture, "drift_detected"),
        0,
        "a failure is never drift"
    );
    assert_eq!(count(&fixture, "applied"), 1, "and never remediated");
    assert_eq!(name_tag(&fixture, &main), "changed-by-hand");
    let error = &alerts(&fixture, "drift_error")[0];
    assert!(
        error["message"].as_str().unwrap().contains("credentials"),
        "{error:#}"
    );
    let env = fixture.environment("prod");
    assert_eq!(env["drift"]["status"], "error");
    assert_eq!(
        env["status"], "in_sync",
        "the environment itself is where it was"
    );
}
