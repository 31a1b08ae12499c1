//! A forge stand-in on loopback: it records every request (method, path, headers, JSON
//! body) and answers as GitHub's, GitLab's and Gitea's commit status APIs do — `201` with the
//! status; `503` while told to be down; and, shaped like GitLab, `400 Cannot transition
//! status` when a context is set to the state it already has (which a context the stand-in
//! has not seen yet is taken to have). Shaped like GitHub, it also
//! keeps pull requests (a commit → an open pull request) and their comments: listed,
//! created, edited.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// One request the stand-in received, and what it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    pub answered: u16,
}

pub struct ForgeStandIn {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    down: Arc<AtomicBool>,
    pulls: Arc<Pulls>,
    comments: Arc<Comments>,
    app: Arc<Mutex<Option<App>>>,
}

/// A GitHub App the stand-in mints installation tokens for.
#[derive(Clone)]
pub struct App {
    /// The App's public key (PEM), which must verify the JWT.
    pub public_key: Vec<u8>,
    pub app_id: u64,
    pub token: String,
    /// How long each token lives.
    pub lifetime: std::time::Duration,
    /// Tokens minted so far.
    pub minted: usize,
}

/// `POST /app/installations/{id}/access_tokens`: a token for a JWT the App's key signed.
fn mint(app: &mut App, headers: &BTreeMap<String, String>) -> (u16, String) {
    let jwt = headers
        .get("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(&app.public_key).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iat", "iss"]);
    let claims = match jsonwebtoken::decode::<Value>(jwt, &key, &validation) {
        Ok(data) => data.claims,
        Err(_) => {
            return (
                401,
                "{\"message\":\"A JSON web token could not be decoded\"}".into(),
            );
        }
    };
    let lasts = claims["exp"].as_u64().unwrap_or(0) - claims["iat"].as_u64().unwrap_or(0);
    if claims["iss"].as_str() != Some(app.app_id.to_string().as_str()) || lasts > 660 {
        return (
            401,
            "{\"message\":\"'Issuer' claim ('iss') must be an Integer\"}".into(),
        );
    }
    app.minted += 1;
    let expires = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + app.lifetime);
    (
        201,
        serde_json::json!({"token": app.token, "expires_at": expires.to_string()}).to_string(),
    )
}

/// GitHub's pull requests: the head commit → the number of an open one.
type Pulls = Mutex<BTreeMap<String, u64>>;
/// GitHub's issue comments: id → (pull request, body).
type Comments = Mutex<BTreeMap<u64, (u64, String)>>;

/// What GitHub's pull request and comment routes answer, when `path` is one of them.
fn pull_request_routes(
    method: &str,
    path: &str,
    body: &Value,
    pulls: &Pulls,
    comments: &Comments,
) -> Option<(u16, String)> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path
        .trim_start_matches("/api/repos/acme/infra/")
        .split('/')
        .collect();
    let mut comments = comments.lock().unwrap();
    match (method, parts.as_slice()) {
        ("GET", ["commits", sha, "pulls"]) => {
            let open: Vec<Value> = pulls
                .lock()
                .unwrap()
                .get(*sha)
                .map(|number| serde_json::json!({"number": number, "state": "open"}))
                .into_iter()
                .collect();
            Some((200, Value::Array(open).to_string()))
        }
        ("GET", ["issues", number, "comments"]) => {
            let number: u64 = number.parse().ok()?;
            let listed: Vec<Value> = comments
                .iter()
                .filter(|(_, (pull, _))| *pull == number)
                .map(|(id, (_, body))| serde_json::json!({"id": id, "body": body}))
                .collect();
            Some((200, Value::Array(listed).to_string()))
        }
        ("POST", ["issues", number, "comments"]) => {
            let id = 1000 + comments.len() as u64;
            comments.insert(
                id,
                (number.parse().ok()?, body["body"].as_str()?.to_string()),
            );
            Some((201, serde_json::json!({"id": id}).to_string()))
        }
        ("PATCH", ["issues", "comments", id]) => {
            let comment = comments.get_mut(&id.parse().ok()?)?;
            comment.1 = body["body"].as_str()?.to_string();
            Some((200, serde_json::json!({"id": id}).to_string()))
        }
        _ => None,
    }
}

