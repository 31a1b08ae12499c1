//! Several `karrots serve` processes on one PostgreSQL store, one remote, one moto with an
//! S3 bucket and a DynamoDB lock table for the environments' state, one alert sink. Each
//! daemon has its own state dir and port; terraform is a wrapper that records each apply
//! (with the daemon's state dir in its working directory) before running the real one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::daemon::{AlertSink, http};
use super::postgres::Postgres;
use super::{
    ConfigRepo, Moto, PLUGIN_MIRROR, free_port, karrots_binary, require_terraform_and_moto,
};

pub const BUCKET: &str = "karrots-state";
pub const LOCKS: &str = "karrots-locks";

pub struct Daemon {
    pub child: Option<Child>,
    /// Its `store:` URL: the server's, or a proxy's in front of it.
    pub store: String,
    pub address: String,
    pub state: PathBuf,
    pub log: PathBuf,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub clone: ConfigRepo,
    pub remote: PathBuf,
    pub moto: Moto,
    pub postgres: Postgres,
    pub sink: AlertSink,
    pub daemons: Vec<Daemon>,
    /// The wrapper's record: one line per `terraform apply`, `<working dir>`.
    pub applies: PathBuf,
    pub lease: &'static str,
    /// `poll_interval` of the daemons started next.
    pub poll: &'static str,
    /// Whether the daemons watch the remote's refs (off: only polls and hooks fetch).
    pub watch: bool,
}

/// The daemons' webhook secret.
pub const HOOK_SECRET: &str = "hook-secret";

/// An environment whose state is in the bucket, locked by the table.
pub fn s3_environment(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: karrots/v1\nname: {name}\nbranch: main\naws:\n  account_id: \"123456789012\"\n  region: us-east-1\nterraform:\n  root: modules/app\n  backend: {{ s3: {{ bucket: {BUCKET}, key: {name}.tfstate, region: us-east-1, dynamodb_table: {LOCKS} }} }}\n{extra}"
    )
}

impl Cluster {
    /// A config repository with `module` and no environment yet, and no daemon started.
    pub fn new(module: &str) -> Cluster {
        require_terraform_and_moto();
        let dir = tempfile::Builder::new()
            .prefix("karrots-cluster-")
            .tempdir()
            .unwrap();
        let postgres = Postgres::start();
        let moto = Moto::start();
        moto.aws(&["s3api", "create-bucket", "--bucket", BUCKET]);
        moto.aws(&[
            "dynamodb",
            "create-table",
            "--table-name",
            LOCKS,
            "--attribute-definitions",
            "AttributeName=LockID,AttributeType=S",
            "--key-schema",
            "AttributeName=LockID,KeyType=HASH",
            "--billing-mode",
            "PAY_PER_REQUEST",
        ]);
        let remote = dir.path().join("remote.git");
        let made = Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(&remote)
            .status()
            .unwrap();
        assert!(made.success());
        let clone = ConfigRepo::empty();
        clone.write("modules/app/main.tf", module);
        clone.init_git();
        clone.git(&["remote", "add", "origin", remote.to_str().unwrap()]);
        clone.git(&["push", "-q", "origin", "main"]);
        let applies = dir.path().join("applies.log");
        let wrapper = dir.path().join("terraform");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\ncase \" $* \" in *\" apply \"*) echo \"$PWD\" >> {} ;; esac\nexec terraform \"$@\"\n",
                applies.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        Cluster {
            dir,
            clone,
            remote,
            moto,
            postgres,
            sink: AlertSink::start(),
            daemons: Vec::new(),
            applies,
            lease: "6s",
            poll: "1s",
            watch: true,
        }
    }

    /// Merges `count` environments `e00`, `e01`… (`extra` appended to each karrots.yaml);
    /// returns the commit.
    pub fn add_environments(&self, count: usize, extra: &str) -> String {
        for n in 0..count {
            let name = format!("e{n:02}");
            self.clone.write(
                &format!("environments/{name}/karrots.yaml"),
                &s3_environment(&name, extra),
            );
        }
        let commit = self.clone.commit_all(&format!("{count} environments"));
        self.clone.git(&["push", "-q", "origin", "main"]);
        commit
    }

    /// Daemons alive in the database (each registers at its first lease round).
    pub fn registered(&self) -> i64 {
        let Ok(mut client) = postgres::Client::connect(&self.postgres.url(), postgres::NoTls)
        else {
            return 0;
        };
        client
            .query_one("SELECT count(*) FROM daemons", &[])
            .map(|row| row.get(0))
            .unwrap_or(0)
    }

    /// Starts `count` daemons and waits until each has registered in the database.
    pub fn start_registered(&mut self, count: usize) {
        for _ in 0..count {
            self.start();
        }
        let count = i64::try_from(count).unwrap();
        self.wait_for("the daemons registered", Duration::from_secs(30), |c| {
            c.registered() == count
        });
    }

    /// Changes the module's label from `v1` to `v2` and pushes it; returns the commit.
    pub fn push_label_change(&self) -> String {
        self.push_label("v1", "v2")
    }

    /// Changes the module's label from `from` to `to` and pushes it; returns the commit.
    pub fn push_label(&self, from: &str, to: &str) -> String {
        self.clone.replace(
            "modules/app/main.tf",
            &format!("default = \"{from}\""),
            &format!("default = \"{to}\""),
        );
        let commit = self.clone.commit_all(to);
        self.clone.git(&["push", "-q", "origin", "main"]);
        commit
    }

