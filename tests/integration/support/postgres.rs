//! A throwaway PostgreSQL server: `initdb` and `pg_ctl` from the machine's PostgreSQL, in a
//! temp dir, on a free loopback port, trusting local connections. As root (CI), the server
//! runs as the `postgres` user, which PostgreSQL requires.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::free_port;

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    /// Server settings besides the port and socket (`-c name=value …`).
    settings: String,
}

/// Where `initdb` and `pg_ctl` are: Debian keeps them out of PATH, under
/// `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return newest;
    }
    match super::tool_path("initdb").as_deref().and_then(Path::parent) {
        Some(dir) => dir.to_path_buf(),
        None => panic!(
            "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): apt-get install postgresql"
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// A server that also speaks TLS, with a certificate for 127.0.0.1 signed by a throwaway
    /// CA ([`Postgres::ca_file`]); plain connections are still accepted.
    pub fn start_tls() -> Postgres {
        Postgres::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("karrots-pg-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut settings = String::new();
        if tls {
            let certificates = dir.path().join("tls");
            std::fs::create_dir(&certificates).unwrap();
            super::hosts::server_certificate(&certificates);
            use std::os::unix::fs::PermissionsExt;
            let key = certificates.join("server.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            settings = format!(
                "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                certificates.join("server.pem").display(),
                key.display()
            );
        }
        let postgres = Postgres {
            dir,
            port,
            bin,
            settings,
        };
        if is_root() {
            let chowned = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(postgres.dir.path())
                .status()
                .unwrap();
            assert!(chowned.success());
        }
        let data = postgres.data();
        let data = data.to_str().unwrap();
        postgres.run(
            "initdb",
            &[
                "-D",
                data,
                "-U",
                "karrots",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        postgres.pg_ctl(&["start"]);
        postgres
    }

    /// The CA that signed a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://karrots@127.0.0.1:PORT/postgres?sslmode=disable`.
    pub fn url(&self) -> String {
        format!(
            "postgres://karrots@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// `program` of PostgreSQL's, run as the `postgres` user when this is root.
    fn command(&self, program: &str) -> Command {
        let binary = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&binary);
            command
        } else {
            Command::new(&binary)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn pg_ctl(&self, action: &[&str]) {
        let data = self.data();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 {}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        let log = self.dir.path().join("server.log");
        let mut args = vec![
            "-D",
            data.to_str().unwrap(),
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-t",
            "60",
        ];
        args.extend_from_slice(action);
        self.run("pg_ctl", &args);
    }

    /// Stops the server at once (connections cut, as a crash would).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start"]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}
