//! `karrots serve` end to end: the real binary watching a bare git remote that a working clone
//! pushes to, real terraform, moto for STS, and a local HTTP sink collecting the alerts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    ConfigRepo, Moto, PLUGIN_MIRROR, environment_yaml, free_port, karrots_binary,
    require_terraform_and_moto, require_tool,
};

/// The AWS secret key every daemon test runs with: it must never reach the state directory
/// or the logs.
pub(crate) const CANARY_SECRET: &str = "canary-secret-8c1f0e27";

/// A module that plans without provider downloads: one resource, named by a variable.
pub(crate) const APP: &str = "variable \"label\" {\n  type    = string\n  default = \"v1\"\n}\n\nresource \"terraform_data\" \"app\" {\n  input = var.label\n}\n";

/// A collector of alert POSTs on a free loopback port.
pub struct AlertSink {
    pub url: String,
    received: Arc<Mutex<Vec<Value>>>,
}

impl AlertSink {
    pub fn start() -> AlertSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the alert sink");
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let store = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Some(body) = read_request(stream)
                    && let Ok(value) = serde_json::from_slice(&body)
                {
                    store.lock().unwrap().push(value);
                }
            }
        });
        AlertSink { url, received }
    }

    pub fn kinds(&self, env: &str) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|alert| alert["env"] == env)
            .map(|alert| alert["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn all(&self, env: &str, kind: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|alert| alert["env"] == env && alert["kind"] == kind)
            .cloned()
            .collect()
    }

    pub fn find(&self, env: &str, kind: &str) -> Option<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .find(|alert| alert["env"] == env && alert["kind"] == kind)
            .cloned()
    }
}

/// Reads one HTTP/1.1 request, answers 200, returns its body.
fn read_request(mut stream: TcpStream) -> Option<Vec<u8>> {
    let body = read_body(&mut stream)?;
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    Some(body)
}

/// Reads one HTTP/1.1 request from `stream`; returns its body.
pub fn read_body(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, length) = loop {
        let read = stream.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..read]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while data.len() < head_end + length {
        let read = stream.read(&mut chunk).ok()?;
        if read == 0 {
            break;
        }
        data.extend_from_slice(&chunk[..read]);
    }
    Some(data[head_end..].to_vec())
}

/// One HTTP request to the daemon; returns the status and the body.
pub fn http(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = http_exchange(address, method, path, headers, body);
    (status, body)
}

