//! Operating the daemon: the status page (read by headless Chromium), who may look off
//! loopback, the systemd unit and notifications, and JSON logs that never carry a secret.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::drift::{FakeCloudTrail, assumed, drifting_prod, event, retag, vpc_id};
use crate::support::daemon::{CANARY_SECRET, Fixture, http, http_exchange, no_file_contains};
use crate::support::{eventually, karrots_binary, require_tool};

/// A headless Chromium: the page's DOM after load, and a screenshot.
struct Browser {
    profile: tempfile::TempDir,
}

impl Browser {
    fn new() -> Browser {
        require_tool(
            "chromium",
            "apt-get install chromium (Debian's package; .ci/run installs it)",
        );
        Browser {
            profile: tempfile::Builder::new()
                .prefix("karrots-chromium-")
                .tempdir()
                .unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("chromium")
            .args([
                "--headless",
                // Root (as in CI) cannot use Chromium's own sandbox; the page is the test's.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", self.profile.path().display()))
            .args(args)
            .output()
            .expect("run chromium");
        assert!(
            output.status.success(),
            "chromium {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn dom(&self, url: &str) -> String {
        self.run(&["--dump-dom", url])
    }

    fn screenshot(&self, url: &str, file: &Path) {
        self.run(&[&format!("--screenshot={}", file.display()), url]);
        let png = std::fs::read(file).expect("chromium wrote the screenshot");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "a real screenshot"
        );
    }
}

/// The `<tr>` of an environment on the status page.
fn environment_row<'a>(dom: &'a str, env: &str) -> &'a str {
    let start = dom
        .find(&format!("<tr id=\"env-{env}\""))
        .unwrap_or_else(|| panic!("no row for {env}:\n{dom}"));
    let end = dom[start..].find("</tr>").unwrap() + start;
    &dom[start..end]
}

#[test]
fn the_status_page_shows_what_was_applied_and_who_drifted_it() {
    let browser = Browser::new();
    let trail = FakeCloudTrail::start(0);
    let (fixture, first) = drifting_prod("  interval: 2s\n", Some(&trail));
    fixture.wait_for("dev applied", |f| f.applied("dev", &first));
    fixture.wait_for("a clean drift check of prod", |f| {
        f.environment("prod")["drift"]["status"] == "in_sync"
    });
    let vpc = vpc_id(&fixture, "karrots-drift");
    trail.add(
        &vpc,
        event(
            "e-1",
            "CreateTags",
            false,
            assumed("admin", "alice", "ASIAALICE"),
            &vpc,
        ),
    );
    retag(&fixture, &vpc, "changed-by-hand");
    fixture.wait_for("drift_detected", |f| {
        f.sink.find("prod", "drift_detected").is_some()
    });

    let url = format!("http://{}/", fixture.address);
    let dom = browser.dom(&url);
    assert!(dom.contains("<title>Karrots</title>"), "{dom}");
    assert!(
        dom.contains(r#"http-equiv="refresh""#),
        "the page refreshes itself"
    );
    let prod = environment_row(&dom, "prod");
    assert!(prod.contains("<code>main</code>"), "{prod}");
    assert!(prod.contains(&first[..7]), "head and last applied: {prod}");
    assert!(prod.contains(">drifted<"), "{prod}");
    assert!(prod.contains("<code>aws_vpc.main</code> update"), "{prod}");
    assert!(
        prod.contains("arn:aws:iam::123456789012:role/admin</code> (alice) · CreateTags"),
        "changed_by: {prod}"
    );
    let dev = environment_row(&dom, "dev");
    assert!(dev.contains("<code>dev</code>"), "{dev}");
    assert!(
        dev.contains(">in_sync<") && dev.contains(">off<"),
        "dev applied, no drift checks: {dev}"
    );
    assert!(!dom.contains("<script"), "no JavaScript");

    // The run page of prod's apply: its planned changes, and links back.
    let apply = fixture
        .runs("prod")
        .into_iter()
        .find(|run| run["kind"] == "apply" && run["result"] == "applied")
        .expect("prod's apply run");
    let id = apply["id"].as_i64().unwrap();
    assert!(
        dom.contains(&format!("href=\"/runs/{id}\"")),
        "the overview links the run"
    );
    let run_dom = browser.dom(&format!("{url}runs/{id}"));
    assert!(
        run_dom.contains(&format!("Run {id} · prod · apply")),
        "{run_dom}"
    );
    assert!(
        run_dom.contains("<code>aws_vpc.main</code>")
            && run_dom.contains("<code>aws_vpc.extra</code>")
    );
    assert!(run_dom.contains("<td>create</td>"), "{run_dom}");
    assert!(run_dom.contains(r##"href="/#env-prod""##));
    assert!(
        run_dom.contains("Other runs of prod") && run_dom.contains(">drift<"),
        "links to the drift checks: {run_dom}"
    );

    let screenshot = fixture.state.path().join("status-page.png");
    browser.screenshot(&url, &screenshot);
    eprintln!("status page screenshot: {}", screenshot.display());
}

#[test]
fn off_loopback_every_page_needs_the_token() {
    let mut fixture = Fixture::build().unstarted();
    fixture.listen = "0.0.0.0:0".into();

    // No api_token_file: the daemon refuses to start, and says what to do.
    let mut child = fixture.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the daemon started off loopback without a token:\n{}",
                fixture.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    assert!(
        fixture.logs().contains("0.0.0.0") && fixture.logs().contains("set api_token_file"),
        "{}",
        fixture.logs()
    );

    let token = "token-6f1d2c8a9b";
    let token_file = fixture.state.path().join("api-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    fixture.extra_config = format!("api_token_file: {}\n", token_file.display());
    fixture.api_token = Some(token.to_string());
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    let address = fixture.address.clone();
    let get = |path: &str, headers: &[(&str, &str)]| http(&address, "GET", path, headers, b"");
    let bearer = format!("Bearer {token}");
    for path in [
        "/api/v1/environments",
        "/api/v1/runs",
        "/api/v1/runs/1",
        "/runs/1",
        "/",
        "/metrics",
    ] {
        assert_eq!(
            get(path, &[]),
            (401, String::new()),
            "{path} without a token"
        );
        assert_eq!(
            get(path, &[("authorization", "Bearer token-6f1d2c8a9c")]),
            (401, String::new()),
            "{path} with a wrong token"
        );
        let (status, body) = get(path, &[("authorization", &bearer)]);
        assert_eq!(status, 200, "{path} with the token: {body}");
    }
    assert_eq!(get("/healthz", &[]), (200, "ok".to_string()));

    // A browser gets the sign-in form, which shows no infrastructure.
    let (status, form) = get("/", &[("accept", "text/html")]);
    assert_eq!(status, 401);
    assert!(
        form.contains(r#"<form method="post" action="/login">"#),
        "{form}"
    );
    assert!(
        !form.contains("prod") && !form.contains(&first[..7]),
        "{form}"
    );

    // The token, once: a cookie that is HttpOnly, SameSite=Strict and not the token.
    let login = |token: &str| {
        http_exchange(
            &address,
            "POST",
            "/login",
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("token={token}").as_bytes(),
        )
    };
    let (status, head, _) = login("wrong");
    assert_eq!(status, 401);
    assert!(!head.to_lowercase().contains("set-cookie"), "{head}");
    let (status, head, _) = login(token);
    assert_eq!(status, 303, "{head}");
    let set_cookie = head
        .lines()
        .find_map(|line| {
            line.to_lowercase()
                .starts_with("set-cookie:")
                .then(|| line["set-cookie:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    assert!(!set_cookie.contains(token), "the cookie is not the token");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let (status, page) = get("/", &[("cookie", &cookie)]);
    assert_eq!(status, 200);
    assert!(page.contains(r#"<tr id="env-prod""#), "{page}");
    let (status, _) = get("/", &[("cookie", "karrots_session=0123")]);
    assert_eq!(status, 401, "a made-up cookie");

    // metrics_public: /metrics for a scraper without the token; the rest still needs it.
    assert!(fixture.stop("-TERM").success());
    fixture.extra_config.push_str("metrics_public: true\n");
    fixture.start();
    let address = fixture.address.clone();
    let get = |path: &str, headers: &[(&str, &str)]| http(&address, "GET", path, headers, b"");
    let (status, metrics) = get("/metrics", &[]);
    assert_eq!(status, 200);
    assert!(metrics.contains("karrots_queue_depth"), "{metrics}");
    assert_eq!(get("/api/v1/environments", &[]), (401, String::new()));
}

/// prod's module, with a sensitive value the logs must never show.
const SENSITIVE_APP: &str = r#"variable "label" {
  type    = string
  default = "v1"
}

variable "db_password" {
  type      = string
  sensitive = true
  default   = "canary-sensitive-51c7e2"
}

resource "terraform_data" "app" {
  input = "${var.label}-${var.db_password}"
}
"#;

/// Collects what the daemon sends to its `NOTIFY_SOCKET`.
fn notify_socket(path: &Path) -> Arc<Mutex<Vec<String>>> {
    let socket = UnixDatagram::bind(path).expect("bind the notify socket");
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = received.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = socket.recv(&mut buffer) {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buffer[..read]).into_owned());
        }
    });
    received
}

#[test]
fn under_systemd_it_notifies_and_its_json_logs_name_each_run_and_no_secret() {
    let mut fixture = Fixture::build().prod_module(SENSITIVE_APP).unstarted();
    let socket = fixture.state.path().join("notify.sock");
    let notes = notify_socket(&socket);
    fixture.serve_args = vec!["--log-format".into(), "json".into()];
    fixture.env = vec![
        ("NOTIFY_SOCKET".into(), socket.display().to_string()),
        ("WATCHDOG_USEC".into(), "600000".into()),
    ];
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));
    let second = fixture.merge_prod_label("v2", "v2");
    eventually("two watchdog pings", Duration::from_secs(10), || {
        let notes = notes.lock().unwrap();
        notes
            .iter()
            .filter(|note| note.contains("WATCHDOG=1"))
            .count()
            >= 2
    });
    let api = format!(
        "{}{}",
        fixture.get("/api/v1/environments"),
        fixture.get("/api/v1/runs")
    );
    assert!(fixture.stop("-TERM").success(), "{}", fixture.logs());

    let notes = notes.lock().unwrap().clone();
    assert!(
        notes.first().is_some_and(|first| first.contains("READY=1")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .filter(|note| note.contains("WATCHDOG=1"))
            .count()
            >= 2,
        "the watchdog is pinged: {notes:?}"
    );
    assert!(
        notes.last().is_some_and(|last| last.contains("STOPPING=1")),
        "{notes:?}"
    );

    // Every line is one JSON object; every line about a run names it.
    let logs = fixture.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let about_runs: Vec<&Value> = lines
        .iter()
        .filter(|line| {
            ["planning", "planned", "applying", "applied"]
                .contains(&line["message"].as_str().unwrap_or(""))
        })
        .collect();
    for commit in [&first, &second] {
        for message in ["planning", "planned", "applying", "applied"] {
            assert!(
                about_runs.iter().any(|line| line["message"] == message
                    && line["span"]["env"] == "prod"
                    && line["span"]["commit"] == commit[..7]),
                "no {message:?} line for prod at {commit}:\n{logs}"
            );
        }
    }
    for line in about_runs
        .iter()
        .copied()
        .chain(lines.iter().filter(|line| line["span"]["name"] == "run"))
    {
        let span = &line["span"];
        assert!(
            span["env"].is_string()
                && span["lane"] == "merged"
                && span["commit"].is_string()
                && span["run"].is_i64(),
            "a run line without env, lane, commit and run id: {line}"
        );
    }
    // The plan and the apply of one commit are two runs.
    let runs_of = |message: &str| -> Vec<i64> {
        about_runs
            .iter()
            .filter(|line| line["message"] == message && line["span"]["commit"] == second[..7])
            .map(|line| line["span"]["run"].as_i64().unwrap())
            .collect()
    };
    assert_ne!(runs_of("planned"), runs_of("applied"));

    // No credential, webhook secret or sensitive value in the logs, the API or the alerts.
    let alerts = format!("{:?}", fixture.sink.all("prod", "applied"));
    for canary in [CANARY_SECRET, "hook-secret", "canary-sensitive-51c7e2"] {
        assert!(!logs.contains(canary), "{canary} in the logs");
        assert!(!api.contains(canary), "{canary} in the API");
        assert!(!alerts.contains(canary), "{canary} in an alert");
    }
    if let Err(file) = no_file_contains(fixture.state.path(), CANARY_SECRET) {
        panic!("the AWS secret key was written to {file}");
    }
}

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/karrots.service")
}

#[test]
fn the_systemd_unit_verifies_and_its_exposure_is_at_most_2() {
    require_tool(
        "systemd-analyze",
        "apt-get install systemd (it checks the unit offline; no running systemd is needed)",
    );
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    for setting in [
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "StateDirectory=karrots",
        "KillMode=mixed",
        "TimeoutStopSec=35min",
    ] {
        assert!(
            unit.lines().any(|line| line.starts_with(setting)),
            "{setting} missing"
        );
    }
    // The sandbox the daemon puts terraform in needs Landlock's system calls.
    let filter = unit
        .lines()
        .find(|line| line.starts_with("SystemCallFilter=@system-service"))
        .expect("an allow-list of system calls");
    for call in [
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
    ] {
        assert!(filter.contains(call), "{call} is not allowed: {filter}");
    }
    // Previews run in a private user and network namespace.
    assert!(
        unit.lines()
            .any(|line| line == "RestrictNamespaces=user net"),
        "the unit forbids the namespaces of a preview's private network"
    );

    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("karrots.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/karrots", karrots_binary().to_str().unwrap()),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !complaints.contains("karrots.service"),
        "systemd-analyze verify: {complaints}"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for karrots.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{report}");
}
