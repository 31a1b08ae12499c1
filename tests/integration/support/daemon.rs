//! The daemon harness: a bare remote a working clone pushes to, `karrots serve` (the real
//! binary) watching it on a port it chose itself, moto for STS, and a local HTTP sink that
//! collects the alerts. [`Fixture::build`] sets it up; the tests drive it through git, the
//! API and signals.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    ConfigRepo, Moto, PLUGIN_MIRROR, environment_yaml, karrots_binary, require_terraform_and_moto,
    require_tool,
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
    /// `repo:` of the daemon config, when not the remote's path (a git host's address).
    pub repo_url: Option<String>,
}

/// The line the daemon logs once it listens, with the address in its `listen` field.
const UP: &str = "karrots serve is up";

/// How a [`Fixture`] is set up: prod's extra configuration and root module, the poll
/// interval, a CloudTrail stand-in.
pub struct FixtureBuilder {
    prod_extra: String,
    poll_interval: &'static str,
    prod_module: String,
    cloudtrail_url: Option<String>,
}

impl FixtureBuilder {
    /// Appended to prod's karrots.yaml.
    pub fn prod_extra(mut self, extra: &str) -> FixtureBuilder {
        self.prod_extra = extra.to_string();
        self
    }

    pub fn poll(mut self, interval: &'static str) -> FixtureBuilder {
        self.poll_interval = interval;
        self
    }

    /// prod's root module (`modules/prod-app/main.tf`).
    pub fn prod_module(mut self, module: &str) -> FixtureBuilder {
        self.prod_module = module.to_string();
        self
    }

    /// Where the daemon asks CloudTrail (`aws.cloudtrail_endpoint_url`).
    pub fn cloudtrail(mut self, url: Option<String>) -> FixtureBuilder {
        self.cloudtrail_url = url;
        self
    }

    /// The remote, the clone and the daemon's configuration, with the daemon not started,
    /// so a test can change how it starts.
    pub fn unstarted(self) -> Fixture {
        Fixture::set_up(self)
    }

    pub fn start(self) -> Fixture {
        let mut fixture = Fixture::set_up(self);
        fixture.start();
        fixture
    }
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
        Fixture::build()
            .prod_extra(prod_extra)
            .poll(poll_interval)
            .start()
    }

    /// The harness as [`Fixture::new`] sets it up, to change before it starts.
    pub fn build() -> FixtureBuilder {
        FixtureBuilder {
            prod_extra: String::new(),
            poll_interval: "1s",
            prod_module: APP.to_string(),
            cloudtrail_url: None,
        }
    }

    fn set_up(builder: FixtureBuilder) -> Fixture {
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
            &environment_yaml("prod", "main", "modules/prod-app", &builder.prod_extra),
        );
        clone.write(
            "environments/dev/karrots.yaml",
            &environment_yaml("dev", "dev", "modules/dev-app", ""),
        );
        clone.write("modules/prod-app/main.tf", &builder.prod_module);
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
        let log = state.path().join("daemon.log");
        Fixture {
            clone,
            remote,
            state,
            moto,
            sink,
            daemon: None,
            listen: "127.0.0.1:0".into(),
            address: String::new(),
            log,
            secret_file,
            poll_interval: builder.poll_interval,
            cloudtrail_url: builder.cloudtrail_url,
            credentials: true,
            extra_config: String::new(),
            serve_args: Vec::new(),
            env: Vec::new(),
            api_token: None,
            open_files: None,
            concurrency: 2,
            repo_url: None,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.state.path().join("karrots-serve.yaml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    /// Starts the daemon and waits until it says where it listens (`listen: …:0` lets it
    /// choose the port); `address` is then where the tests connect.
    pub fn start(&mut self) {
        let started = self.starts();
        let child = self.spawn();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(address) = self.listening(started) {
                self.address = address;
                return;
            }
            let exited = self
                .daemon
                .as_mut()
                .and_then(|child| child.try_wait().ok()?);
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the daemon did not listen ({exited:?}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many times the daemon said it was up, in this fixture's log.
    fn starts(&self) -> usize {
        self.logs().lines().filter(|line| line.contains(UP)).count()
    }

    /// Where the daemon's start number `start` (from 0) listens, once it said so: a loopback
    /// address for a daemon listening on every address.
    fn listening(&self, start: usize) -> Option<String> {
        let logs = self.logs();
        let line = logs.lines().filter(|line| line.contains(UP)).nth(start)?;
        let listen = match serde_json::from_str::<Value>(line) {
            Ok(json) => json["listen"].as_str()?.to_string(),
            Err(_) => line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("listen="))?
                .to_string(),
        };
        let address: std::net::SocketAddr = listen.parse().ok()?;
        Some(if address.ip().is_unspecified() {
            format!("127.0.0.1:{}", address.port())
        } else {
            address.to_string()
        })
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
            self.repo_url
                .clone()
                .unwrap_or_else(|| self.remote.path().display().to_string()),
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

    /// The polls of the config repository the daemon has made (its debug log says each).
    pub fn polls(&self) -> usize {
        self.logs().matches("polled the config repository").count()
    }

    /// Waits until the daemon has polled `count` more times: whatever those polls would
    /// have started has started.
    pub fn wait_for_polls(&self, count: usize) {
        let target = self.polls() + count;
        self.wait_for(&format!("{count} more polls"), |f| f.polls() >= target);
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

/// A resource whose creation takes `seconds`: an apply long enough to interrupt.
pub fn slow_resource(name: &str, seconds: u32) -> String {
    format!(
        "\nresource \"terraform_data\" \"{name}\" {{\n  provisioner \"local-exec\" {{\n    command = \"sleep {seconds}\"\n  }}\n}}\n"
    )
}