    /// Starts one more daemon and waits until it answers.
    pub fn start(&mut self) -> usize {
        let store = self.postgres.url();
        self.start_with_store(store)
    }

    /// Starts one more daemon reaching the database at `store`, and waits until it answers.
    pub fn start_with_store(&mut self, store: String) -> usize {
        let index = self.daemons.len();
        let state = self.dir.path().join(format!("daemon-{index}"));
        std::fs::create_dir_all(&state).unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let log = state.join("daemon.log");
        let mut daemon = Daemon {
            child: None,
            store,
            address,
            state,
            log,
        };
        self.spawn(&mut daemon);
        self.daemons.push(daemon);
        index
    }

    fn spawn(&self, daemon: &mut Daemon) {
        let secret = self.dir.path().join("hook-secret");
        std::fs::write(&secret, HOOK_SECRET).unwrap();
        let config = format!(
            "repo: {}\npoll_interval: {}\nwebhook_secret_file: {}\nstate_dir: {}\nlisten: {}\nconcurrency: 2\nsandbox: off\nstore: {}\nlease: {}\nterraform:\n  binary: {}\n  plugin_mirror: {PLUGIN_MIRROR}\n  timeout: 5m\naws:\n  endpoint_url: {}\nalerts:\n  - webhook: {}\n",
            self.remote.display(),
            self.poll,
            secret.display(),
            daemon.state.join("state").display(),
            daemon.address,
            daemon.store,
            self.lease,
            self.dir.path().join("terraform").display(),
            self.moto.url,
            self.sink.url,
        );
        let config_path = daemon.state.join("serve.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&daemon.log)
            .unwrap();
        let mut command = Command::new(karrots_binary());
        if !self.watch {
            command.env("KARROTS_NO_WATCH", "1");
        }
        let child = command
            .args(["serve", "--config", config_path.to_str().unwrap()])
            .env_remove("AWS_ENDPOINT_URL")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("KARROTS_LOG", "info,karrots=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start karrots serve");
        daemon.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers(daemon) {
            assert!(
                Instant::now() < deadline,
                "daemon {} did not answer:\n{}",
                daemon.address,
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answers(&self, daemon: &Daemon) -> bool {
        std::net::TcpStream::connect(&daemon.address).is_ok()
    }

    /// Sends `signal` to daemon `index` (`-KILL`, `-STOP`, `-CONT`, `-TERM`).
    pub fn signal(&mut self, index: usize, signal: &str) {
        let child = self.daemons[index].child.as_ref().expect("running");
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        if matches!(signal, "-KILL" | "-TERM") {
            let mut child = self.daemons[index].child.take().unwrap();
            let _ = child.wait();
        }
    }

    /// A signed GitHub push hook to daemon `index`; the status it answers.
    pub fn hook(&self, index: usize) -> u16 {
        use hmac::{KeyInit, Mac};
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
        mac.update(body);
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let headers = [
            ("x-hub-signature-256", signature.as_str()),
            ("x-github-event", "push"),
            ("content-type", "application/json"),
        ];
        http(
            &self.daemons[index].address,
            "POST",
            "/hooks/github",
            &headers,
            body,
        )
        .0
    }

    pub fn get(&self, index: usize, path: &str) -> Value {
        let address = &self.daemons[index].address;
        if std::net::TcpStream::connect(address).is_err() {
            panic!("daemon {index} does not answer:\n{}", self.logs(index));
        }
        let (status, body) = http(address, "GET", path, &[], b"");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn environments(&self, index: usize) -> Vec<Value> {
        self.get(index, "/api/v1/environments")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The applies the wrapper saw, by environment and by daemon (state dir).
    pub fn applies(&self) -> Vec<(String, usize)> {
        let text = std::fs::read_to_string(&self.applies).unwrap_or_default();
        text.lines()
            .filter_map(|dir| {
                let env = dir.split("/environments/").nth(1)?.split('/').next()?;
                let daemon = self
                    .daemons
                    .iter()
                    .position(|daemon| Path::new(dir).starts_with(&daemon.state))?;
                Some((env.to_string(), daemon))
            })
            .collect()
    }

    pub fn logs(&self, index: usize) -> String {
        std::fs::read_to_string(&self.daemons[index].log).unwrap_or_default()
    }

    /// Waits (up to `within`) until `done` holds, showing each daemon's log tail if never.
    pub fn wait_for(&self, what: &str, within: Duration, done: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            if Instant::now() > deadline {
                let tails: Vec<String> = (0..self.daemons.len())
                    .map(|index| {
                        let logs = self.logs(index);
                        let lines: Vec<&str> = logs.lines().collect();
                        format!(
                            "daemon {index}:\n{}",
                            lines[lines.len().saturating_sub(400)..].join("\n")
                        )
                    })
                    .collect();
                panic!("timed out waiting for {what}\n{}", tails.join("\n\n"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The daemon that holds `env`'s lease, from the database.
    pub fn owner(&self, env: &str) -> Option<String> {
        let mut client = postgres::Client::connect(&self.postgres.url(), postgres::NoTls).ok()?;
        let row = client
            .query_opt("SELECT owner FROM leases WHERE env = $1", &[&env])
            .ok()??;
        row.get(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            if let Some(mut child) = daemon.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
