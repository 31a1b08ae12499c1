//! Real git hosts on loopback for the tests: OpenSSH's `sshd` serving a bare repository to a
//! deploy key, and lighttpd running `git http-backend` over TLS (a CA made here) behind
//! basic auth. Each lives in its own temp dir and stops on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, require_tool};

/// Runs `program args` and returns its stdout; panics with its stderr when it fails.
fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Writes into `at` a throwaway CA (`ca.pem`, `ca.key`) and a certificate it signed for
/// `127.0.0.1` (`server.pem`, `server.key`), valid two days.
pub fn server_certificate(at: &Path) {
    require_tool("openssl", "apt-get install openssl");
    let openssl = |args: &[&str]| run("openssl", args, at);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let request = |rest: &[&str]| openssl(&[&["req"][..], &ec, rest].concat());
    request(&[
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=karrots test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    request(&[
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(at.join("san"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san",
        "-out",
        "server.pem",
    ]);
}

/// Waits until something accepts connections on `port`.
fn wait_for_port(port: u16, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        let exited = child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "{what} did not listen on {port} ({exited:?}): {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `sshd -D` on a loopback port: its host key, and a deploy key it accepts for this user.
pub struct SshServer {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl SshServer {
    pub fn start() -> SshServer {
        require_tool("/usr/sbin/sshd", "apt-get install openssh-server");
        require_tool("ssh-keygen", "apt-get install openssh-client");
        let dir = tempfile::Builder::new()
            .prefix("karrots-sshd-")
            .tempdir()
            .unwrap();
        let at = dir.path();
        for key in ["host_key", "deploy_key", "other_key"] {
            run(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-C", key, "-f", key],
                at,
            );
        }
        std::fs::copy(at.join("deploy_key.pub"), at.join("authorized_keys")).unwrap();
        // sshd's privilege separation needs this directory (systemd makes it at boot).
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {dir}/sshd.pid\nPermitRootLogin prohibit-password\n",
            dir = at.display()
        );
        std::fs::write(at.join("sshd_config"), config).unwrap();
        let log = at.join("sshd.log");
        let mut child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(at.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sshd");
        wait_for_port(port, "sshd", &mut child, &log);
        SshServer { dir, child, port }
    }

    /// The address of `repo` (a bare repository on this machine) through this server.
    pub fn url(&self, repo: &Path) -> String {
        let user = run("id", &["-un"], self.dir.path()).trim().to_string();
        format!("ssh://{user}@127.0.0.1:{}{}", self.port, repo.display())
    }

    pub fn deploy_key(&self) -> PathBuf {
        self.dir.path().join("deploy_key")
    }

    /// A `known_hosts` line for this server with the public key `key` (`host_key` is its own).
    pub fn known_hosts_line(&self, key: &str) -> String {
        let public = std::fs::read_to_string(self.dir.path().join(format!("{key}.pub"))).unwrap();
        let mut words = public.split_whitespace();
        let (kind, base64) = (words.next().unwrap(), words.next().unwrap());
        format!("[127.0.0.1]:{} {kind} {base64}\n", self.port)
    }

    /// The SHA256 fingerprint of the server's host key, as ssh prints it.
    pub fn host_key_fingerprint(&self) -> String {
        let listed = run("ssh-keygen", &["-l", "-f", "host_key.pub"], self.dir.path());
        listed.split_whitespace().nth(1).unwrap().to_string()
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// lighttpd with TLS (a certificate for 127.0.0.1 signed by a CA made here) running
/// `git http-backend` for the bare repositories of one folder, behind basic auth.
pub struct HttpsServer {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl HttpsServer {
    /// Serves `repo` (a bare repository) to user `karrots` with password `token`.
    pub fn start(repo: &Path, token: &str) -> HttpsServer {
        HttpsServer::start_for(repo, "karrots", token)
    }

    /// Serves `repo` to `user` with password `token`.
    pub fn start_for(repo: &Path, user: &str, token: &str) -> HttpsServer {
        require_tool(
            "/usr/sbin/lighttpd",
            "apt-get install lighttpd lighttpd-mod-openssl",
        );
        let backend = "/usr/lib/git-core/git-http-backend";
        assert!(
            Path::new(backend).exists(),
            "{backend} is missing: apt-get install git"
        );
        let dir = tempfile::Builder::new()
            .prefix("karrots-https-")
            .tempdir()
            .unwrap();
        let at = dir.path();
        server_certificate(at);
        let pem = [
            std::fs::read_to_string(at.join("server.pem")).unwrap(),
            std::fs::read_to_string(at.join("server.key")).unwrap(),
        ]
        .concat();
        std::fs::write(at.join("server-bundle.pem"), pem).unwrap();
        std::fs::write(at.join("htpasswd"), format!("{user}:{token}\n")).unwrap();
        let root = repo.parent().unwrap();
        let port = free_port();
        let config = format!(
            r#"server.document-root = "{root}"
server.port = {port}
server.bind = "127.0.0.1"
server.errorlog = "{dir}/error.log"
server.modules = ("mod_openssl", "mod_auth", "mod_authn_file", "mod_cgi", "mod_setenv", "mod_alias")
ssl.engine = "enable"
ssl.pemfile = "{dir}/server-bundle.pem"
auth.backend = "plain"
auth.backend.plain.userfile = "{dir}/htpasswd"
auth.require = ("/" => ("method" => "basic", "realm" => "git", "require" => "valid-user"))
alias.url = ("/git/" => "{backend}/")
cgi.assign = ("" => "")
setenv.set-environment = ("GIT_PROJECT_ROOT" => "{root}", "GIT_HTTP_EXPORT_ALL" => "1")
"#,
            root = root.display(),
            dir = at.display(),
        );
        std::fs::write(at.join("lighttpd.conf"), config).unwrap();
        let log = at.join("error.log");
        let mut child = Command::new("/usr/sbin/lighttpd")
            .args(["-D", "-f"])
            .arg(at.join("lighttpd.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start lighttpd");
        wait_for_port(port, "lighttpd", &mut child, &log);
        HttpsServer { dir, child, port }
    }

    /// The address of `repo` through this server.
    pub fn url(&self, repo: &Path) -> String {
        let name = repo.file_name().unwrap().to_str().unwrap();
        format!("https://127.0.0.1:{}/git/{name}", self.port)
    }

    /// The CA that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
