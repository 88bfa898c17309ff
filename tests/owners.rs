//! Many users on one gateway (SPEC §9): JWTs (HS256, RS256, ES256, EdDSA,
//! JWKS) name owners; every route of a session answers another owner 404;
//! lists hold only the caller's sessions, operators see all and filter by
//! owner; the `agents` claim (403), the per-owner session limit (429), the
//! per-owner working directory whatever the `sub`, the owner kept in the
//! durable store, and the audit lines for refused credentials.
//!
//! Tokens are minted here with `jsonwebtoken`; the key pairs in
//! `tests/keys/` are test-only.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentgate::auth::JwtVerifier;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "owners-test-secret-0123456789-abcdefghijklmnop";
const OPERATOR: &str = "operator-token-0123456789abcdef";
const T: Duration = Duration::from_secs(30);

const RSA_KEY: &[u8] = include_bytes!("keys/rsa.key");
const RSA_PUB: &[u8] = include_bytes!("keys/rsa.pub");
const EC_KEY: &[u8] = include_bytes!("keys/ec.key");
const EC_PUB: &[u8] = include_bytes!("keys/ec.pub");
const ED_KEY: &[u8] = include_bytes!("keys/ed.key");
const ED_PUB: &[u8] = include_bytes!("keys/ed.pub");

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn mint(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs(claims: Value) -> String {
    mint(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims,
    )
}

/// A ten-minute HS256 token for `sub`.
fn user(sub: &str) -> String {
    hs(json!({"sub": sub, "exp": now() + 600}))
}

fn hs_verifier() -> JwtVerifier {
    let mut v = JwtVerifier::new(None, None);
    v.add_secret(SECRET.as_bytes()).unwrap();
    v
}

/// A gateway with the operator token and HS256 JWTs, after `tweak`.
async fn gateway(tweak: impl FnOnce(&mut agentgate::Config)) -> Gateway {
    Gateway::start(|c| {
        c.token = Some(OPERATOR.into());
        c.jwt = Some(Arc::new(hs_verifier()));
        tweak(c);
    })
    .await
}

/// `method path` with `token` as a bearer and an optional JSON body.
async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = gw
        .http
        .request(method.parse().unwrap(), gw.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.unwrap()
}

async fn create(gw: &Gateway, token: &str, body: Value) -> Value {
    let res = call(gw, "POST", "/sessions", token, Some(body)).await;
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

async fn ids(gw: &Gateway, token: &str, query: &str) -> Vec<String> {
    let res = call(gw, "GET", &format!("/sessions{query}"), token, None).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_key_kind_names_the_owner_and_sessions_show_it() {
    let mut v = hs_verifier();
    v.add_public_key_pem(RSA_PUB).unwrap();
    v.add_public_key_pem(EC_PUB).unwrap();
    v.add_public_key_pem(ED_PUB).unwrap();
    let gw = Gateway::start(|c| {
        c.token = Some(OPERATOR.into());
        c.jwt = Some(Arc::new(v));
    })
    .await;
    let claims = |sub: &str| json!({"sub": sub, "exp": now() + 600});
    let tokens = [
        ("hs", user("hs")),
        (
            "rs",
            mint(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
                &claims("rs"),
            ),
        ),
        (
            "es",
            mint(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
                &claims("es"),
            ),
        ),
        (
            "ed",
            mint(
                Algorithm::EdDSA,
                &EncodingKey::from_ed_pem(ED_KEY).unwrap(),
                &claims("ed"),
            ),
        ),
    ];
    for (sub, token) in &tokens {
        let s = create(&gw, token, json!({"agent": "sed"})).await;
        assert_eq!(s["owner"], *sub, "{s}");
        assert_eq!(ids(&gw, token, "").await, vec![s["id"].as_str().unwrap()]);
    }
    // The operator token's sessions have no owner.
    let op = create(&gw, OPERATOR, json!({"agent": "sed"})).await;
    assert_eq!(op["owner"], Value::Null);
    assert_eq!(ids(&gw, OPERATOR, "").await.len(), 5);
    gw.stop().await;
}

#[tokio::test]
async fn a_jwks_file_picks_the_key_by_kid() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
    let ec = EncodingKey::from_ec_pem(EC_KEY).unwrap();
    let mut keys = Vec::new();
    for (kid, key, alg) in [
        ("r1", &rsa, Algorithm::RS256),
        ("e1", &ec, Algorithm::ES256),
    ] {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        keys.push(jwk);
    }
    let jwks = serde_json::to_vec(&JwkSet { keys }).unwrap();
    let mut v = JwtVerifier::new(None, None);
    assert_eq!(v.add_jwks(&jwks).unwrap(), 2);
    let gw = Gateway::start(|c| c.jwt = Some(Arc::new(v))).await;
    let signed = |kid: &str, alg, key| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &json!({"sub": kid, "exp": now() + 600}), key).unwrap()
    };
    for token in [
        signed("r1", Algorithm::RS256, &rsa),
        signed("e1", Algorithm::ES256, &ec),
    ] {
        assert_eq!(
            call(&gw, "GET", "/sessions", &token, None).await.status(),
            200
        );
    }
    // A kid that names the other key does not verify.
    let wrong = signed("e1", Algorithm::RS256, &rsa);
    assert_problem(call(&gw, "GET", "/sessions", &wrong, None).await, 401).await;
    gw.stop().await;
}

