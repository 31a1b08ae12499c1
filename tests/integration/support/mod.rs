//! Test support: config repositories built in temp dirs, and the real `karrots` binary.

pub mod cluster;
pub mod daemon;
pub mod forge;
pub mod hosts;
pub mod postgres;
pub mod proxy;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A config repository working tree in its own temp dir, removed on drop.
pub struct ConfigRepo {
    dir: tempfile::TempDir,
}

impl ConfigRepo {
    pub fn empty() -> ConfigRepo {
        ConfigRepo {
            dir: tempfile::Builder::new()
                .prefix("karrots-repo-")
                .tempdir()
                .expect("create a temp dir"),
        }
    }

    /// A valid repository: `dev` (branch dev) and `prod` (branch main). dev's root module
    /// reaches `shared`; prod's reaches `shared` and `extra`; `unused` is reached by neither.
    pub fn valid() -> ConfigRepo {
        let repo = ConfigRepo::empty();
        repo.write(
            "environments/dev/karrots.yaml",
            &environment_yaml("dev", "dev", "modules/app-dev", ""),
        );
        repo.write(
            "environments/prod/karrots.yaml",
            &environment_yaml("prod", "main", "modules/app-prod", ""),
        );
        repo.write(
            "modules/app-dev/main.tf",
            "module \"shared\" {\n  source = \"../shared\"\n}\n",
        );
        repo.write(
            "modules/app-prod/main.tf",
            "module \"shared\" {\n  source = \"../shared\"\n}\n\nmodule \"extra\" {\n  source = \"../extra\"\n}\n",
        );
        repo.write(
            "modules/shared/main.tf",
            "resource \"terraform_data\" \"shared\" {\n  input = \"shared\"\n}\n",
        );
        repo.write(
            "modules/extra/main.tf",
            "resource \"terraform_data\" \"extra\" {}\n",
        );
        repo.write(
            "modules/unused/main.tf",
            "resource \"terraform_data\" \"unused\" {}\n",
        );
        repo.write(
            "policies/karrots-worker-ec2.json",
            "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Effect\": \"Allow\", \"Action\": \"ec2:Describe*\", \"Resource\": \"*\"}\n  ]\n}\n",
        );
        repo.write("README.md", "# config\n");
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, relative: &str, contents: &str) {
        let path = self.path().join(relative);
        fs::create_dir_all(path.parent().expect("a parent")).expect("create dirs");
        fs::write(&path, contents).expect("write a fixture file");
    }

    pub fn append(&self, relative: &str, contents: &str) {
        let path = self.path().join(relative);
        let mut text = fs::read_to_string(&path).expect("read a fixture file");
        text.push_str(contents);
        fs::write(&path, text).expect("write a fixture file");
    }

    pub fn replace(&self, relative: &str, from: &str, to: &str) {
        let path = self.path().join(relative);
        let text = fs::read_to_string(&path).expect("read a fixture file");
        assert!(text.contains(from), "{relative} does not contain {from:?}");
        fs::write(&path, text.replacen(from, to, 1)).expect("write a fixture file");
    }

    pub fn symlink(&self, relative: &str, target: impl AsRef<Path>) {
        let path = self.path().join(relative);
        fs::create_dir_all(path.parent().expect("a parent")).expect("create dirs");
        std::os::unix::fs::symlink(target, &path).expect("create a symlink");
    }

    pub fn check(&self) -> Run {
        karrots(&["check", "--repo", &self.path().display().to_string()])
    }
}

/// A `karrots.yaml` with the given identity; `extra` is appended verbatim.
pub fn environment_yaml(name: &str, branch: &str, root: &str, extra: &str) -> String {
    format!(
        "apiVersion: karrots/v1\nname: {name}\nbranch: {branch}\naws:\n  account_id: \"123456789012\"\n  region: us-east-1\nterraform:\n  root: {root}\n  backend: {{ local: {{}} }}\n{extra}"
    )
}

/// The outcome of one run of the real binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }
}

pub fn karrots_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_karrots"))
}

pub fn karrots(args: &[&str]) -> Run {
    karrots_with_env(args, &[])
}

impl ConfigRepo {
    /// Runs git in the repository, with a fixed identity; panics on failure.
    pub fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .arg("-C")
            .arg(self.path())
            .args([
                "-c",
                "user.name=Karrots Test",
                "-c",
                "user.email=test@karrots.invalid",
            ])
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("git is not installed ({error}): apt-get install git"));
        assert!(
            output.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Makes the tree a git repository on branch `main` and commits everything.
    pub fn init_git(&self) -> String {
        self.git(&["init", "-q", "-b", "main"]);
        self.commit_all("initial configuration")
    }

    /// Commits every change; returns the new commit's full sha.
    pub fn commit_all(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }
}

/// A loopback port nothing listens on (at the moment of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free port")
        .port()
}