impl ForgeStandIn {
    /// `gitlab`: refuse a transition to the state a context already has, as GitLab does.
    pub fn start(gitlab: bool) -> ForgeStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forge stand-in");
        let url = format!("http://{}/api", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let (pulls, comments): (Arc<Pulls>, Arc<Comments>) = (Arc::default(), Arc::default());
        let (log, is_down) = (received.clone(), down.clone());
        let (known_pulls, known_comments) = (Arc::clone(&pulls), Arc::clone(&comments));
        let app: Arc<Mutex<Option<App>>> = Arc::default();
        let known_app = app.clone();
        std::thread::spawn(move || {
            let mut states: BTreeMap<String, String> = BTreeMap::new();
            for mut stream in listener.incoming().flatten() {
                let Some(mut request) = read(&mut stream) else {
                    continue;
                };
                let key = format!("{} {}", request.path, request.body["name"]);
                let state = request.body["state"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let routed = pull_request_routes(
                    &request.method,
                    &request.path,
                    &request.body,
                    &known_pulls,
                    &known_comments,
                );
                let minting = request.path.starts_with("/api/app/installations/");
                let (code, answer) = if minting {
                    match known_app.lock().unwrap().as_mut() {
                        Some(app) => mint(app, &request.headers),
                        None => (404, "{}".to_string()),
                    }
                } else if is_down.load(Ordering::SeqCst) {
                    (503, "{\"message\":\"Service Unavailable\"}".to_string())
                } else if let Some(routed) = routed {
                    routed
                } else if gitlab && states.get(&key).is_none_or(|set| *set == state) {
                    // A context seen for the first time already has this state (set by an
                    // earlier run, as far as the stand-in knows): GitLab refuses to set it again.
                    states.insert(key, state.clone());
                    (
                        400,
                        format!(
                            "{{\"message\":\"Cannot transition status via :run from :{state}\"}}"
                        ),
                    )
                } else {
                    states.insert(key, state);
                    (201, request.body.to_string())
                };
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    )
                    .as_bytes(),
                );
                request.answered = code;
                log.lock().unwrap().push(request);
            }
        });
        ForgeStandIn {
            url,
            received,
            down,
            pulls,
            comments,
            app,
        }
    }

    /// Mints installation tokens for `app`'s JWTs from now on.
    pub fn issue_app_tokens(&self, app: App) {
        *self.app.lock().unwrap() = Some(app);
    }

    /// Installation tokens minted so far.
    pub fn minted(&self) -> usize {
        self.app
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |app| app.minted)
    }

    /// An open pull request, `number`, whose head is now `sha`.
    pub fn open_pull_request(&self, number: u64, sha: &str) {
        self.pulls.lock().unwrap().insert(sha.to_string(), number);
    }

    /// The comments of pull request `number`, by id.
    pub fn comments(&self, number: u64) -> Vec<(u64, String)> {
        self.comments
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (pull, _))| *pull == number)
            .map(|(id, (_, body))| (*id, body.clone()))
            .collect()
    }

    /// Answers `503` to everything until told otherwise.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The states the forge took (answered 201) for `sha` under `context` (GitHub's and
    /// Gitea's `context`, GitLab's `name`), oldest first, with their descriptions.
    pub fn taken(&self, sha: &str, context: &str) -> Vec<(String, String)> {
        self.received()
            .into_iter()
            .filter(|request| {
                request.answered == 201 && request.path.ends_with(&format!("/statuses/{sha}"))
            })
            .filter(|request| request.body["context"] == context || request.body["name"] == context)
            .map(|request| {
                let field =
                    |name: &str| request.body[name].as_str().unwrap_or_default().to_string();
                (field("state"), field("description"))
            })
            .collect()
    }
}

/// Reads one HTTP/1.1 request.
fn read(stream: &mut TcpStream) -> Option<Received> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let read = stream.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..read]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    while data.len() < head_end + 4 + length {
        let read = stream.read(&mut chunk).ok()?;
        if read == 0 {
            break;
        }
        data.extend_from_slice(&chunk[..read]);
    }
    let body = serde_json::from_slice(&data[head_end + 4..]).unwrap_or(Value::Null);
    Some(Received {
        method,
        path,
        headers,
        body,
        answered: 0,
    })
}