/// Refusals in process: each answers 401 problem+json, and the same claims
/// with the flaw removed pass (so each case can fail).
#[tokio::test]
async fn bad_tokens_are_refused_with_401() {
    let mut v = JwtVerifier::new(Some("https://issuer.test".into()), Some("agentgate".into()));
    v.add_public_key_pem(RSA_PUB).unwrap();
    let gw = Gateway::start(|c| c.jwt = Some(Arc::new(v))).await;
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
    let good = json!({"sub": "alice", "exp": now() + 600, "iss": "https://issuer.test", "aud": "agentgate"});
    let with = |key: &str, value: Value| {
        let mut c = good.clone();
        c[key] = value;
        c
    };
    let rs = |claims: &Value| mint(Algorithm::RS256, &rsa, claims);
    let ok = rs(&good);
    assert_eq!(call(&gw, "GET", "/sessions", &ok, None).await.status(), 200);
    // Within the 30 s leeway: still good.
    let late = rs(&with("exp", json!(now() - 10)));
    assert_eq!(
        call(&gw, "GET", "/sessions", &late, None).await.status(),
        200
    );

    let mut no_sub = good.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let mut tampered = ok.clone();
    // A character inside the signature, not its last one: the last one of
    // unpadded base64url carries spare bits, and a change there can make the
    // token malformed instead of wrongly signed.
    let at = tampered.len() - 10;
    let was = tampered.as_bytes()[at];
    tampered.replace_range(at..at + 1, if was == b'A' { "B" } else { "A" });
    let cases = [
        ("expired", rs(&with("exp", json!(now() - 120)))),
        ("nbf in the future", rs(&with("nbf", json!(now() + 120)))),
        ("wrong issuer", rs(&with("iss", json!("https://evil.test")))),
        ("wrong audience", rs(&with("aud", json!("other")))),
        ("no sub", rs(&no_sub)),
        ("empty sub", rs(&with("sub", json!("")))),
        ("no exp", rs(&no_exp)),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
        ),
        (
            "HS256 signed with the RSA public key as the secret",
            mint(Algorithm::HS256, &EncodingKey::from_secret(RSA_PUB), &good),
        ),
        (
            "ES256 from a key the gateway does not know",
            mint(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
                &good,
            ),
        ),
        ("tampered signature", tampered),
        ("not a JWT", "hello".to_string()),
    ];
    for (what, token) in &cases {
        let res = call(&gw, "GET", "/sessions", token, None).await;
        assert_eq!(res.status(), 401, "{what}");
        assert_problem(res, 401).await;
    }
    gw.stop().await;
}