/// One HTTP request to the daemon; returns the status, the response's head and its body.
pub fn http_exchange(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    // The daemon may answer (413) and close before a large body is written: not an error.
    let _ = stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.write_all(body));
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_string(), b.to_string()))
        .unwrap_or_default();
    // Chunked bodies (axum's JSON): keep the JSON between the chunk sizes.
    let body = if text.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    (status, head, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// A bare remote, a working clone that pushes to it, and the daemon watching the remote.
pub struct Fixture {
    pub clone: ConfigRepo,
    pub remote: tempfile::TempDir,
    pub state: tempfile::TempDir,
    pub moto: Moto,
    pub sink: AlertSink,
    pub daemon: Option<Child>,
    pub address: String,
    pub log: PathBuf,
    pub secret_file: PathBuf,
    pub poll_interval: &'static str,
    /// `aws.cloudtrail_endpoint_url` of the daemon config, when set.
    pub cloudtrail_url: Option<String>,
    /// Whether the daemon gets AWS credentials (a drift check without them must fail).
    pub credentials: bool,
    /// `listen:` of the daemon config (`address` is where the tests connect).
    pub listen: String,
    /// Appended to the daemon config.
    pub extra_config: String,
    /// After `serve --config FILE`.
    pub serve_args: Vec<String>,
    /// More environment variables for the daemon.
    pub env: Vec<(String, String)>,
    /// The API token the tests' requests carry (the daemon's `api_token_file` holds it).
    pub api_token: Option<String>,
    /// The daemon's limit on open files (soft and hard), when a test sets one.
    pub open_files: Option<u64>,
    /// `concurrency:` of the daemon config (2 unless a test sets it).
    pub concurrency: u32,
}

impl Fixture {
    /// prod (main) and dev (dev), each with its own root module; `prod_extra` is appended to
    /// prod's karrots.yaml.
    pub fn new(prod_extra: &str) -> Fixture {
        Fixture::with_poll(prod_extra, "1s")
    }

    /// [`Fixture::new`], once prod has applied its first commit.
    pub fn prod_applied(prod_extra: &str) -> Fixture {
        let fixture = Fixture::new(prod_extra);
        let first = fixture.clone.git(&["rev-parse", "HEAD"]);
        fixture.wait_for("prod applied", |f| f.applied("prod", &first));
        fixture
    }

    /// Merges a resource whose provisioner sleeps `seconds` and waits until its apply runs;
    /// returns the commit. prod must allow `local-exec`.
    pub fn start_slow_apply(&self, seconds: u32) -> String {
        self.clone
            .append("modules/prod-app/main.tf", &slow_resource("slow", seconds));
        let slow = self.clone.commit_all(&format!("a {seconds} s apply"));
        self.push("main");
        self.wait_for("the slow apply", |f| {
            f.environment("prod")["status"] == "applying"
        });
        slow
    }

    /// [`Fixture::new`] with another `poll_interval`.
    pub fn with_poll(prod_extra: &str, poll_interval: &'static str) -> Fixture {
        Fixture::custom(prod_extra, poll_interval, APP, None)
    }

    /// prod's root module is `prod_module`; the daemon asks `cloudtrail_url` for CloudTrail.
    pub fn custom(
        prod_extra: &str,
        poll_interval: &'static str,
        prod_module: &str,
        cloudtrail_url: Option<String>,
    ) -> Fixture {
        let mut fixture =
            Fixture::unstarted(prod_extra, poll_interval, prod_module, cloudtrail_url);
        fixture.start();
        fixture
    }

    /// [`Fixture::custom`] with the daemon not started yet, so a test can change how it starts.
    pub fn unstarted(
        prod_extra: &str,
        poll_interval: &'static str,
        prod_module: &str,
        cloudtrail_url: Option<String>,
    ) -> Fixture {
        require_terraform_and_moto();
        let moto = Moto::start();
        let sink = AlertSink::start();
        let remote = tempfile::Builder::new()
            .prefix("karrots-remote-")
            .tempdir()
            .unwrap();
        let status = Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(remote.path())
            .status()
            .unwrap();
        assert!(status.success());
        let clone = ConfigRepo::empty();
        clone.write(
            "environments/prod/karrots.yaml",
            &environment_yaml("prod", "main", "modules/prod-app", prod_extra),
        );
        clone.write(
            "environments/dev/karrots.yaml",
            &environment_yaml("dev", "dev", "modules/dev-app", ""),
        );
        clone.write("modules/prod-app/main.tf", prod_module);
        clone.write("modules/dev-app/main.tf", APP);
        clone.init_git();
        clone.git(&["remote", "add", "origin", remote.path().to_str().unwrap()]);
        clone.git(&["push", "-q", "origin", "main"]);
        clone.git(&["push", "-q", "origin", "main:dev"]);
        let state = tempfile::Builder::new()
            .prefix("karrots-state-")
            .tempdir()
            .unwrap();
        let secret_file = state.path().join("webhook-secret");
        std::fs::write(&secret_file, "hook-secret\n").unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let log = state.path().join("daemon.log");
        Fixture {
            clone,
            remote,
            state,
            moto,
            sink,
            daemon: None,
            listen: address.clone(),
            address,
            log,
            secret_file,
            poll_interval,
            cloudtrail_url,
            credentials: true,
            extra_config: String::new(),
            serve_args: Vec::new(),
            env: Vec::new(),
            api_token: None,
            open_files: None,
            concurrency: 2,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.state.path().join("karrots-serve.yaml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    pub fn start(&mut self) {
        let child = self.spawn();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&self.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes the daemon config and starts `karrots serve` on it, logging to `log`.
    pub fn spawn(&mut self) -> Child {
        let cloudtrail = self
            .cloudtrail_url
            .as_ref()
            .map(|url| format!("  cloudtrail_endpoint_url: {url}\n"))
            .unwrap_or_default();
        let config = format!(
            "repo: {}\npoll_interval: {}\nstate_dir: {}\nlisten: {}\nwebhook_secret_file: {}\nconcurrency: {}\nterraform:\n  plugin_mirror: {PLUGIN_MIRROR}\n  timeout: 5m\naws:\n  endpoint_url: {}\n{cloudtrail}alerts:\n  - webhook: {}\n{}",
            self.remote.path().display(),
            self.poll_interval,
            self.state_dir().display(),
            self.listen,
            self.secret_file.display(),
            self.concurrency,
            self.moto.url,
            self.sink.url,
            self.extra_config,
        );
        std::fs::write(self.config_path(), config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match self.open_files {
            Some(limit) => {
                require_tool("prlimit", "apt-get install util-linux");
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={limit}:{limit}"))
                    .arg(karrots_binary());
                command
            }
            None => Command::new(karrots_binary()),
        };
        command
            .args(["serve", "--config", self.config_path().to_str().unwrap()])
            .args(&self.serve_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("AWS_ENDPOINT_URL")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("KARROTS_LOG", "info,karrots=debug")
            .stdout(Stdio::null())
            .stderr(log);
        if self.credentials {
            command
                .env("AWS_ACCESS_KEY_ID", "AKIATESTKARROTS")
                .env("AWS_SECRET_ACCESS_KEY", CANARY_SECRET);
        } else {
            // Nothing in the chain: no variables, no files, no instance metadata.
            let nowhere = self.state.path().join("no-such-aws-file");
            command
                .env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .env_remove("AWS_SESSION_TOKEN")
                .env_remove("AWS_PROFILE")
                .env("AWS_CONFIG_FILE", &nowhere)
                .env("AWS_SHARED_CREDENTIALS_FILE", &nowhere)
                .env("AWS_EC2_METADATA_DISABLED", "true");
        }
        command.spawn().expect("start karrots serve")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Value {
        let bearer = self
            .api_token
            .as_ref()
            .map(|token| format!("Bearer {token}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|value| ("authorization", value.as_str()))
            .collect();
        let (status, body) = http(&self.address, "GET", path, &headers, b"");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn environment(&self, name: &str) -> Value {
        self.get("/api/v1/environments")
            .as_array()
            .and_then(|envs| envs.iter().find(|env| env["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }

    pub fn runs(&self, env: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/runs?env={env}"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (up to 2 minutes) until `done` holds, showing the runs and logs if it never does.
    pub fn wait_for(&self, what: &str, done: impl Fn(&Fixture) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\nprod runs: {:#?}\ndev runs: {:#?}\nlogs:\n{}",
                    self.runs("prod"),
                    self.runs("dev"),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn applied(&self, env: &str, commit: &str) -> bool {
        self.environment(env)["last_applied"] == commit
    }

    /// Changes prod's label from `v1` to `label` in the clone's checkout, commits it with
    /// `message`, pushes it to main and waits until prod has applied it; returns the commit.
    pub fn merge_prod_label(&self, label: &str, message: &str) -> String {
        self.clone.replace(
            "modules/prod-app/main.tf",
            "\"v1\"",
            &format!("\"{label}\""),
        );
        let commit = self.clone.commit_all(message);
        self.push("main");
        self.wait_for(&format!("prod applied {message:?}"), |f| {
            f.applied("prod", &commit)
        });
        commit
    }

    pub fn push(&self, refspec: &str) {
        self.clone.git(&["push", "-q", "-f", "origin", refspec]);
    }

    pub fn stop(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.daemon.take().expect("a running daemon");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn no_file_contains(root: &Path, needle: &str) -> Result<(), String> {
    for entry in walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
    {
        if entry.file_type().is_file()
            && let Ok(bytes) = std::fs::read(entry.path())
            && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            return Err(entry.path().display().to_string());
        }
    }
    Ok(())
}

#[test]
fn merges_apply_to_their_own_environment_and_branches_only_preview() {
    let mut fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod and dev applied", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });
    fixture.wait_for("the applied alert", |f| {
        f.sink.kinds("prod").contains(&"applied".to_string())
    });
    let applied = fixture.sink.find("prod", "applied").unwrap();
    assert_eq!(applied["commit"], first.as_str());
    assert_eq!(applied["resources"][0]["address"], "terraform_data.app");
    assert_eq!(applied["resources"][0]["actions"][0], "create");

    // A commit on dev changes dev only.
    fixture.clone.git(&["checkout", "-q", "-b", "dev"]);
    fixture
        .clone
        .replace("modules/dev-app/main.tf", "\"v1\"", "\"v2\"");
    let dev_commit = fixture.clone.commit_all("dev: v2");
    let prod_runs = fixture.runs("prod").len();
    fixture.push("dev");
    fixture.wait_for("dev applied", |f| f.applied("dev", &dev_commit));
    assert_eq!(
        fixture.runs("prod").len(),
        prod_runs,
        "prod did not run for a dev commit"
    );
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());

    // A merge to main that changes prod's module applies to prod; dev does not re-plan.
    fixture.clone.git(&["checkout", "-q", "main"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let prod_commit = fixture.clone.commit_all("prod: v2");
    let dev_runs = fixture.runs("dev").len();
    fixture.push("main");
    fixture.wait_for("prod applied", |f| f.applied("prod", &prod_commit));
    let runs = fixture.runs("prod");
    assert_eq!(runs[0]["kind"], "apply");
    assert_eq!(runs[0]["result"], "applied");
    assert_eq!(runs[0]["summary"]["change"], 1);
    assert_eq!(runs[1]["kind"], "plan");
    assert_eq!(runs[1]["result"], "changes");
    // dev's branch did not move: no dev run.
    assert_eq!(fixture.runs("dev").len(), dev_runs);

    // A commit on main that touches nothing prod is built from: recorded, not planned.
    fixture
        .clone
        .write("README.md", "# the config repository\n");
    let readme = fixture.clone.commit_all("a README");
    let prod_runs = fixture.runs("prod").len();
    fixture.push("main");
    fixture.wait_for("prod at the README commit", |f| f.applied("prod", &readme));
    assert_eq!(
        fixture.runs("prod").len(),
        prod_runs,
        "no plan for an unaffected commit: {:#?}",
        fixture.runs("prod")
    );
    let prod_commit = readme;

    // A feature branch gets a preview and nothing is applied.
    fixture.clone.git(&["checkout", "-q", "-b", "feature"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v2\"", "\"v3\"");
    let feature = fixture.clone.commit_all("feature: v3");
    fixture.push("feature");
    fixture.wait_for("a preview of the feature branch", |f| {
        f.runs("prod").iter().any(|run| {
            run["kind"] == "preview"
                && run["commit"] == feature.as_str()
                && run["result"] == "changes"
        })
    });
    assert_eq!(
        fixture.environment("prod")["last_applied"],
        prod_commit.as_str()
    );
    let preview_plans = fixture.state_dir().join("environments/prod/preview/plans");
    assert_eq!(
        std::fs::read_dir(preview_plans).unwrap().count(),
        0,
        "preview artifacts deleted"
    );

    // `karrots status` prints the table.
    let status = Command::new(karrots_binary())
        .args(["status", "--server", &format!("http://{}", fixture.address)])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        table.lines().any(|l| l.starts_with("prod")
            && l.contains(&prod_commit[..7])
            && l.contains("in_sync")),
        "{table}"
    );

    // SIGTERM: a clean shutdown, exit 0.
    let exit = fixture.stop("-TERM");
    assert!(exit.success(), "{exit:?}\n{}", fixture.logs());

    // No credential reached the state directory or the logs.
    if let Err(file) = no_file_contains(fixture.state.path(), CANARY_SECRET) {
        panic!("the AWS secret key was written to {file}");
    }
}

#[test]
fn force_pushes_destroys_and_bad_configuration_are_refused() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });

    // A replacement of prod's resource, with allow_destroy false: refused, alerted.
    fixture.clone.replace(
        "modules/prod-app/main.tf",
        "input = var.label",
        "input = var.label\n  triggers_replace = [\"2\"]",
    );
    let replacing = fixture.clone.commit_all("replace it");
    fixture.push("main");
    fixture.wait_for("the replacement refused", |f| {
        f.sink.find("prod", "refused").is_some()
    });
    let refused = fixture.sink.find("prod", "refused").unwrap();
    assert_eq!(refused["commit"], replacing.as_str());
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("terraform_data.app (delete, create)"),
        "{refused}"
    );
    assert_eq!(fixture.environment("prod")["status"], "refused");
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());

    // A force-push of main to a commit that does not descend from the applied one.
    fixture.clone.git(&["reset", "-q", "--hard", &first]);
    fixture
        .clone
        .git(&["commit", "-q", "--amend", "-m", "amended root"]);
    let amended = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.push("main");
    fixture.wait_for("history_rewritten", |f| {
        f.sink.find("prod", "history_rewritten").is_some()
    });
    assert_eq!(
        fixture.sink.find("prod", "history_rewritten").unwrap()["commit"],
        amended.as_str()
    );
    assert_eq!(
        fixture.environment("prod")["last_applied"],
        first.as_str(),
        "nothing applied"
    );

    // History that descends from the applied commit again is planned and applied again.
    fixture.clone.git(&["reset", "-q", "--hard", &first]);
    let descends = fixture.merge_prod_label("v2", "back on track");
    assert_eq!(fixture.environment("prod")["status"], "in_sync");

    // A bad karrots.yaml on dev's branch: config_error naming the line; prod goes on.
    fixture.clone.git(&["checkout", "-q", "-b", "dev", &first]);
    fixture
        .clone
        .append("environments/dev/karrots.yaml", "aply:\n  auto: true\n");
    let broken = fixture.clone.commit_all("typo");
    fixture.push("dev");
    fixture.wait_for("config_error for dev", |f| {
        f.sink.find("dev", "config_error").is_some()
    });
    let error = fixture.sink.find("dev", "config_error").unwrap();
    assert_eq!(error["commit"], broken.as_str());
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("environments/dev/karrots.yaml:10: aply: unknown key `aply`"),
        "{error}"
    );
    assert_eq!(fixture.environment("dev")["status"], "error");
    assert_eq!(
        fixture.environment("prod")["last_applied"],
        descends.as_str(),
        "prod goes on"
    );
}

#[test]
fn webhooks_must_verify() {
    // No polling: every fetch after the first is a hook's.
    let fixture = Fixture::with_poll("", "1h");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("the first poll's applies", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });
    let fetches = || {
        fixture
            .logs()
            .matches("polled the config repository")
            .count()
    };
    let before = fetches();
    let body =
        br#"{"ref": "refs/heads/main", "after": "0000000000000000000000000000000000000000"}"#;
    let hook = |path: &str, headers: &[(&str, &str)]| {
        http(&fixture.address, "POST", path, headers, body).0
    };
    // Unsigned, SHA-1 only, forged: 401.
    assert_eq!(hook("/hooks/github", &[]), 401);
    assert_eq!(
        hook(
            "/hooks/github",
            &[(
                "x-hub-signature",
                "sha1=0123456789abcdef0123456789abcdef01234567"
            )]
        ),
        401
    );
    assert_eq!(
        hook(
            "/hooks/github",
            &[("x-hub-signature-256", &format!("sha256={}", "0".repeat(64)))]
        ),
        401
    );
    assert_eq!(
        hook("/hooks/gitea", &[("x-gitea-signature", &"0".repeat(64))]),
        401
    );
    assert_eq!(
        hook("/hooks/gitlab", &[("x-gitlab-token", "hook-secre")]),
        401
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fetches(), before, "a refused hook fetched");
    // Signed with the secret: accepted.
    let signature = {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(
        hook(
            "/hooks/github",
            &[("x-hub-signature-256", &format!("sha256={signature}"))]
        ),
        202
    );
    assert_eq!(
        hook("/hooks/gitea", &[("x-gitea-signature", &signature)]),
        202
    );
    assert_eq!(
        hook("/hooks/gitlab", &[("x-gitlab-token", "hook-secret")]),
        202
    );
    // Each verified hook wakes one fetch at most; a burst is coalesced.
    fixture.wait_for("a fetch for the verified hooks", |_| fetches() > before);
    let after_three = fetches();
    assert!(
        after_three - before <= 3,
        "{} fetches",
        after_three - before
    );
    let github = [("x-hub-signature-256", format!("sha256={signature}"))];
    let headers: Vec<(&str, &str)> = github.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let address = fixture.address.clone();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            std::thread::spawn(move || {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                http(&address, "POST", "/hooks/github", &headers, body).0
            })
        })
        .collect();
    for request in burst {
        assert_eq!(request.join().unwrap(), 202);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let burst_fetches = fetches() - after_three;
    assert!(
        (1..=2).contains(&burst_fetches),
        "10 hooks at once made {burst_fetches} fetches"
    );
    // Over 25 MiB: 413 for a signed hook; an unsigned one is refused before its body is read.
    let big = vec![b'x'; 25 * 1024 * 1024 + 1];
    let signed = [("x-hub-signature-256", "sha256=00")];
    let (status, _) = http(&fixture.address, "POST", "/hooks/github", &signed, &big);
    assert_eq!(status, 413);
    let (status, _) = http(&fixture.address, "POST", "/hooks/github", &[], &big);
    assert_eq!(status, 401);
    let logs = fixture.logs();
    assert_eq!(logs.matches("verified webhook").count(), 13, "{logs}");
    assert!(!logs.contains("hook-secret"), "the secret reached the logs");
}

/// A resource whose creation takes `seconds`: an apply long enough to interrupt.
fn slow_resource(name: &str, seconds: u32) -> String {
    format!(
        "\nresource \"terraform_data\" \"{name}\" {{\n  provisioner \"local-exec\" {{\n    command = \"sleep {seconds}\"\n  }}\n}}\n"
    )
}

#[test]
fn commits_that_arrive_while_busy_are_coalesced_to_the_newest() {
    let fixture = Fixture::new("allow: [local-exec]\n");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    fixture
        .clone
        .append("modules/prod-app/main.tf", &slow_resource("slow", 6));
    let slow = fixture.clone.commit_all("a slow apply");
    fixture.push("main");
    fixture.wait_for("the slow apply", |f| {
        f.environment("prod")["status"] == "applying"
    });

    // Two commits while prod is busy: the first waits, the second supersedes it.
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let older = fixture.clone.commit_all("v2");
    fixture.push("main");
    std::thread::sleep(Duration::from_millis(2500));
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v2\"", "\"v3\"");
    let newest = fixture.clone.commit_all("v3");
    fixture.push("main");
    fixture.wait_for("the newest applied", |f| f.applied("prod", &newest));

    let runs = fixture.runs("prod");
    let of = |commit: &str| -> Vec<(String, String)> {
        runs.iter()
            .filter(|run| run["commit"] == commit)
            .map(|run| {
                (
                    run["kind"].as_str().unwrap().to_string(),
                    run["result"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    assert!(
        of(&slow).contains(&("apply".into(), "applied".into())),
        "{runs:#?}"
    );
    assert_eq!(
        of(&older),
        vec![("plan".to_string(), "superseded".to_string())],
        "{runs:#?}"
    );
    assert!(
        of(&newest).contains(&("apply".into(), "applied".into())),
        "{runs:#?}"
    );
}

#[test]
fn a_kill_during_an_apply_is_found_interrupted_and_never_reapplied_from_its_plan() {
    // terraform gets SIGTERM when the daemon dies: an apply cut off in the provisioner leaves
    // the resource tainted, and the re-plan after the restart replaces it.
    let mut fixture = Fixture::prod_applied("allow: [local-exec]\napply:\n  allow_destroy: true\n");
    let slow = fixture.start_slow_apply(5);
    fixture.stop("-KILL");
    fixture.start();

    fixture.wait_for("apply_interrupted", |f| {
        f.sink.find("prod", "apply_interrupted").is_some()
    });
    assert_eq!(
        fixture.sink.find("prod", "apply_interrupted").unwrap()["commit"],
        slow.as_str()
    );
    let interrupted: Vec<Value> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["kind"] == "apply" && run["result"] == "interrupted")
        .collect();
    assert_eq!(interrupted.len(), 1, "{:#?}", fixture.runs("prod"));

    // The restart re-plans from the real state; the cut-off plan file is never applied.
    fixture.wait_for("prod at the slow commit", |f| f.applied("prod", &slow));
    let applied_again = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| {
            run["commit"] == slow.as_str() && run["kind"] == "apply" && run["result"] == "applied"
        })
        .count();
    assert!(applied_again <= 1, "{:#?}", fixture.runs("prod"));
    let plans_after_restart = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["commit"] == slow.as_str() && run["kind"] == "plan")
        .count();
    assert_eq!(
        plans_after_restart, 2,
        "planned before the kill and again after it"
    );
}

/// The terraform processes (terraform and its providers) working under `dir`.
fn terraform_working_in(dir: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("terraform"))
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// A daemon killed with SIGKILL during an apply leaves no terraform running as an orphan:
/// terraform gets SIGTERM at once (the parent-death signal).
#[test]
fn terraform_does_not_outlive_a_killed_daemon() {
    let mut fixture = Fixture::prod_applied("allow: [local-exec]\n");
    fixture.start_slow_apply(300);
    fixture.wait_for("terraform running", |f| {
        !terraform_working_in(&f.state_dir()).is_empty()
    });
    fixture.stop("-KILL");
    // Without the signal terraform lived on until its next progress line met the closed
    // pipe (11 s here); with it, it stops at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !terraform_working_in(&fixture.state_dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "terraform still runs 5 s after the daemon was killed: {:?}",
            terraform_working_in(&fixture.state_dir())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What a provisioner started is terraform's grandchild and not bound to the daemon
    // (under the systemd unit its cgroup ends it): the test cleans it up itself.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/cwd"))
            .is_ok_and(|cwd| cwd.starts_with(fixture.state_dir()))
        {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn a_push_to_a_file_remote_is_seen_at_once_without_polling() {
    // Polling once an hour: only the watch of the remote's refs can wake the daemon.
    let fixture = Fixture::with_poll("", "1h");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("the first poll's applies", |f| f.applied("prod", &first));
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let second = fixture.clone.commit_all("v2");
    let pushed = Instant::now();
    fixture.push("main");
    fixture.wait_for("the push seen through the watch", |f| {
        f.applied("prod", &second)
    });
    assert!(
        pushed.elapsed() < Duration::from_secs(60),
        "{:?}",
        pushed.elapsed()
    );
    assert!(
        fixture.logs().contains("watching the remote's refs"),
        "{}",
        fixture.logs()
    );
}

#[test]
fn an_environment_not_on_the_trust_branch_is_checked_and_never_planned() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));
    fixture.clone.git(&["checkout", "-q", "-b", "feature"]);
    fixture.clone.write(
        "environments/qa/karrots.yaml",
        &environment_yaml("qa", "qa", "modules/prod-app", ""),
    );
    let feature = fixture.clone.commit_all("a new environment, qa");
    fixture.push("feature");
    fixture.wait_for("qa checked", |f| !f.runs("qa").is_empty());
    let runs = fixture.runs("qa");
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["commit"], feature.as_str());
    assert_eq!(runs[0]["kind"], "preview");
    assert_eq!(runs[0]["result"], "refused");
    assert_eq!(
        runs[0]["message"],
        "passes karrots check; not planned: the environment is not on the trust branch main: merge its karrots.yaml there first"
    );
    let plans = fixture.state_dir().join("environments/qa/preview/plans");
    assert!(!plans.exists() || std::fs::read_dir(&plans).unwrap().count() == 0);

    // A broken one is a config_error naming the line.
    fixture
        .clone
        .append("environments/qa/karrots.yaml", "nme: qa\n");
    let broken = fixture.clone.commit_all("typo in qa");
    fixture.push("feature");
    fixture.wait_for("config_error for qa", |f| {
        f.sink.find("qa", "config_error").is_some()
    });
    let error = fixture.sink.find("qa", "config_error").unwrap();
    assert_eq!(error["commit"], broken.as_str());
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("environments/qa/karrots.yaml:10: nme: unknown key"),
        "{error}"
    );
}

#[test]
fn a_failed_apply_is_alerted_and_the_next_commit_replans() {
    // A resource whose provisioner failed is tainted, and tainted means replaced: prod allows it.
    let fixture = Fixture::new("allow: [local-exec]\napply:\n  allow_destroy: true\n");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    // An apply that fails part-way: one resource is created, the next one's provisioner fails.
    fixture.clone.append(
        "modules/prod-app/main.tf",
        "\nresource \"terraform_data\" \"ok\" {}\n\nresource \"terraform_data\" \"broken\" {\n  depends_on = [terraform_data.ok]\n  provisioner \"local-exec\" {\n    command = \"echo the provisioner failed >&2; exit 1\"\n  }\n}\n",
    );
    let broken = fixture.clone.commit_all("an apply that fails");
    fixture.push("main");
    fixture.wait_for("apply_failed", |f| {
        f.sink.find("prod", "apply_failed").is_some()
    });
    let alert = fixture.sink.find("prod", "apply_failed").unwrap();
    assert_eq!(alert["commit"], broken.as_str());
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("the provisioner failed"),
        "{alert}"
    );
    assert!(
        alert["message"].as_str().unwrap().len() < 6 * 1024,
        "bounded output"
    );
    assert_eq!(fixture.environment("prod")["status"], "failed");
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());

    // The next commit re-plans from the state the failed apply left.
    fixture.clone.replace(
        "modules/prod-app/main.tf",
        "echo the provisioner failed >&2; exit 1",
        "true",
    );
    let fixed = fixture.clone.commit_all("fix the provisioner");
    fixture.push("main");
    fixture.wait_for("prod applied at the fix", |f| f.applied("prod", &fixed));
    let plan = fixture
        .runs("prod")
        .into_iter()
        .find(|run| run["commit"] == fixed.as_str() && run["kind"] == "plan")
        .unwrap();
    let changes: Vec<(String, String)> = plan["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["actions"].to_string(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        vec![(
            "terraform_data.broken".to_string(),
            "[\"delete\",\"create\"]".to_string()
        )],
        "only the tainted resource is replaced; terraform_data.ok survived the failed apply"
    );
    assert_eq!(fixture.environment("prod")["status"], "in_sync");
}
