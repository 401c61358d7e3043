//! Security, tried as a hostile client would: holds and leases only their owner (the holder of
//! the lease's handle) can end; tenants never see or touch each other's names or leases; quotas
//! stop floods before etcd fills; handles never reach logs or metrics; the API speaks HTTPS (with
//! certificate reload) and the server reaches an etcd that requires TLS, client certificates and
//! a user and password.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold_tests::{
    Api, EtcdCluster, ServerProcess, TestPki, TestServer, keys_under, revision, server_bin,
};
use serde_json::{Value, json};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// The attack from the issue, step by step: a client that knows only what `GET` and `409`
/// answers reveal (owner, token, lease id) can end nothing, and etcd does not change.
#[tokio::test]
async fn what_status_and_conflicts_reveal_ends_nothing() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let alice = Api::new(server.url());
    let mallory = alice.without_handles();
    let (status, held) = alice
        .post(
            "/v1/locks/seat-7/acquire",
            json!({"ttl": "30s", "owner": "alice"}),
        )
        .await?;
    ensure!(status == 200, "{held}");
    let handle = held["handle"]
        .as_str()
        .context("a ttl acquire returns a handle")?;
    ensure!(handle.len() >= 22, "at least 128 bits: {handle}");

    // What mallory can see: owner, token, lease id, never a handle.
    let (_, seen) = mallory.get("/v1/locks/seat-7").await?;
    ensure!(seen["holder"]["owner"] == "alice" && seen["holder"]["token"] == held["token"]);
    ensure!(
        !seen.to_string().contains(handle),
        "status leaks the handle: {seen}"
    );
    let lease = seen["holder"]["lease_id"]
        .as_str()
        .context("lease id")?
        .to_owned();
    let (status, conflict) = mallory.acquire_ttl("seat-7", "30s", "0s").await?;
    ensure!(
        status == 409 && !conflict.to_string().contains(handle),
        "{conflict}"
    );

    let mut client = etcd.client().await?;
    let before = revision(&mut client).await?;
    let token = &held["token"];
    let guessed = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for (what, status, body) in [
        (
            "release, no handle",
            mallory
                .post("/v1/locks/seat-7/release", json!({"token": token}))
                .await?,
        ),
        (
            "renew, no handle",
            mallory
                .post("/v1/locks/seat-7/renew", json!({"token": token}))
                .await?,
        ),
        (
            "keepalive, no handle",
            mallory
                .post(&format!("/v1/leases/{lease}/keepalive"), json!({}))
                .await?,
        ),
        (
            "revoke, no handle",
            mallory.delete(&format!("/v1/leases/{lease}")).await?,
        ),
        (
            "acquire under her lease, no handle",
            mallory
                .post("/v1/locks/seat-7/acquire", json!({"lease_id": lease}))
                .await?,
        ),
        (
            "release, guessed handle",
            mallory
                .post_with_handle(
                    "/v1/locks/seat-7/release",
                    json!({"token": token}),
                    Some(guessed),
                )
                .await?,
        ),
        (
            "renew, guessed handle",
            mallory
                .post_with_handle(
                    "/v1/locks/seat-7/renew",
                    json!({"token": token}),
                    Some(guessed),
                )
                .await?,
        ),
        (
            "keepalive, guessed handle",
            mallory
                .post_with_handle(
                    &format!("/v1/leases/{lease}/keepalive"),
                    json!({}),
                    Some(guessed),
                )
                .await?,
        ),
        (
            "acquire under her lease, guessed handle",
            mallory
                .post_with_handle(
                    "/v1/locks/seat-7/acquire",
                    json!({"lease_id": lease}),
                    Some(guessed),
                )
                .await?,
        ),
    ]
    .map(|(what, (status, body))| (what, status, body))
    {
        ensure!(
            status == 403 && code(&body) == "forbidden",
            "{what}: {status} {body}"
        );
    }
    let revoke = mallory
        .http()
        .delete(format!("{}/v1/leases/{lease}", server.url()))
        .header(leasehold_tests::HANDLE_HEADER, guessed)
        .send()
        .await?;
    ensure!(
        revoke.status() == 403,
        "revoke with a guessed handle: {}",
        revoke.status()
    );
    ensure!(
        revision(&mut client).await? == before,
        "a refused request changed etcd"
    );

    // Alice still holds, and her handle still works.
    let (_, seen) = alice.get("/v1/locks/seat-7").await?;
    ensure!(seen["holder"]["token"] == *token, "{seen}");
    let (status, body) = alice
        .post("/v1/locks/seat-7/release", json!({"token": token}))
        .await?;
    ensure!(status == 200, "{body}");
    Ok(())
}