/// A `moto_server` on a free loopback port, stopped on drop.
pub struct Moto {
    child: std::process::Child,
    pub url: String,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_as("123456789012")
    }

    /// Starts moto answering as `account` (MOTO_ACCOUNT_ID).
    pub fn start_as(account: &str) -> Moto {
        Moto::start_with(account, &[])
    }

    /// Starts moto answering as `account`, with extra moto settings in its environment.
    pub fn start_with(account: &str, settings: &[(&str, &str)]) -> Moto {
        Moto::start_on(free_port(), account, settings)
    }

    /// Starts moto on `port`, for a test that points the daemon there before it answers.
    pub fn start_on(port: u16, account: &str, settings: &[(&str, &str)]) -> Moto {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_ACCOUNT_ID", account)
            .envs(settings.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("moto_server could not start ({error}): pip install 'moto[server]==5.2.*'")
            });
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not listen on {port} within 30s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        moto
    }

    /// Runs the aws CLI against this moto; returns stdout.
    pub fn aws(&self, args: &[&str]) -> String {
        let output = Command::new("aws")
            .args([
                "--endpoint-url",
                &self.url,
                "--region",
                "us-east-1",
                "--output",
                "json",
            ])
            .args(args)
            .envs(test_credentials())
            .output()
            .unwrap_or_else(|error| {
                panic!("the aws CLI is not installed ({error}): pip install awscli")
            });
        assert!(
            output.status.success(),
            "aws {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Credentials moto accepts; the standard chain finds them in the environment.
pub fn test_credentials() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]
}

/// Runs the real binary with extra environment variables.
pub fn karrots_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let output: Output = Command::new(karrots_binary())
        .args(args)
        .env_remove("KARROTS_LOG")
        .env_remove("AWS_ENDPOINT_URL")
        .envs(env.iter().copied())
        .output()
        .expect("run the karrots binary");
    Run {
        code: output.status.code().expect("karrots exited by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Fails the test setup, with how to install it, when a tool the test needs is missing.
pub fn require_tool(name: &str, install: &str) {
    assert!(
        tool_path(name).is_some(),
        "{name} is not installed: {install}"
    );
}

/// Where `name` is on PATH, if it is.
pub fn tool_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| file.is_file())
}

/// The provider mirror every terraform run of the tests installs from.
pub const PLUGIN_MIRROR: &str = "/opt/tf-plugins";

/// Fails the setup unless terraform, moto, the aws CLI and the provider mirror are present.
pub fn require_terraform_and_moto() {
    require_tool("terraform", "install Terraform 1.11 into /usr/local/bin");
    require_tool("moto_server", "pip install 'moto[server]>=5.2,<5.3'");
    require_tool("aws", "pip install awscli");
    assert!(
        Path::new(PLUGIN_MIRROR)
            .join("registry.terraform.io/hashicorp/aws")
            .is_dir(),
        "the AWS provider mirror is missing at {PLUGIN_MIRROR}"
    );
}

/// Runs `karrots plan` of `env` against moto with the test credentials.
pub fn plan_env(
    repo: &ConfigRepo,
    env: &str,
    moto: &Moto,
    state_dir: &Path,
    extra: &[&str],
) -> Run {
    let repo_path = repo.path().display().to_string();
    let state = state_dir.display().to_string();
    let mut args = vec![
        "plan",
        "--repo",
        &repo_path,
        "--env",
        env,
        "--plugin-mirror",
        PLUGIN_MIRROR,
        "--aws-endpoint-url",
        &moto.url,
        "--state-dir",
        &state,
    ];
    args.extend_from_slice(extra);
    karrots_with_env(&args, &test_credentials())
}

/// The newest record `karrots plan` left for `commit` of `env` in the merged lane.
pub fn plan_record(state_dir: &Path, env: &str, commit: &str) -> karrots::terraform::PlanRecord {
    let plans = state_dir
        .join("environments")
        .join(env)
        .join("merged/plans");
    let mut records: Vec<(std::time::SystemTime, karrots::terraform::PlanRecord)> =
        fs::read_dir(&plans)
            .unwrap_or_else(|e| panic!("{}: {e}", plans.display()))
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let text = fs::read_to_string(entry.path().join("meta.json")).ok()?;
                let record: karrots::terraform::PlanRecord = serde_json::from_str(&text).ok()?;
                let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
                (record.commit == commit).then_some((modified, record))
            })
            .collect();
    records.sort_by_key(|(modified, _)| *modified);
    records
        .pop()
        .unwrap_or_else(|| panic!("no plan of {commit} under {}", plans.display()))
        .1
}

/// Applies a saved plan with the library operation the daemon uses, as moto's test user.
pub async fn apply_saved_plan(
    state_dir: &Path,
    record: &karrots::terraform::PlanRecord,
    moto: &Moto,
) -> Result<(), karrots::terraform::TerraformError> {
    let settings = karrots::config::TerraformSettings {
        plugin_mirror: Some(PathBuf::from(PLUGIN_MIRROR)),
        ..karrots::config::TerraformSettings::default()
    };
    let terraform = karrots::terraform::Terraform::new(
        &settings,
        state_dir,
        karrots::config::SandboxMode::Landlock,
    )
    .expect("set up terraform");
    let env = karrots::config::EnvName::parse(&record.env).expect("a valid environment name");
    let mut variables: std::collections::BTreeMap<String, String> = test_credentials()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    variables.insert("AWS_REGION".into(), "us-east-1".into());
    variables.insert("AWS_ENDPOINT_URL".into(), moto.url.clone());
    let run_env = karrots::terraform::RunEnvironment { variables };
    terraform
        .apply(
            &terraform.workdir(&env, record.lane),
            record,
            &run_env,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .map(|_| ())
}

/// Waits until `done` holds, checking every 50 ms, and fails naming `what` after `within`.
pub fn eventually(what: &str, within: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
