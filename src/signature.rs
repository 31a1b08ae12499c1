//! SSH signatures on git objects, verified in process: an approval tag made with
//! `git tag -s` under `gpg.format=ssh`, or a signed commit. The signature (SSHSIG, namespace
//! `git`) must be by one of the allowed signers and over exactly the object without its
//! signature. A security key's signature says whether the user touched the key (the
//! user-presence flag), which Karrots reads itself: `ssh-keygen -Y verify` and `git tag -v`
//! accept a signature whose flag is cleared.

use ssh_key::{Algorithm, HashAlg, PublicKey, SshSig};

/// The line that starts an SSH signature in a git object.
const BEGIN: &str = "-----BEGIN SSH SIGNATURE-----";

/// The namespace git signs in.
const NAMESPACE: &str = "git";

/// The user-presence bit of a security key's flags (PROTOCOL.u2f).
const USER_PRESENT: u8 = 0x01;

/// One allowed signer: an `allowed_signers` line, `email key-type base64 [comment]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    pub email: String,
    pub key: PublicKey,
}

impl Signer {
    pub fn parse(line: &str) -> Result<Signer, String> {
        let (email, key) = line
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("{line:?} is not `email key-type base64`"))?;
        let key = PublicKey::from_openssh(key.trim())
            .map_err(|e| format!("{line:?}: not an OpenSSH public key: {e}"))?;
        Ok(Signer {
            email: email.to_string(),
            key,
        })
    }

    /// A key of the configuration (`apply.approval.approvers`, `verify.signers`).
    pub fn allowed(key: &crate::config::AllowedKey) -> Result<Signer, String> {
        Signer::parse(&format!("{} {}", key.email, key.key))
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }
}

/// A signature that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub email: String,
    /// The key's `SHA256:…` fingerprint.
    pub fingerprint: String,
    /// Made by a security key (`sk-ssh-ed25519@openssh.com`, `sk-ecdsa-sha2-nistp256@…`).
    pub hardware: bool,
    /// A security key's user-presence flag; `false` for any other key.
    pub user_present: bool,
}

/// Why a signed object does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it carries no SSH signature")]
    Unsigned,
    #[error("its SSH signature does not parse: {0}")]
    Unreadable(String),
    #[error("it is signed in namespace {0:?}, not git's")]
    Namespace(String),
    #[error("it is signed by {0}, which is no allowed signer")]
    UnknownKey(String),
    #[error("its signature by {0} does not verify: the object was changed after it was signed")]
    BadSignature(String),
}

/// Verifies the SSH signature of a git object (`git cat-file tag NAME`): the signature block
/// at its end, over the object before it, by one of `signers`.
pub fn verify(object: &[u8], signers: &[Signer]) -> Result<Signed, Refusal> {
    let text = std::str::from_utf8(object).map_err(|e| Refusal::Unreadable(e.to_string()))?;
    let start = text.rfind(BEGIN).ok_or(Refusal::Unsigned)?;
    let (payload, armored) = text.split_at(start);
    verify_detached(payload.as_bytes(), armored, signers)
}

/// Verifies `armored` (an SSH signature block) over `payload`, by one of `signers`: a signed
/// commit's `gpgsig` header over the commit without it.
pub fn verify_detached(
    payload: &[u8],
    armored: &str,
    signers: &[Signer],
) -> Result<Signed, Refusal> {
    if !armored.trim_start().starts_with(BEGIN) {
        return Err(Refusal::Unsigned);
    }
    let signature =
        SshSig::from_pem(armored.trim_end()).map_err(|e| Refusal::Unreadable(e.to_string()))?;
    if signature.namespace() != NAMESPACE {
        return Err(Refusal::Namespace(signature.namespace().to_string()));
    }
    let offered = signature
        .public_key()
        .fingerprint(HashAlg::Sha256)
        .to_string();
    let signer = signers
        .iter()
        .find(|signer| signer.key.key_data() == signature.public_key())
        .ok_or_else(|| Refusal::UnknownKey(offered.clone()))?;
    signer
        .key
        .verify(NAMESPACE, payload, &signature)
        .map_err(|_| Refusal::BadSignature(offered.clone()))?;
    let hardware = matches!(
        signature.algorithm(),
        Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256
    );
    Ok(Signed {
        email: signer.email.clone(),
        fingerprint: offered,
        hardware,
        user_present: hardware && user_present(signature.signature_bytes()),
    })
}

