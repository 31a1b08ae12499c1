//! The reconciler's error policy and states: a passing failure is retried, a lasting one is
//! not, and each state says what the environment is waiting for.

use crate::daemon::{APP, Fixture};
use crate::support::{Moto, free_port};

/// A daemon that starts before its AWS endpoint answers (seen with ten environments: one met
/// `Connection refused` from STS and stayed `failed` for good): the failure passes, so the
/// environment shows `error` with the time of the next attempt, one alert goes out for the
/// streak, and the commit is applied once the endpoint answers.
#[test]
fn a_daemon_started_before_its_aws_endpoint_answers_retries_and_applies() {
    let mut fixture = Fixture::unstarted("", "1s", APP, None);
    let port = free_port();
    fixture.moto.url = format!("http://127.0.0.1:{port}");
    fixture.start();
    let head = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod waiting for its endpoint", |f| {
        f.environment("prod")["status"] == "error"
    });
    let failed = fixture.runs("prod");
    let message = failed[0]["message"].as_str().unwrap_or_default();
    assert!(
        failed[0]["result"] == "failed"
            && message.contains("STS")
            && message.contains("a passing failure (attempt 1): tried again at"),
        "{failed:#?}"
    );

    fixture.moto = Moto::start_on(port, "123456789012", &[]);
    fixture.wait_for("prod applied once STS answers", |f| {
        f.applied("prod", &head)
    });
    let alerts = fixture.sink.all("prod", "apply_failed");
    assert_eq!(alerts.len(), 1, "one alert per streak: {alerts:#?}");
    assert!(
        alerts[0]["message"]
            .as_str()
            .unwrap()
            .contains("tried again at"),
        "{alerts:#?}"
    );
    let applies: Vec<_> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["kind"] == "apply")
        .collect();
    assert_eq!(applies.len(), 1, "{applies:#?}");
    assert_eq!(applies[0]["result"], "applied");
    assert_eq!(fixture.environment("prod")["status"], "in_sync");
}
