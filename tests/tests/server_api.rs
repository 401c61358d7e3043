//! The HTTP contract: leases, bad input (each with its status and code, and no change in etcd),
//! service routes and the OpenAPI document.

use std::collections::BTreeSet;

use anyhow::Result;
use leasehold_tests::{Api, EtcdCluster, TestServer, revision};
use serde_json::{Value, json};

/// Lease routes: grant (TTL raised to etcd's minimum), keepalive, show with owner and locks
/// held, revoke frees every lock; each answers 404 `lease_not_found` once the lease is gone.
#[tokio::test]
async fn lease_lifecycle() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());

    let (status, lease) = api
        .post("/v1/leases", json!({"ttl": "1s", "owner": "alice"}))
        .await?;
    assert_eq!(status, 201, "{lease}");
    assert_eq!(lease["ttl_ms"], 2000, "etcd's minimum TTL is granted");
    assert_eq!(lease["owner"], "alice");
    let id = lease["lease_id"].as_str().unwrap().to_owned();

    let (status, kept) = api
        .post(&format!("/v1/leases/{id}/keepalive"), json!({}))
        .await?;
    assert_eq!(
        (status, &kept["lease_id"], &kept["ttl_ms"]),
        (200, &json!(id), &json!(2000))
    );

    let (_, held) = api
        .post("/v1/locks/x%2Fy/acquire", json!({"lease_id": id}))
        .await?;
    assert_eq!(
        held["owner"], "alice",
        "the lock's owner defaults to the lease's"
    );
    let (_, other) = api.acquire_ttl("z", "10s", "0s").await?;
    // Waiting for "z" under our lease does not count as holding it.
    let (status, _) = api
        .post("/v1/locks/z/acquire", json!({"lease_id": id, "wait": "0s"}))
        .await?;
    assert_eq!(status, 409);

    let (status, info) = api.get(&format!("/v1/leases/{id}")).await?;
    assert_eq!(status, 200);
    assert_eq!(info["locks"], json!(["x/y"]));
    assert_eq!(info["owner"], "alice");
    assert_eq!(info["ttl_ms"], 2000);
    assert!(info["remaining_ms"].as_u64().unwrap() <= 2000);

    let (status, body) = api.delete(&format!("/v1/leases/{id}")).await?;
    assert_eq!((status, body), (204, Value::Null));
    let (_, lock) = api.get("/v1/locks/x%2Fy").await?;
    assert_eq!(
        lock["holder"],
        Value::Null,
        "revoking the lease freed its lock"
    );
    let (_, lock) = api.get("/v1/locks/z").await?;
    assert_eq!(lock["holder"]["token"], other["token"]);

    for (status, body) in [
        api.post(&format!("/v1/leases/{id}/keepalive"), json!({}))
            .await?,
        api.get(&format!("/v1/leases/{id}")).await?,
        api.delete(&format!("/v1/leases/{id}")).await?,
        api.post("/v1/locks/q/acquire", json!({"lease_id": id}))
            .await?,
    ] {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("lease_not_found"))
        );
    }
    Ok(())
}