const TENANTS: &str = r#"{"tenants": [
    {"name": "red", "tokens": ["red-token-0123456789"], "lock_prefix": "red/"},
    {"name": "blue", "tokens": ["blue-token-0123456789"], "lock_prefix": "blue/",
     "max_leases": 3, "max_waiters_per_lock": 1, "max_ttl": "1h"}
]}"#;

async fn authenticated_server(etcd: &EtcdCluster, file: &Path) -> Result<ServerProcess> {
    std::fs::write(file, TENANTS)?;
    ServerProcess::spawn(
        &server_bin!(),
        &etcd.endpoints(),
        &["--auth-file", file.to_str().context("path")?],
    )
    .await
}

/// With an auth file, a request needs a known bearer token; a tenant uses only its own names,
/// and cannot list, release, renew, revoke or wait on another's, even with the other's handle.
#[tokio::test]
async fn tenants_are_isolated() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let dir = tempfile::tempdir()?;
    let server = authenticated_server(&etcd, &dir.path().join("auth.json")).await?;
    let anonymous = Api::new(server.url());
    let red = anonymous.with_bearer("red-token-0123456789");
    let blue = anonymous.with_bearer("blue-token-0123456789");

    for api in [&anonymous, &anonymous.with_bearer("made-up")] {
        let (status, body) = api.acquire_ttl("red/x", "10s", "0s").await?;
        ensure!(
            status == 401 && code(&body) == "unauthorized",
            "{status} {body}"
        );
    }
    let (status, held) = red.acquire_ttl("red/x", "30s", "0s").await?;
    ensure!(status == 200, "{held}");
    let (status, body) = red.acquire_ttl("blue/x", "30s", "0s").await?;
    ensure!(status == 403 && code(&body) == "forbidden", "{body}");

    let mut client = etcd.client().await?;
    let before = revision(&mut client).await?;
    let lease = held["lease_id"].as_str().context("lease")?;
    let handle = held["handle"].as_str().context("handle")?;
    let token = &held["token"];
    // Blue, even holding red's handle, gets nothing of red's.
    let blue_with = |path: &str, body: Value| {
        let blue = blue.clone();
        let path = path.to_owned();
        async move { blue.post_with_handle(&path, body, Some(handle)).await }
    };
    for (what, (status, body)) in [
        ("status", blue.get("/v1/locks/red%2Fx").await?),
        ("wait", blue.acquire_ttl("red/x", "10s", "1s").await?),
        (
            "release",
            blue_with("/v1/locks/red%2Fx/release", json!({"token": token})).await?,
        ),
        (
            "renew",
            blue_with("/v1/locks/red%2Fx/renew", json!({"token": token})).await?,
        ),
        (
            "keepalive",
            blue_with(&format!("/v1/leases/{lease}/keepalive"), json!({})).await?,
        ),
        (
            "lease info",
            blue.get(&format!("/v1/leases/{lease}")).await?,
        ),
    ] {
        ensure!(
            (status == 403 && code(&body) == "forbidden")
                || (status == 404 && code(&body) == "lease_not_found"),
            "blue {what}: {status} {body}"
        );
    }
    let revoke = blue
        .http()
        .delete(format!("{}/v1/leases/{lease}", server.url()))
        .bearer_auth("blue-token-0123456789")
        .header(leasehold_tests::HANDLE_HEADER, handle)
        .send()
        .await?;
    ensure!(revoke.status() == 403, "blue revoke: {}", revoke.status());
    ensure!(revision(&mut client).await? == before, "blue changed etcd");
    let (_, seen) = red.get("/v1/locks/red%2Fx").await?;
    ensure!(seen["holder"]["token"] == *token, "{seen}");
    Ok(())
}

