//! Terraform's state lock, as its errors describe it. A plan or apply that cannot take the
//! lock is tried again, terraform waiting [`ATTEMPT`] each time, for [`WAIT`] in all — unless
//! the lock is this run's own orphan: with DynamoDB locking, a `PutItem` the AWS SDK sends
//! again after a lost answer finds the lock its first try wrote, and terraform reports that
//! lock held, by itself, until it gives up. Nobody would ever release it.
//!
//! A lock is taken to be such an orphan only when terraform's own lock info says it was
//! taken for the same operation, by this user on this host, after the terraform process that
//! failed to take it had started. Only one terraform process of this daemon plans or applies
//! an environment at a time (previews never lock), and with a shared store only the daemon
//! holding the environment's lease runs it, so such a lock can only be that process's own.

use std::time::{Duration, SystemTime};

/// Terraform's own `-lock-timeout` for one attempt.
pub const ATTEMPT: &str = "-lock-timeout=20s";

/// How long a plan or apply waits in all for a lock another process holds.
pub const WAIT: Duration = Duration::from_secs(300);

/// The holder of a state lock, from the `Lock Info:` block of terraform's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub id: String,
    pub operation: String,
    pub who: String,
    pub created: SystemTime,
}

/// Whether terraform failed because it could not take the state lock.
pub fn failed_to_lock(text: &str) -> bool {
    text.contains("Error acquiring the state lock")
}

/// The lock's holder, when `text` is terraform's failure to take the lock and names one.
pub fn holder(text: &str) -> Option<Holder> {
    if !failed_to_lock(text) {
        return None;
    }
    let info = text.split("Lock Info:").nth(1)?;
    let field = |name: &str| {
        info.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|value| value.trim().to_string())
    };
    // Go's time format: "2026-12-07 08:56:07.047769846 +0000 UTC".
    let created = field("Created")?;
    let utc = created.strip_suffix(" +0000 UTC")?;
    Some(Holder {
        id: field("ID").filter(|id| !id.is_empty())?,
        operation: field("Operation")?,
        who: field("Who")?,
        created: humantime::parse_rfc3339_weak(utc).ok()?,
    })
}

impl Holder {
    /// Whether this lock is the orphan of the `operation` (`OperationTypePlan`,
    /// `OperationTypeApply`) that `me` (user@host) started at `started`.
    pub fn is_own_orphan(&self, operation: &str, me: &str, started: SystemTime) -> bool {
        self.operation == operation && self.who == me && self.created >= started
    }
}

/// `user@host`, as terraform writes `Who` in its lock info.
pub fn this_user_at_host() -> String {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_default();
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default();
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELD: &str = "\nError: Error acquiring the state lock\n\nError message: operation error DynamoDB: PutItem, https response error\nStatusCode: 400, RequestID:\nenfHtkWJAN9l9Yo3mHYLDrCn5bVZv974a1VTADWtncl3Gorydtjj,\nConditionalCheckFailedException: The conditional request failed\nLock Info:\n  ID:        8e77cca4-58dd-d2fa-43ba-b3d4fc0d9697\n  Path:      bench-state/r2/e065.tfstate\n  Operation: OperationTypeApply\n  Who:       root@vm\n  Version:   1.11.4\n  Created:   2026-12-07 08:48:23.976449939 +0000 UTC\n  Info:      \n\n\nTerraform acquires a state lock to protect the state from being written\nby multiple users at the same time.\n";

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn the_holder_is_read_from_terraforms_lock_info() {
        let holder = holder(HELD).unwrap();
        assert_eq!(holder.id, "8e77cca4-58dd-d2fa-43ba-b3d4fc0d9697");
        assert_eq!(holder.operation, "OperationTypeApply");
        assert_eq!(holder.who, "root@vm");
        assert_eq!(
            humantime::format_rfc3339_nanos(holder.created).to_string(),
            "2026-12-07T08:48:23.976449939Z"
        );
        assert_eq!(super::holder("Error: Invalid reference"), None);
        assert_eq!(
            super::holder(&HELD.replace("+0000 UTC", "+0100 CET")),
            None,
            "terraform writes the time in UTC; anything else is not understood"
        );
    }

    /// Only a lock taken for the same operation, by this user on this host, after the
    /// failed process started, is its own orphan: a lock someone else holds is waited for.
    #[test]
    fn only_a_lock_taken_after_the_run_started_by_its_own_operation_is_an_orphan() {
        let holder = holder(HELD).unwrap();
        let started = at("2026-12-07T08:48:23.920000000Z");
        assert!(holder.is_own_orphan("OperationTypeApply", "root@vm", started));
        assert!(!holder.is_own_orphan("OperationTypePlan", "root@vm", started));
        assert!(!holder.is_own_orphan("OperationTypeApply", "karrots@vm", started));
        assert!(!holder.is_own_orphan("OperationTypeApply", "root@other", started));
        let later = at("2026-12-07T08:48:24Z");
        assert!(
            !holder.is_own_orphan("OperationTypeApply", "root@vm", later),
            "taken before this process started: another process's"
        );
    }
}