/// Every bad input gets its status and stable code, and etcd's revision is unchanged.
#[tokio::test]
async fn bad_inputs_are_rejected_without_touching_etcd() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("held", "30s", "0s").await?;
    let token = held["token"].as_u64().unwrap();
    let handle = held["handle"].as_str().unwrap().to_owned();
    let mut client = etcd.client().await?;

    let long_name = "n".repeat(257);
    let big = format!("{{\"ttl\":\"10s\",\"owner\":\"{}\"}}", "x".repeat(1 << 20));
    // Above the 1 KiB bound on owners and candidates' values, well under the body limit.
    let long_owner = format!("{{\"ttl\":\"10s\",\"owner\":\"{}\"}}", "x".repeat(1025));
    let long_value = format!("{{\"ttl\":\"10s\",\"value\":\"{}\"}}", "x".repeat(1025));
    enum Req {
        Post(String, String),
        /// With the holder's handle in `Leasehold-Handle`.
        PostHeld(String, String),
        Get(String),
        Delete(String),
        Put(String),
    }
    use Req::*;
    let p = |path: &str, body: &str| Post(path.to_owned(), body.to_owned());
    let held_p = |path: &str, body: &str| PostHeld(path.to_owned(), body.to_owned());
    let acquire = |body: &str| p("/v1/locks/a/acquire", body);
    let cases: Vec<(Req, u16, &str)> = vec![
        (acquire("{"), 400, "invalid_json"),
        (acquire(""), 400, "invalid_json"),
        (acquire("[1,2]"), 400, "invalid_request"),
        (acquire(r#"{"ttl": 10}"#), 400, "invalid_ttl"),
        (acquire(r#"{"ttl": "abc"}"#), 400, "invalid_ttl"),
        (acquire(r#"{"ttl": "0s"}"#), 400, "invalid_ttl"),
        (acquire(r#"{"ttl": "2h"}"#), 400, "invalid_ttl"),
        (
            acquire(r#"{"ttl": "10s", "wait": "abc"}"#),
            400,
            "invalid_wait",
        ),
        (
            acquire(r#"{"ttl": "10s", "wait": "6m"}"#),
            400,
            "invalid_wait",
        ),
        (acquire(r#"{"ttl": "10s", "wait": 5}"#), 400, "invalid_wait"),
        (
            acquire(r#"{"ttl": "10s", "owner": 5}"#),
            400,
            "invalid_request",
        ),
        (acquire(&long_owner), 400, "invalid_request"),
        (
            p("/v1/elections/e/campaign", &long_value),
            400,
            "invalid_request",
        ),
        (
            p("/v1/elections/e/campaign", r#"{"ttl": "10s", "value": 5}"#),
            400,
            "invalid_request",
        ),
        (acquire(r#"{"lease_id": 5}"#), 400, "invalid_request"),
        (
            acquire(r#"{"lease_id": "00000000000000ab", "ttl": "10s"}"#),
            400,
            "invalid_request",
        ),
        (acquire(r#"{}"#), 400, "invalid_request"),
        (
            acquire(r#"{"lease_id": "00000000000000ab"}"#),
            403,
            "forbidden",
        ),
        (
            acquire(r#"{"lease_id": "not-a-lease"}"#),
            404,
            "lease_not_found",
        ),
        (acquire(r#"{"lease_id": "0"}"#), 404, "lease_not_found"),
        (acquire(&big), 413, "body_too_large"),
        (p("/v1/leases", &big), 413, "body_too_large"),
        (
            p("/v1/locks//acquire", r#"{"ttl":"10s"}"#),
            400,
            "invalid_name",
        ),
        (
            p(
                &format!("/v1/locks/{long_name}/acquire"),
                r#"{"ttl":"10s"}"#,
            ),
            400,
            "invalid_name",
        ),
        (
            p("/v1/locks/a%0Ab/acquire", r#"{"ttl":"10s"}"#),
            400,
            "invalid_name",
        ),
        (
            p("/v1/locks/a%7Fb/acquire", r#"{"ttl":"10s"}"#),
            400,
            "invalid_name",
        ),
        (
            p("/v1/locks/%FF/acquire", r#"{"ttl":"10s"}"#),
            400,
            "invalid_name",
        ),
        (Get("/v1/locks/%00".into()), 400, "invalid_name"),
        (
            p("/v1/locks/held/renew", r#"{"token": "1"}"#),
            400,
            "invalid_request",
        ),
        (p("/v1/locks/held/renew", r#"{}"#), 400, "invalid_request"),
        (
            p("/v1/locks/held/release", r#"{"token": -3}"#),
            400,
            "invalid_request",
        ),
        // The holder's token without its handle: refused, nothing released.
        (
            p(
                "/v1/locks/held/release",
                &format!(r#"{{"token": {token}}}"#),
            ),
            403,
            "forbidden",
        ),
        (
            p("/v1/locks/held/renew", &format!(r#"{{"token": {token}}}"#)),
            403,
            "forbidden",
        ),
        (
            held_p(
                "/v1/locks/held/release",
                &format!(r#"{{"token": {}}}"#, token + 1),
            ),
            409,
            "not_holder",
        ),
        (
            held_p(
                "/v1/locks/held/release",
                &format!(r#"{{"token": {}}}"#, token - 1),
            ),
            409,
            "not_holder",
        ),
        (
            held_p("/v1/locks/held/renew", r#"{"token": 0}"#),
            409,
            "not_holder",
        ),
        (
            held_p("/v1/locks/free/release", r#"{"token": 1}"#),
            409,
            "not_holder",
        ),
        (p("/v1/leases", r#"{}"#), 400, "invalid_ttl"),
        (p("/v1/leases", r#"{"ttl": "abc"}"#), 400, "invalid_ttl"),
        (
            p("/v1/leases", r#"{"ttl": "10s", "owner": []}"#),
            400,
            "invalid_request",
        ),
        (
            p("/v1/leases/00000000000000ab/keepalive", ""),
            403,
            "forbidden",
        ),
        (p("/v1/leases/xyz/keepalive", ""), 404, "lease_not_found"),
        (
            Get("/v1/leases/00000000000000ab".into()),
            404,
            "lease_not_found",
        ),
        (
            Delete("/v1/leases/00000000000000ab".into()),
            403,
            "forbidden",
        ),
        (Get("/v2/nothing".into()), 404, "not_found"),
        (Delete("/v1/locks/a".into()), 405, "method_not_allowed"),
        (Put("/v1/leases".into()), 405, "method_not_allowed"),
        (Get("/v1/locks/a/acquire".into()), 405, "method_not_allowed"),
    ];
    let before = revision(&mut client).await?;
    for (req, want_status, want_code) in cases {
        let url = |path: &str| format!("{}{path}", api.base());
        let (label, request) = match &req {
            Post(path, body) => (
                format!("POST {path} {}", &body[..body.len().min(60)]),
                api.http().post(url(path)).body(body.clone()),
            ),
            PostHeld(path, body) => (
                format!("POST {path} {body} (holder's handle)"),
                api.http()
                    .post(url(path))
                    .header(leasehold_tests::HANDLE_HEADER, &handle)
                    .body(body.clone()),
            ),
            Get(path) => (format!("GET {path}"), api.http().get(url(path))),
            Delete(path) => (format!("DELETE {path}"), api.http().delete(url(path))),
            Put(path) => (format!("PUT {path}"), api.http().put(url(path))),
        };
        let response = request
            .header("content-type", "application/json")
            .send()
            .await?;
        let status = response.status().as_u16();
        let body: Value = serde_json::from_slice(&response.bytes().await?)
            .unwrap_or_else(|err| panic!("{label}: body is not JSON: {err}"));
        assert_eq!(status, want_status, "{label}: {body}");
        assert_eq!(body["error"]["code"], want_code, "{label}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{label}"
        );
        assert_eq!(revision(&mut client).await?, before, "{label} changed etcd");
    }
    Ok(())
}

/// `/healthz` and `/readyz` answer 200 with etcd up.
#[tokio::test]
async fn health_and_readiness() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    assert_eq!(api.get("/healthz").await?, (200, json!({"status": "ok"})));
    assert_eq!(api.get("/readyz").await?, (200, json!({"status": "ready"})));
    Ok(())
}

/// The server starts while etcd is down and reports itself not ready.
#[tokio::test]
async fn starts_without_etcd() -> Result<()> {
    let port = leasehold_tests::free_port()?;
    let config = leasehold_server::Config::default()
        .with_etcd_endpoints([format!("http://127.0.0.1:{port}")])
        .with_etcd_timeout(std::time::Duration::from_secs(1));
    let server = TestServer::start_with(config).await?;
    let api = Api::new(server.url());
    assert_eq!(api.get("/healthz").await?.0, 200);
    assert_eq!(api.get("/readyz").await?.0, 503);
    let (status, body) = api.acquire_ttl("a", "10s", "0s").await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("store_unavailable"))
    );
    Ok(())
}

/// `/openapi.json` is an OpenAPI 3 document listing exactly the routes the server serves, and
/// every route it lists is served (not 404 `not_found`, not 405).
#[tokio::test]
async fn openapi_lists_every_route() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (status, doc) = api.get("/openapi.json").await?;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: BTreeSet<String> = [
        "POST /v1/leases",
        "POST /v1/leases/{lease_id}/keepalive",
        "GET /v1/leases/{lease_id}",
        "DELETE /v1/leases/{lease_id}",
        "POST /v1/locks/{name}/acquire",
        "POST /v1/locks/{name}/renew",
        "POST /v1/locks/{name}/release",
        "GET /v1/locks/{name}",
        "POST /v1/locks/acquire",
        "POST /v1/locks/release",
        "GET /v1/locks/acquire",
        "GET /v1/locks/release",
        "GET /v1/locks",
        "GET /v1/leases",
        "GET /v1/locks/{name}/watch",
        "GET /v1/events",
        "POST /v1/elections/{name}/campaign",
        "POST /v1/elections/{name}/resign",
        "GET /v1/elections/{name}",
        "GET /v1/elections/{name}/observe",
        "GET /ui",
        "GET /healthz",
        "GET /readyz",
        "GET /openapi.json",
        "GET /metrics",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, expected);

    for route in &documented {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path
            .replace("{lease_id}", "00000000000000ab")
            .replace("{name}", "probe");
        let url = format!("{}{path}", api.base());
        let request = match method {
            "GET" => api.http().get(url),
            "POST" => api.http().post(url).body("{}"),
            "DELETE" => api.http().delete(url),
            other => panic!("unexpected method {other}"),
        };
        let response = request.send().await?;
        let status = response.status().as_u16();
        let json = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
        // An event stream never ends: its headers are enough.
        let body: Value = if json {
            response.json().await?
        } else {
            Value::Null
        };
        assert_ne!(
            body["error"]["code"], "not_found",
            "{route} is documented but not served"
        );
        assert_ne!(
            status, 405,
            "{route} is documented but not served with that method"
        );
    }
    Ok(())
}

/// A lease granted directly in etcd has no handle, so nothing can act on it through Leasehold:
/// whatever handle is sent, it names another lease. Nothing changes in etcd.
#[tokio::test]
async fn leases_granted_outside_leasehold_are_refused() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let mut client = etcd.client().await?;
    let lease = format!("{:016x}", client.lease_grant(7, None).await?.id());
    let before = revision(&mut client).await?;
    let guessed = "guessedhandleguessedhandle";
    let (status, body) = api
        .post_with_handle(
            "/v1/locks/foreign/acquire",
            json!({"lease_id": lease}),
            Some(guessed),
        )
        .await?;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("forbidden")));
    let (status, _) = api
        .post_with_handle(
            &format!("/v1/leases/{lease}/keepalive"),
            json!({}),
            Some(guessed),
        )
        .await?;
    assert_eq!(status, 403);
    let (status, _) = api.get(&format!("/v1/leases/{lease}")).await?;
    assert_eq!(status, 404, "not a Leasehold lease");
    assert_eq!(revision(&mut client).await?, before);
    Ok(())
}

/// Two deployments whose `--prefix` values nest would read each other's keys: the second one
/// refuses to start, naming both prefixes. Equal prefixes (replicas) and disjoint ones start.
#[tokio::test]
async fn nested_prefixes_are_refused_at_start() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let config = |prefix: &str| {
        leasehold_server::Config::default()
            .with_etcd_endpoints(etcd.endpoints())
            .with_prefix(prefix)
    };
    let run = |config: leasehold_server::Config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        tokio::time::timeout(
            std::time::Duration::from_secs(2),
            leasehold_server::run(listener, config, std::future::pending()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("still running"))
        .and_then(|r| r.map_err(anyhow::Error::from))
    };
    assert!(
        run(config("/team-a"))
            .await
            .is_err_and(|e| e.to_string() == "still running")
    );
    assert!(
        run(config("/team-a/"))
            .await
            .is_err_and(|e| e.to_string() == "still running")
    );
    assert!(
        run(config("/team-ab"))
            .await
            .is_err_and(|e| e.to_string() == "still running")
    );
    for nested in ["/team-a/inner", "/"] {
        let err = run(config(nested)).await.unwrap_err().to_string();
        assert!(
            err.contains("nests with") && err.contains("/team-a"),
            "{nested}: {err}"
        );
    }
    Ok(())
}