/// A tenant's quotas stop the flood of 1 h leases with `429 quota_exceeded` before etcd fills;
/// the waiters-per-lock quota stops a queue; a TTL above the tenant's maximum is refused.
#[tokio::test]
async fn quotas_stop_floods() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let dir = tempfile::tempdir()?;
    let server = authenticated_server(&etcd, &dir.path().join("auth.json")).await?;
    let blue = Api::new(server.url()).with_bearer("blue-token-0123456789");
    let mut refused = 0;
    for _ in 0..20 {
        let (status, body) = blue.post("/v1/leases", json!({"ttl": "1h"})).await?;
        match status {
            201 => {}
            429 if code(&body) == "quota_exceeded" => refused += 1,
            _ => anyhow::bail!("{status} {body}"),
        }
    }
    ensure!(
        refused == 17,
        "3 leases allowed, 17 refused; refused {refused}"
    );
    let mut client = etcd.client().await?;
    let leases = client.leases().await?.leases().len();
    ensure!(leases == 3, "etcd holds {leases} leases");
    ensure!(keys_under(&mut client, "/leasehold/leases/").await?.len() == 6);
    let (status, body) = blue.post("/v1/leases", json!({"ttl": "2h"})).await?;
    ensure!(
        status == 400,
        "above the server's --max-ttl: {status} {body}"
    );

    // One waiter may queue for a blue lock, not two.
    let lease_ids: Vec<String> = keys_under(&mut client, "/leasehold/leases/")
        .await?
        .iter()
        .filter_map(|k| k.strip_suffix("/meta"))
        .filter_map(|k| k.rsplit('/').next())
        .map(str::to_owned)
        .collect();
    let acquire = |lease: &str, wait: &str| {
        blue.post(
            "/v1/locks/blue%2Fq/acquire",
            json!({"lease_id": lease, "wait": wait}),
        )
    };
    ensure!(acquire(&lease_ids[0], "0s").await?.0 == 200);
    let waiting = tokio::spawn({
        let (blue, lease) = (blue.clone(), lease_ids[1].clone());
        async move {
            blue.post(
                "/v1/locks/blue%2Fq/acquire",
                json!({"lease_id": lease, "wait": "5s"}),
            )
            .await
        }
    });
    while blue.get("/v1/locks/blue%2Fq").await?.1["waiters"] != 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = acquire(&lease_ids[2], "5s").await?;
    ensure!(
        status == 429 && code(&body) == "quota_exceeded",
        "{status} {body}"
    );
    waiting.abort();
    Ok(())
}

/// Handles never reach logs (even at debug level) or metric labels.
#[tokio::test]
async fn handles_stay_out_of_logs_and_metrics() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("server.log");
    let server = ServerProcess::spawn_full(
        &server_bin!(),
        &etcd.endpoints(),
        &["--log-format", "json"],
        &[("RUST_LOG", "debug")],
        Some(&log),
        None,
    )
    .await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("secret", "10s", "0s").await?;
    let handle = held["handle"].as_str().context("handle")?.to_owned();
    api.post("/v1/locks/secret/renew", json!({"token": held["token"]}))
        .await?;
    api.post_with_handle(
        "/v1/locks/secret/release",
        json!({"token": held["token"]}),
        Some("wrongwrongwrongwrongwrongwrong"),
    )
    .await?;
    api.post("/v1/locks/secret/release", json!({"token": held["token"]}))
        .await?;
    let metrics = api.metrics_text().await?;
    drop(server);
    let logs = std::fs::read_to_string(&log)?;
    ensure!(logs.contains("http_request"), "debug logs were written");
    for (what, text) in [("logs", &logs), ("metrics", &metrics)] {
        ensure!(!text.contains(&handle), "the handle is in the {what}");
        ensure!(
            !text.contains("wrongwrongwrong"),
            "a sent handle is in the {what}"
        );
    }
    Ok(())
}

