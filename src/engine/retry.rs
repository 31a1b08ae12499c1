//! The error policy: whether a failure is worth another attempt, and when. One backoff serves
//! every retry in the daemon — a merged commit's run, a drift check, an alert's delivery — so
//! they cannot drift apart.

use std::time::Duration;

/// A wait that starts at `first`, doubles with each failure in a row and stops growing at
/// `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// Retries of a merged commit whose run met a passing failure.
    pub const RUN: Backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
    /// Deliveries of an alert a sink did not accept.
    pub const DELIVERY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    /// Drift checks after one failed (capped again by the check interval).
    pub const DRIFT: Backoff = Backoff::new(Duration::from_secs(15), Duration::from_secs(3600));

    pub const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { first, cap }
    }

    /// The wait after the `failures`-th failure in a row (1 for the first), lowered by up to
    /// a quarter by `jitter` (a fraction in `[0, 1)` the caller draws), so that environments
    /// that failed together do not all retry in the same second.
    pub fn after(&self, failures: u32, jitter: f64) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        let wait = self.first.saturating_mul(1 << doublings).min(self.cap);
        wait.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
    }
}

/// How a failure is expected to behave when tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The network, throttling, STS, a provider's 5xx, a timeout, a held state lock: it
    /// passes, so it is retried for as long as it lasts.
    Transient,
    /// A plan that failed for a reason not known to pass: worth one more attempt, and
    /// permanent when it fails the same way again.
    Unknown,
    /// A refusal, a bad configuration, the wrong account: only a new commit changes it.
    Permanent,
}

/// What to do with a commit after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Run the same commit again after this wait (unless a newer one arrives first).
    Requeue(Duration),
    /// Give up on this commit: the next commit (or a restart) tries again.
    AwaitChange,
}

/// The policy after the `attempts`-th failure in a row of one commit (1 for the first).
/// `repeated`: this failure says exactly what the one before it said.
pub fn error_policy(class: ErrorClass, attempts: u32, repeated: bool, jitter: f64) -> Policy {
    match class {
        ErrorClass::Permanent => Policy::AwaitChange,
        ErrorClass::Unknown if attempts > 1 && repeated => Policy::AwaitChange,
        ErrorClass::Unknown | ErrorClass::Transient => {
            Policy::Requeue(Backoff::RUN.after(attempts, jitter))
        }
    }
}

/// Words in terraform's output that say a failure was the network's, an API's momentary
/// refusal or a lock held by another run — not the configuration's.
const PASSING: [&str; 15] = [
    "connection refused",
    "connection reset",
    "no such host",
    "i/o timeout",
    "tls handshake timeout",
    "context deadline exceeded",
    "timeout exceeded",
    "throttling",
    "rate exceeded",
    "requestlimitexceeded",
    "toomanyrequests",
    "serviceunavailable",
    "internal server error",
    "error acquiring the state lock",
    "statuscode: 5",
];

/// The class of a terraform run that failed with `output` (what it printed on stderr).
pub fn classify_terraform_output(output: &str) -> ErrorClass {
    let output = output.to_ascii_lowercase();
    if PASSING.iter().any(|words| output.contains(words)) {
        ErrorClass::Transient
    } else {
        ErrorClass::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_jitter_only_shortens_it() {
        let backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
        let waits: Vec<u64> = (1..=7).map(|n| backoff.after(n, 0.0).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff.after(u32::MAX, 0.0), Duration::from_secs(300));
        assert_eq!(backoff.after(1, 0.999_999).as_millis(), 7500);
        assert_eq!(backoff.after(1, 7.0), Duration::from_millis(7500));
    }

    #[test]
    fn each_class_of_failure_has_its_policy() {
        use ErrorClass::*;
        let cases = [
            // (class, attempts, repeated, retried)
            (Transient, 1, false, true),
            (Transient, 9, true, true),
            (Unknown, 1, false, true),
            (Unknown, 2, false, true),
            (Unknown, 2, true, false),
            (Permanent, 1, false, false),
        ];
        for (class, attempts, repeated, retried) in cases {
            let policy = error_policy(class, attempts, repeated, 0.0);
            assert_eq!(
                matches!(policy, Policy::Requeue(_)),
                retried,
                "{class:?} attempt {attempts} repeated {repeated}: {policy:?}"
            );
        }
        assert_eq!(
            error_policy(Transient, 3, true, 0.0),
            Policy::Requeue(Duration::from_secs(40))
        );
    }

    #[test]
    fn network_and_lock_failures_of_terraform_pass_and_configuration_errors_do_not() {
        let passing = [
            "Error: reading EC2 VPC: dial tcp 127.0.0.1:4566: connect: connection refused",
            "operation error STS: GetCallerIdentity, https response error StatusCode: 503",
            "Error: Error acquiring the state lock",
            "ThrottlingException: Rate exceeded",
        ];
        for output in passing {
            assert_eq!(
                classify_terraform_output(output),
                ErrorClass::Transient,
                "{output}"
            );
        }
        let unknown = [
            "Error: Reference to undeclared resource",
            "Error: creating EC2 VPC: InvalidParameterValue: invalid CIDR block",
        ];
        for output in unknown {
            assert_eq!(
                classify_terraform_output(output),
                ErrorClass::Unknown,
                "{output}"
            );
        }
    }
}