/// The real binary with `--jwt-public-key` and JSON logs: refused
/// credentials leave one `audit` line each with the reason, never the token;
/// a session's create and delete leave theirs with the owner.
#[tokio::test]
async fn refused_credentials_and_session_changes_are_audited_without_tokens() {
    use std::io::Read;
    use std::process::Stdio;
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("rsa.pub");
    std::fs::write(&key, RSA_PUB).unwrap();
    let mut child = KillOnDrop(
        sealed_command(home.path())
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--jwt-public-key")
            .arg(&key)
            .args(["--token", OPERATOR])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let line = first_line(child.stdout.take().unwrap(), T);
    let base = line
        .strip_prefix("agentgate listening on ")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let http = reqwest::Client::new();
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
    let expired = mint(
        Algorithm::RS256,
        &rsa,
        &json!({"sub": "mallory", "exp": now() - 600}),
    );
    let confused = mint(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUB),
        &json!({"sub": "mallory", "exp": now() + 600}),
    );
    let no_sub = mint(Algorithm::RS256, &rsa, &json!({"exp": now() + 600}));
    let mut tampered = mint(
        Algorithm::RS256,
        &rsa,
        &json!({"sub": "mallory", "exp": now() + 600}),
    );
    // A character inside the signature, not its last one: the last one of
    // unpadded base64url carries spare bits, and a change there can make the
    // token malformed instead of wrongly signed.
    let at = tampered.len() - 10;
    let was = tampered.as_bytes()[at];
    tampered.replace_range(at..at + 1, if was == b'A' { "B" } else { "A" });
    for token in [&expired, &confused, &no_sub, &tampered] {
        let res = http
            .get(format!("{base}/sessions"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_problem(res, 401).await;
    }
    let alice = mint(
        Algorithm::RS256,
        &rsa,
        &json!({"sub": "alice", "exp": now() + 600}),
    );
    let s: Value = http
        .post(format!("{base}/sessions"))
        .bearer_auth(&alice)
        .json(&json!({"agent": "demo"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = s["id"].as_str().unwrap().to_string();
    let res = http
        .delete(format!("{base}/sessions/{id}"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let log = stderr.join().unwrap();
    for secret in [
        &expired,
        &confused,
        &no_sub,
        &tampered,
        &alice,
        &OPERATOR.to_string(),
    ] {
        let sig = secret.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "a token is in the log: {log}");
    }
    let audit: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "audit")
        .collect();
    let refused: Vec<&str> = audit
        .iter()
        .filter(|l| l["fields"]["action"] == "credential.refused")
        .map(|l| l["fields"]["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        refused,
        [
            "expired",
            "no key for this algorithm",
            "missing sub",
            "bad signature"
        ],
        "{log}"
    );
    for action in ["session.create", "session.delete"] {
        let line = audit
            .iter()
            .find(|l| l["fields"]["action"] == action)
            .unwrap_or_else(|| panic!("no {action} audit line: {log}"));
        assert_eq!(line["fields"]["owner"], "alice", "{line}");
        assert_eq!(line["fields"]["session_id"], id.as_str(), "{line}");
    }
}

/// Every route of alice's session answers bob exactly as for a session that
/// does not exist; alice herself gets the route's own answers, and the
/// operator (token or admin JWT) reaches it too.
#[tokio::test]
async fn another_owner_gets_404_on_every_route_of_a_session() {
    let gw = gateway(|_| {}).await;
    let alice = user("alice");
    let bob = user("bob");
    let admin = hs(json!({"sub": "root", "exp": now() + 600, "scope": "read agentgate:admin"}));
    let s = create(&gw, &alice, json!({"agent": "sed"})).await;
    let id = s["id"].as_str().unwrap().to_string();
    let res = call(
        &gw,
        "POST",
        &format!("/sessions/{id}/messages?wait=true"),
        &alice,
        Some(json!({"content": "hi"})),
    )
    .await;
    assert_eq!(res.status(), 200);
    let mid = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // (method, path, body, alice's status)
    let routes: Vec<(&str, String, Option<Value>, u16)> = vec![
        ("GET", format!("/sessions/{id}"), None, 200),
        (
            "PATCH",
            format!("/sessions/{id}"),
            Some(json!({"title": "t"})),
            200,
        ),
        ("POST", format!("/sessions/{id}/fork"), Some(json!({})), 400),
        ("GET", format!("/sessions/{id}/messages"), None, 200),
        (
            "POST",
            format!("/sessions/{id}/messages?wait=true"),
            Some(json!({"content": "x"})),
            200,
        ),
        ("GET", format!("/sessions/{id}/messages/{mid}"), None, 200),
        ("POST", format!("/sessions/{id}/interrupt"), None, 409),
        (
            "POST",
            format!("/sessions/{id}/permissions/req-1"),
            Some(json!({"behavior": "allow"})),
            404,
        ),
        ("GET", format!("/sessions/{id}/events"), None, 200),
        ("DELETE", format!("/sessions/{id}"), None, 204),
    ];
    let unknown = format!("no session {id}");
    for (method, path, body, _) in &routes {
        let res = call(&gw, method, path, &bob, body.clone()).await;
        let problem = assert_problem(res, 404).await;
        assert_eq!(problem["detail"], unknown.as_str(), "{method} {path}");
    }
    // The event stream's query token is bob's too.
    let res = gw
        .get(&format!("/sessions/{id}/events?access_token={bob}"))
        .await;
    assert_problem(res, 404).await;
    assert!(ids(&gw, &bob, "").await.is_empty());
    // The session is untouched by bob: still there, one message, old title.
    for token in [OPERATOR, admin.as_str()] {
        let res = call(&gw, "GET", &format!("/sessions/{id}"), token, None).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["message_count"], 1);
    }
    for (method, path, body, status) in &routes {
        let res = call(&gw, method, path, &alice, body.clone()).await;
        assert_eq!(res.status().as_u16(), *status, "alice: {method} {path}");
        if *status == 404 {
            let problem = assert_problem(res, 404).await;
            assert_ne!(problem["detail"], unknown.as_str(), "{method} {path}");
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn owners_list_their_own_and_operators_filter_by_owner() {
    let gw = gateway(|_| {}).await;
    let (alice, bob) = (user("alice"), user("bob"));
    let admin = hs(json!({"sub": "root", "exp": now() + 600, "scope": ["agentgate:admin"]}));
    let a1 = create(&gw, &alice, json!({"agent": "sed"})).await["id"].clone();
    let a2 = create(&gw, &alice, json!({"agent": "sed"})).await["id"].clone();
    let b1 = create(&gw, &bob, json!({"agent": "sed"})).await["id"].clone();
    let op = create(&gw, OPERATOR, json!({"agent": "sed"})).await["id"].clone();
    let s = |v: &[&Value]| {
        v.iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&gw, &alice, "").await, s(&[&a1, &a2]));
    assert_eq!(ids(&gw, &bob, "").await, s(&[&b1]));
    assert_eq!(ids(&gw, OPERATOR, "").await, s(&[&a1, &a2, &b1, &op]));
    assert_eq!(ids(&gw, &admin, "").await.len(), 4);
    assert_eq!(ids(&gw, OPERATOR, "?owner=alice").await, s(&[&a1, &a2]));
    assert_eq!(ids(&gw, &admin, "?owner=bob").await, s(&[&b1]));
    // An owner's filter never widens what it sees.
    assert!(ids(&gw, &alice, "?owner=bob").await.is_empty());
    // The operator's own session is no owner's.
    let res = call(
        &gw,
        "GET",
        &format!("/sessions/{}", op.as_str().unwrap()),
        &alice,
        None,
    )
    .await;
    assert_problem(res, 404).await;
    gw.stop().await;
}

#[tokio::test]
async fn the_agents_claim_limits_profiles_with_403() {
    let gw = gateway(|_| {}).await;
    let sed_only = hs(json!({"sub": "carol", "exp": now() + 600, "agents": ["sed"]}));
    for body in [json!({"agent": "python"}), json!({})] {
        let res = call(&gw, "POST", "/sessions", &sed_only, Some(body)).await;
        assert_problem(res, 403).await;
    }
    let res = call(
        &gw,
        "POST",
        "/oneshot",
        &sed_only,
        Some(json!({"content": "x", "agent": "demo"})),
    )
    .await;
    assert_problem(res, 403).await;
    let s = create(&gw, &sed_only, json!({"agent": "sed"})).await;
    assert_eq!(s["owner"], "carol");
    let agents: Value = call(&gw, "GET", "/agents", &sed_only, None)
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sed"]);
    // Without the claim, every profile.
    let res = call(
        &gw,
        "POST",
        "/sessions",
        &user("dave"),
        Some(json!({"agent": "python"})),
    )
    .await;
    assert_eq!(res.status(), 201);
    gw.stop().await;
}

#[tokio::test]
async fn the_per_owner_limit_answers_429_for_that_owner_only() {
    let gw = gateway(|c| c.max_sessions_per_owner = Some(2)).await;
    let alice = user("alice");
    let first = create(&gw, &alice, json!({"agent": "sed"})).await;
    create(&gw, &alice, json!({"agent": "sed"})).await;
    let res = call(
        &gw,
        "POST",
        "/sessions",
        &alice,
        Some(json!({"agent": "sed"})),
    )
    .await;
    let problem = assert_problem(res, 429).await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("--max-sessions-per-owner"));
    // No third session by a fork either (sed cannot fork at all).
    let res = call(
        &gw,
        "POST",
        &format!("/sessions/{}/fork", first["id"].as_str().unwrap()),
        &alice,
        Some(json!({})),
    )
    .await;
    assert_ne!(res.status(), 201);
    create(&gw, &user("bob"), json!({"agent": "sed"})).await;
    create(&gw, OPERATOR, json!({"agent": "sed"})).await;
    let res = call(
        &gw,
        "DELETE",
        &format!("/sessions/{}", first["id"].as_str().unwrap()),
        &alice,
        None,
    )
    .await;
    assert_eq!(res.status(), 204);
    create(&gw, &alice, json!({"agent": "sed"})).await;
    gw.stop().await;
}

/// `cwd_template`: each owner's child runs in its own directory under the
/// template's base, whatever the `sub` holds.
#[tokio::test]
async fn cwd_template_keeps_every_owner_under_the_template_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let base = root.join("work");
    std::fs::create_dir(&base).unwrap();
    let toml = format!(
        r#"
[agents.pwd]
command = ["sh", "-c", "while read l; do pwd; echo __END__; done"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"
cwd_template = "{}/{{owner}}"
"#,
        base.display()
    );
    let gw = gateway(|c| c.add_profiles_toml("pwd", &toml).unwrap()).await;
    let long = "ü/..".repeat(2000);
    let subs = [
        "alice",
        "../../etc",
        "..",
        ".",
        "/",
        "a/b",
        "/etc/passwd",
        " . ",
        "%2F",
        "~",
        "a\\b",
        "日本/語",
        "x\u{0}y",
        &long,
    ];
    // An empty-ish `sub` names nobody: refused before any directory.
    for sub in ["", " ", "\t\n"] {
        let res = call(
            &gw,
            "POST",
            "/sessions",
            &user(sub),
            Some(json!({"agent": "pwd"})),
        )
        .await;
        assert_problem(res, 401).await;
    }
    let mut seen = std::collections::HashSet::new();
    for sub in subs {
        let token = user(sub);
        let s = create(&gw, &token, json!({"agent": "pwd"})).await;
        let cwd = std::path::PathBuf::from(s["cwd"].as_str().unwrap());
        assert_eq!(cwd.parent(), Some(base.as_path()), "{sub:?}: {cwd:?}");
        assert!(cwd.is_dir(), "{sub:?}");
        assert!(seen.insert(cwd.clone()), "{sub:?} shares {cwd:?}");
        let path = format!("/sessions/{}/messages?wait=true", s["id"].as_str().unwrap());
        let m: Value = call(&gw, "POST", &path, &token, Some(json!({"content": "x"})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            m["output"].as_str().unwrap().trim(),
            cwd.display().to_string(),
            "{sub:?}"
        );
        // An owner cannot pick a directory outside its own.
        let res = call(
            &gw,
            "POST",
            "/sessions",
            &token,
            Some(json!({"agent": "pwd", "cwd": root.display().to_string()})),
        )
        .await;
        assert_problem(res, 400).await;
    }
    // Nothing was made anywhere but one directory per owner under the base.
    let made: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(made, ["work"]);
    assert_eq!(std::fs::read_dir(&base).unwrap().count(), subs.len());
    gw.stop().await;
}

/// A restored session keeps its owner: alice still reaches it after a
/// restart on the same SQLite store; bob still does not.
#[tokio::test]
async fn the_owner_survives_a_restart_on_a_durable_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentgate.db");
    let durable = |c: &mut agentgate::Config| {
        c.store = agentgate::store::StoreSpec::Sqlite(db.clone());
    };
    let alice = user("alice");
    let gw = gateway(durable).await;
    let id = create(&gw, &alice, json!({"agent": "sed"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    gw.stop().await;
    // The stopped gateway's last tasks let go of the store (its lock) soon
    // after it returns: wait until it opens, then start the next one.
    let spec = agentgate::store::StoreSpec::Sqlite(db.clone());
    eventually(T, || {
        let spec = spec.clone();
        async move { agentgate::store::Store::open(&spec).await.is_ok() }
    })
    .await;
    let gw = gateway(durable).await;
    let res = call(&gw, "GET", &format!("/sessions/{id}"), &alice, None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["owner"], "alice");
    let res = call(&gw, "GET", &format!("/sessions/{id}"), &user("bob"), None).await;
    assert_problem(res, 404).await;
    assert_eq!(ids(&gw, OPERATOR, "?owner=alice").await, [id]);
    gw.stop().await;
}

#[tokio::test]
async fn a_jwt_in_the_query_works_on_the_event_stream_only() {
    let gw = gateway(|_| {}).await;
    let alice = user("alice");
    let id = create(&gw, &alice, json!({"agent": "sed"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = gw
        .get(&format!("/sessions/{id}/events?access_token={alice}"))
        .await;
    assert_eq!(res.status(), 200);
    drop(res);
    let res = gw
        .get(&format!("/sessions/{id}?access_token={alice}"))
        .await;
    assert_problem(res, 401).await;
    gw.stop().await;
}

/// A JWT key counts as a credential: the gateway listens on a public
/// address with one (it refuses to without any, see tests/binary.rs).
#[test]
fn a_jwt_key_allows_a_public_listen_address() {
    use std::process::Stdio;
    let home = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        sealed_command(home.path())
            .args(["--listen", "0.0.0.0:0", "--jwt-secret", SECRET])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let line = first_line(child.stdout.take().unwrap(), T);
    assert!(line.starts_with("agentgate listening on "), "{line:?}");
}

/// `--max-event-streams-per-owner`: one owner's streams past the cap get 429;
/// other owners and the operator still open theirs; a closed stream gives
/// its place back.
#[tokio::test]
async fn each_owner_has_its_own_share_of_event_streams() {
    let gw = gateway(|c| {
        c.max_event_streams_per_owner = 2;
        // A closed stream is noticed at its next write: heartbeat often.
        c.heartbeat = Duration::from_millis(50);
    })
    .await;
    let alice = user("alice");
    let bob = user("bob");
    let a = create(&gw, &alice, json!({"agent": "sed"})).await;
    let a = a["id"].as_str().unwrap().to_string();
    let b = create(&gw, &bob, json!({"agent": "sed"})).await;
    let b = b["id"].as_str().unwrap().to_string();
    let events = |id: &str| format!("/sessions/{id}/events");
    let first = call(&gw, "GET", &events(&a), &alice, None).await;
    assert_eq!(first.status(), 200);
    let second = call(&gw, "GET", &events(&a), &alice, None).await;
    assert_eq!(second.status(), 200);
    let res = call(&gw, "GET", &events(&a), &alice, None).await;
    let problem = assert_problem(res, 429).await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("--max-event-streams-per-owner"));
    let theirs = call(&gw, "GET", &events(&b), &bob, None).await;
    assert_eq!(theirs.status(), 200);
    let operator = call(&gw, "GET", &events(&a), OPERATOR, None).await;
    assert_eq!(operator.status(), 200);
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let again = loop {
        let res = call(&gw, "GET", &events(&a), &alice, None).await;
        if res.status() == 200 {
            break res;
        }
        assert_eq!(res.status(), 429);
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed stream never gave its place back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop((again, second, theirs, operator));
    gw.stop().await;
}