/// The API over HTTPS: the crate (with the CA) and the CLI's `https://` endpoints work, plain
/// HTTP does not, and SIGHUP puts a renewed certificate in force without a restart.
#[tokio::test]
async fn https_api_with_certificate_reload() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (pki, renewed) = (TestPki::generate()?, TestPki::generate()?);
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&pki.cert, &cert)?;
    std::fs::copy(&pki.key, &key)?;
    let server = ServerProcess::spawn_full(
        &server_bin!(),
        &etcd.endpoints(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
        None,
        Some(&pki.ca),
    )
    .await?;
    let https = server.url().replace("http://", "https://");
    let client = leasehold::Client::builder()
        .endpoint(&https)
        .root_certificate_pem(std::fs::read(&pki.ca)?)
        .build()?;
    let guard = client
        .lock("tls")
        .ttl(Duration::from_secs(5))
        .acquire()
        .await?;
    guard.release().await?;
    let plain = reqwest::Client::new()
        .get(format!("{}/healthz", server.url()))
        .send()
        .await;
    ensure!(
        plain.is_err() || !plain?.status().is_success(),
        "plain HTTP on a TLS port"
    );

    // A renewed certificate (here: from another CA) takes effect on SIGHUP.
    std::fs::copy(&renewed.cert, &cert)?;
    std::fs::copy(&renewed.key, &key)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid().context("pid")? as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let trusts_new = Api::with_ca(&https, &renewed.ca)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while trusts_new.get("/healthz").await.is_err() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        Api::with_ca(&https, &pki.ca)?
            .get("/healthz")
            .await
            .is_err(),
        "the old certificate is still served"
    );
    Ok(())
}

/// A real etcd with TLS on its client port, client-certificate authentication and etcd auth:
/// the server reaches it with the CA, its own certificate and a user and password (from a file),
/// and grants locks; with a wrong password nothing is granted and it reports not ready.
#[tokio::test]
async fn etcd_with_tls_and_auth() -> Result<()> {
    let pki = TestPki::generate()?;
    let mut etcd = EtcdCluster::start_secure(1, &pki).await?;
    let (user, password) = etcd
        .enable_auth(&["/leasehold/", "/leasehold-registry/"])
        .await?;
    let dir = tempfile::tempdir()?;
    let start = |password: &str| {
        let file = dir.path().join(format!("password-{}", password.len()));
        let endpoints = etcd.endpoints();
        let (user, password) = (user.clone(), password.to_owned());
        let (ca, cert, key) = (pki.ca.clone(), pki.app_cert.clone(), pki.app_key.clone());
        async move {
            std::fs::write(&file, format!("{password}\n"))?;
            ServerProcess::spawn(
                &server_bin!(),
                &endpoints,
                &[
                    "--etcd-ca-file",
                    ca.to_str().unwrap(),
                    "--etcd-cert",
                    cert.to_str().unwrap(),
                    "--etcd-key",
                    key.to_str().unwrap(),
                    "--etcd-user",
                    &user,
                    "--etcd-password-file",
                    file.to_str().unwrap(),
                ],
            )
            .await
        }
    };
    let server = start(&password).await?;
    let api = Api::new(server.url());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.get("/readyz").await?.0 != 200 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never ready against the secure etcd"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, held) = api.acquire_ttl("secure", "10s", "0s").await?;
    ensure!(status == 200, "{held}");
    let (status, body) = api
        .post("/v1/locks/secure/release", json!({"token": held["token"]}))
        .await?;
    ensure!(status == 200, "{body}");

    let wrong = start("not-the-password").await?;
    let api = Api::new(wrong.url());
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(api.get("/readyz").await?.0 == 503);
    let (status, body) = api.acquire_ttl("secure", "10s", "0s").await?;
    ensure!(
        status == 503,
        "granted without etcd credentials: {status} {body}"
    );
    Ok(())
}