/// A security key's signature ends with its flags byte and a 4-byte counter.
fn user_present(signature: &[u8]) -> bool {
    signature
        .len()
        .checked_sub(5)
        .and_then(|at| signature.get(at))
        .is_some_and(|flags| flags & USER_PRESENT != 0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::git::testing::{commit_all, git, write};
    use ssh_key::public::{Ed25519PublicKey, KeyData, SkEd25519};
    use std::path::Path;

    /// A key made by ssh-keygen at `dir/name`; its allowed-signers line.
    pub(crate) fn key(dir: &Path, name: &str, email: &str) -> Signer {
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", email, "-f"])
            .arg(dir.join(name))
            .output()
            .expect("ssh-keygen is installed");
        assert!(made.status.success(), "{made:?}");
        let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
        Signer::parse(&format!("{email} {public}")).unwrap()
    }

    /// A repository with one commit and a tag on it signed by `signing_key` as git does
    /// (`git tag -s`, `gpg.format=ssh`); the tag object.
    fn signed_tag(dir: &Path, signing_key: &Path) -> Vec<u8> {
        let repo = dir.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        write(&repo, "README", "config\n");
        let commit = commit_all(&repo, "one");
        let name = format!("karrots/approve/prod/{commit}");
        git(
            &repo,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &format!("user.signingkey={}", signing_key.display()),
                "tag",
                "-s",
                "-m",
                "approve prod\n\nplan: sha256:0123",
                &name,
            ],
        );
        git(&repo, &["cat-file", "tag", &name]).into_bytes()
    }

    #[test]
    fn a_tag_signed_by_an_allowed_signer_verifies_and_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let alice = key(dir.path(), "alice", "alice@example.com");
        let bob = key(dir.path(), "bob", "bob@example.com");
        let tag = signed_tag(dir.path(), &dir.path().join("alice"));
        let listed = ssh_keygen_fingerprint(&dir.path().join("alice.pub"));

        let signed = verify(&tag, &[bob.clone(), alice.clone()]).unwrap();
        assert_eq!(signed.email, "alice@example.com");
        assert_eq!(signed.fingerprint, listed, "as ssh-keygen -l prints it");
        assert!(!signed.hardware && !signed.user_present);

        assert_eq!(
            verify(&tag, &[bob]),
            Err(Refusal::UnknownKey(listed.clone()))
        );
        let text = String::from_utf8(tag.clone()).unwrap();
        let changed = text.replace("plan: sha256:0123", "plan: sha256:9999");
        assert_eq!(
            verify(changed.as_bytes(), std::slice::from_ref(&alice)),
            Err(Refusal::BadSignature(listed))
        );
        let unsigned = &text[..text.find(BEGIN).unwrap()];
        assert_eq!(
            verify(unsigned.as_bytes(), &[alice]),
            Err(Refusal::Unsigned)
        );
    }

    fn ssh_keygen_fingerprint(public: &Path) -> String {
        let listed = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(public)
            .output()
            .unwrap();
        let listed = String::from_utf8(listed.stdout).unwrap();
        listed.split_whitespace().nth(1).unwrap().to_string()
    }

    /// A security key's signature of `payload` with the given flags, made as the key would
    /// (no hardware here): SHA256(application) ‖ flags ‖ counter ‖ SHA256(SSHSIG's data).
    pub(crate) fn security_key_signature(payload: &[u8], flags: u8) -> (Signer, String) {
        use ed25519_dalek::Signer as _;
        use sha2::Digest;
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let public = Ed25519PublicKey(signing.verifying_key().to_bytes());
        let key = KeyData::SkEd25519(SkEd25519::new(public, "ssh:"));
        let data = SshSig::signed_data(NAMESPACE, HashAlg::Sha512, payload).unwrap();
        let trailer = [flags, 0, 0, 0, 1];
        let mut signed = sha2::Sha256::digest("ssh:").to_vec();
        signed.extend(trailer);
        signed.extend(sha2::Sha256::digest(&data));
        let mut bytes = signing.sign(&signed).to_bytes().to_vec();
        bytes.extend(trailer);
        let signature = ssh_key::Signature::new(Algorithm::SkEd25519, bytes).unwrap();
        let sig = SshSig::new(key.clone(), NAMESPACE, HashAlg::Sha512, signature).unwrap();
        let pem = sig.to_pem(ssh_key::LineEnding::LF).unwrap();
        let signer = Signer {
            email: "carol@example.com".into(),
            key: PublicKey::from(key),
        };
        (signer, pem)
    }

    #[test]
    fn a_security_keys_signature_says_whether_the_key_was_touched() {
        let payload =
            "object 0123\ntype commit\ntag karrots/approve/prod/0123\n\nplan: sha256:0123\n";
        for (flags, present) in [(0x01, true), (0x05, true), (0x00, false), (0x04, false)] {
            let (carol, pem) = security_key_signature(payload.as_bytes(), flags);
            let object = format!("{payload}{pem}");
            let signed = verify(object.as_bytes(), &[carol]).unwrap();
            assert!(signed.hardware);
            assert_eq!(signed.user_present, present, "flags {flags:#04x}");
        }
    }
}
