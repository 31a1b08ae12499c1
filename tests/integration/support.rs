//! Test support: config repositories built in temp dirs, and the real `karrots` binary.

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
    let output: Output = Command::new(karrots_binary())
        .args(args)
        .env_remove("KARROTS_LOG")
        .output()
        .expect("run the karrots binary");
    Run {
        code: output.status.code().expect("karrots exited by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
