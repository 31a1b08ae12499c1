//! Which approval tags count for one saved plan. An approval is an annotated tag
//! `karrots/approve/<env>/<commit>[/<any name>]` pointing at the commit, signed with
//! `git tag -s` in SSH format, whose message holds `plan: sha256:<hex>`: the hash of the plan
//! file the approver saw. It counts when it names this environment, this commit and this
//! plan, its signature is an approver's ([`crate::signature`]), a security key's with the
//! user present when `hardware_key` asks for one, and its approver authored none of the
//! commits being applied when `four_eyes` asks for that. Distinct approvers are counted.

use crate::signature::{Signer, verify};

/// `apply.approval` of an environment, as the trust branch has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalPolicy {
    /// Distinct approvers needed.
    pub required: usize,
    /// Only security keys (FIDO), with the user present.
    pub hardware_key: bool,
    /// An approver who authored or committed a commit being applied does not count.
    pub four_eyes: bool,
    pub approvers: Vec<Signer>,
}

impl ApprovalPolicy {
    /// The policy `apply.approval` describes (its keys were checked when it was read).
    pub fn from_settings(
        settings: &crate::config::ApprovalSettings,
    ) -> Result<ApprovalPolicy, String> {
        let approvers = settings
            .approvers
            .iter()
            .map(Signer::allowed)
            .collect::<Result<Vec<Signer>, String>>()?;
        Ok(ApprovalPolicy {
            required: settings.required,
            hardware_key: settings.hardware_key,
            four_eyes: settings.four_eyes,
            approvers,
        })
    }
}

/// What is being approved: the plan of `commit` for `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    pub env: &'a str,
    pub commit: &'a str,
    /// The SHA-256 of the saved plan file, hex.
    pub sha256: &'a str,
    /// The author and committer emails of the commits being applied.
    pub authors: &'a [String],
}

/// One approval that counts: who approved, with which key, by which tag, when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Approval {
    /// The key's `SHA256:…` fingerprint.
    pub fingerprint: String,
    pub email: String,
    pub tag: String,
    /// The tagger's time (RFC 3339).
    pub signed_at: String,
}

/// The approvals of a plan: those that count (one per approver), and why each other tag of
/// the environment's commit does not (a tag of another commit is for another plan).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub counted: Vec<Approval>,
    pub refused: Vec<(String, String)>,
}

impl Tally {
    pub fn approved(&self, policy: &ApprovalPolicy) -> bool {
        self.counted.len() >= policy.required.max(1)
    }
}

/// Counts `tags` (name under `refs/tags/`, the tag object as `git cat-file tag` prints it)
/// for `plan` under `policy`.
pub fn tally(tags: &[(String, Vec<u8>)], plan: &Plan<'_>, policy: &ApprovalPolicy) -> Tally {
    let mut tally = Tally::default();
    let prefix = format!("karrots/approve/{}/", plan.env);
    for (name, object) in tags {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        if rest.split('/').next() != Some(plan.commit) {
            continue;
        }
        match judge(object, plan, policy) {
            Ok(mut approval) => {
                approval.tag = name.clone();
                let again = tally
                    .counted
                    .iter()
                    .any(|counted| counted.fingerprint == approval.fingerprint);
                if again {
                    tally
                        .refused
                        .push((name.clone(), "the same approver again".to_string()));
                } else {
                    tally.counted.push(approval);
                }
            }
            Err(reason) => tally.refused.push((name.clone(), reason)),
        }
    }
    tally
}

/// Whether one tag of the environment approves `plan`.
fn judge(object: &[u8], plan: &Plan<'_>, policy: &ApprovalPolicy) -> Result<Approval, String> {
    let text = String::from_utf8_lossy(object);
    if !text.starts_with("object ") {
        return Err(
            "it is a lightweight tag: an approval is an annotated tag signed with `git tag -s`"
                .to_string(),
        );
    }
    let header = |field: &str| {
        text.lines()
            .take_while(|line| !line.is_empty())
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(' '))
    };
    if header("object") != Some(plan.commit) || header("type") != Some("commit") {
        return Err(format!("it does not point at commit {}", plan.commit));
    }
    let hash = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("plan: sha256:"));
    if hash != Some(plan.sha256) {
        return Err(format!(
            "it approves plan {}, not the plan made now (sha256:{})",
            hash.map_or("(none named)".to_string(), |hash| format!("sha256:{hash}")),
            plan.sha256
        ));
    }
    let signed = verify(object, &policy.approvers).map_err(|refusal| refusal.to_string())?;
    if policy.hardware_key && !(signed.hardware && signed.user_present) {
        return Err(if signed.hardware {
            "its security key signed without the user touching it".to_string()
        } else {
            format!(
                "{} is no security key, and hardware_key is on",
                signed.fingerprint
            )
        });
    }
    if policy.four_eyes && plan.authors.contains(&signed.email) {
        return Err(format!(
            "{} wrote a commit being applied, and four_eyes is on",
            signed.email
        ));
    }
    let signed_at = header("tagger")
        .and_then(|tagger| tagger.rsplit(' ').nth(1)?.parse().ok())
        .map(|seconds| std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
        .map(|at| humantime::format_rfc3339_seconds(at).to_string())
        .unwrap_or_default();
    Ok(Approval {
        tag: String::new(),
        email: signed.email,
        fingerprint: signed.fingerprint,
        signed_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::testing::{commit_all, git, write};
    use std::path::{Path, PathBuf};

    struct Repo {
        dir: tempfile::TempDir,
        commit: String,
    }

    impl Repo {
        fn new() -> Repo {
            let dir = tempfile::tempdir().unwrap();
            let work = dir.path().join("repo");
            std::fs::create_dir(&work).unwrap();
            git(&work, &["init", "-q", "-b", "main"]);
            write(&work, "README", "config\n");
            let commit = commit_all(&work, "one").to_string();
            Repo { dir, commit }
        }

        fn key(&self, name: &str, email: &str) -> (PathBuf, Signer) {
            let signer = crate::signature::tests::key(self.dir.path(), name, email);
            (self.dir.path().join(name), signer)
        }

        /// A tag `name` on the commit signed with `key`, its message `message`.
        fn tag(&self, name: &str, key: &Path, message: &str) -> (String, Vec<u8>) {
            let work = self.dir.path().join("repo");
            let signing = format!("user.signingkey={}", key.display());
            let args = [
                "-c",
                "gpg.format=ssh",
                "-c",
                &signing,
                "tag",
                "-s",
                "-m",
                message,
                name,
            ];
            git(&work, &args);
            (
                name.to_string(),
                git(&work, &["cat-file", "tag", name]).into_bytes(),
            )
        }
    }

    #[test]
    fn an_approval_counts_for_its_environment_commit_and_plan_and_once_per_approver() {
        let repo = Repo::new();
        let (alice_key, alice) = repo.key("alice", "alice@example.com");
        let (mallory_key, _) = repo.key("mallory", "mallory@example.com");
        // As the trust branch's karrots.yaml gives it.
        let settings = crate::config::ApprovalSettings {
            required: 1,
            hardware_key: false,
            four_eyes: true,
            approvers: vec![crate::config::AllowedKey {
                email: alice.email.clone(),
                key: alice.key.to_openssh().unwrap(),
            }],
        };
        let policy = ApprovalPolicy::from_settings(&settings).unwrap();
        assert_eq!(policy.approvers, [alice]);
        let c = repo.commit.clone();
        let good = "approve\n\nplan: sha256:aaaa";
        // `…/<sha>` and `…/<sha>/<name>` cannot both be refs of one repository (git refuses a
        // ref that is also a folder of refs): each approver names a tag of their own.
        let tags = [
            repo.tag(&format!("karrots/approve/prod/{c}/alice"), &alice_key, good),
            repo.tag(&format!("karrots/approve/prod/{c}/again"), &alice_key, good),
            repo.tag(
                &format!("karrots/approve/prod/{c}/old"),
                &alice_key,
                "plan: sha256:bbbb",
            ),
            repo.tag(
                &format!("karrots/approve/prod/{c}/mallory"),
                &mallory_key,
                good,
            ),
            repo.tag(&format!("karrots/approve/dev/{c}"), &alice_key, good),
            repo.tag(
                "karrots/approve/prod/0000000000000000000000000000000000000000",
                &alice_key,
                good,
            ),
        ];
        let authors = ["bob@example.com".to_string()];
        let plan = Plan {
            env: "prod",
            commit: &c,
            sha256: "aaaa",
            authors: &authors,
        };
        let tally = tally(&tags, &plan, &policy);
        assert!(tally.approved(&policy));
        assert_eq!(tally.counted.len(), 1);
        assert_eq!(tally.counted[0].email, "alice@example.com");
        assert_eq!(
            tally.counted[0].tag,
            format!("karrots/approve/prod/{c}/alice")
        );
        assert!(tally.counted[0].signed_at.starts_with("20"), "{tally:?}");
        let reasons: Vec<&str> = tally.refused.iter().map(|(_, why)| why.as_str()).collect();
        assert_eq!(
            reasons.len(),
            3,
            "dev's tag is not prod's to judge, nor another commit's: {reasons:?}"
        );
        assert_eq!(reasons[0], "the same approver again");
        assert!(
            reasons[1].starts_with("it approves plan sha256:bbbb, not the plan made now"),
            "{reasons:?}"
        );
        assert!(
            reasons[2].contains("which is no allowed signer"),
            "{reasons:?}"
        );

        // The approver wrote a commit being applied: four eyes do not count her.
        let authors = ["alice@example.com".to_string()];
        let own = Plan {
            authors: &authors,
            ..plan.clone()
        };
        let tally = super::tally(&tags[..1], &own, &policy);
        assert!(!tally.approved(&policy));
        assert!(
            tally.refused[0].1.contains("four_eyes"),
            "{:?}",
            tally.refused
        );

        // The bare form, `karrots/approve/<env>/<sha>`, in a repository of its own.
        let other = Repo::new();
        let (carol_key, carol) = other.key("carol", "carol@example.com");
        let bare = other.tag(
            &format!("karrots/approve/prod/{}", other.commit),
            &carol_key,
            good,
        );
        let carols = ApprovalPolicy {
            approvers: vec![carol],
            ..policy.clone()
        };
        let theirs = Plan {
            commit: &other.commit,
            ..plan.clone()
        };
        assert!(super::tally(&[bare], &theirs, &carols).approved(&carols));

        // A key that is no security key, when hardware_key is on.
        let hardware = ApprovalPolicy {
            hardware_key: true,
            ..policy.clone()
        };
        let tally = super::tally(&tags[..1], &plan, &hardware);
        assert!(!tally.approved(&hardware));
        assert!(
            tally.refused[0]
                .1
                .ends_with("is no security key, and hardware_key is on")
        );
    }

    /// With `hardware_key`, a security key's approval counts only when its user-presence flag
    /// is set: the flag is read from the signature, which `ssh-keygen -Y verify` does not do.
    #[test]
    fn a_security_key_approval_counts_only_when_the_key_was_touched() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let name = format!("karrots/approve/prod/{commit}/carol");
        let payload = format!(
            "object {commit}\ntype commit\ntag {name}\ntagger Carol <carol@example.com> 1765100000 +0000\n\napprove\n\nplan: sha256:aaaa\n"
        );
        let plan = Plan {
            env: "prod",
            commit,
            sha256: "aaaa",
            authors: &[],
        };
        for (flags, counts) in [(0x01, true), (0x00, false), (0x04, false)] {
            let (carol, pem) =
                crate::signature::tests::security_key_signature(payload.as_bytes(), flags);
            let policy = ApprovalPolicy {
                required: 1,
                hardware_key: true,
                four_eyes: false,
                approvers: vec![carol],
            };
            let tag = (name.clone(), format!("{payload}{pem}").into_bytes());
            let tally = tally(&[tag], &plan, &policy);
            assert_eq!(
                tally.approved(&policy),
                counts,
                "flags {flags:#04x}: {tally:?}"
            );
            if counts {
                assert_eq!(tally.counted[0].signed_at, "2025-12-07T09:33:20Z");
            } else {
                assert_eq!(
                    tally.refused[0].1,
                    "its security key signed without the user touching it"
                );
            }
        }
    }
}
