//! End-to-end tests of the lock algorithm through the HTTP API, against real etcd.

use std::time::Duration;

use anyhow::Result;
use leasehold_tests::{Api, EtcdCluster, TestServer, encode, keys_under};
use serde_json::{Value, json};

fn token(body: &Value) -> u64 {
    body["token"]
        .as_u64()
        .unwrap_or_else(|| panic!("no token in {body}"))
}

/// Two concurrent acquirers of one lock: exactly one holds; the other gets it after release,
/// with a larger token.
#[tokio::test]
async fn one_holder_then_handoff_with_larger_token() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());

    let (a, b) = tokio::join!(
        api.acquire_ttl("seat-1", "10s", "0s"),
        api.acquire_ttl("seat-1", "10s", "0s")
    );
    let (a, b) = (a?, b?);
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "exactly one of {a:?} / {b:?} holds");
    let (winner, loser) = if a.0 == 200 { (a.1, b.1) } else { (b.1, a.1) };
    assert_eq!(loser["error"]["code"], "lock_held");
    assert_eq!(loser["holder"]["token"], winner["token"]);

    // A waiter queues; release hands the lock to it with a larger token.
    let waiter = tokio::spawn({
        let api = api.clone();
        async move { api.acquire_ttl("seat-1", "10s", "10s").await }
    });
    wait_for_waiters(&api, "seat-1", 1).await?;
    let (status, body) = api
        .post("/v1/locks/seat-1/release", json!({"token": token(&winner)}))
        .await?;
    assert_eq!((status, &body["released"]), (200, &json!(true)), "{body}");
    let (status, next) = waiter.await??;
    assert_eq!(status, 200, "{next}");
    assert!(token(&next) > token(&winner));
    Ok(())
}

/// Tokens strictly increase over 500 acquisitions alternating between two replicas.
#[tokio::test]
async fn tokens_strictly_increase_across_replicas() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (s1, s2) = (
        TestServer::start(&etcd).await?,
        TestServer::start(&etcd).await?,
    );
    let apis = [Api::new(s1.url()), Api::new(s2.url())];
    let lease = apis[0].grant("30s").await?;
    let mut last = 0;
    for i in 0..500 {
        let api = &apis[i % 2];
        let (status, body) = api
            .post("/v1/locks/counter/acquire", json!({"lease_id": lease}))
            .await?;
        assert_eq!(status, 200, "{body}");
        let t = token(&body);
        assert!(t > last, "token {t} after {last}");
        last = t;
        let (status, body) = apis[(i + 1) % 2]
            .post("/v1/locks/counter/release", json!({"token": t}))
            .await?;
        assert_eq!(status, 200, "{body}");
    }
    Ok(())
}

/// A holder that stops renewing loses the lock after its TTL; its old token then gets
/// `not_holder` on renew and release; the next waiter holds with a larger token.
#[tokio::test]
async fn expired_holder_loses_to_next_waiter() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (status, first) = api.acquire_ttl("job", "2s", "0s").await?;
    assert_eq!(status, 200);
    assert_eq!(first["ttl_ms"], 2000);

    // The holder was told it holds for ttl_ms from its answer, and it never renews: the next
    // waiter, asking right after that answer, is granted once the lease has run out (etcd
    // expires it 2.0-2.5 s after the grant), never before.
    let started = tokio::time::Instant::now();
    let (status, next) = api.acquire_ttl("job", "10s", "20s").await?;
    assert_eq!(status, 200, "{next}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "granted {waited:?} after the holder's answer, before its 2 s TTL ran out"
    );
    assert!(token(&next) > token(&first));

    for action in ["renew", "release"] {
        let (status, body) = api
            .post(
                &format!("/v1/locks/job/{action}"),
                json!({"token": token(&first)}),
            )
            .await?;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (409, Some("not_holder")),
            "{action}"
        );
    }
    // The current holder is untouched by those attempts.
    let (_, status) = api.get("/v1/locks/job").await?;
    assert_eq!(status["holder"]["token"], next["token"]);
    Ok(())
}

/// Renewal keeps a hold past several TTLs.
#[tokio::test]
async fn renew_keeps_the_hold() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("renewed", "2s", "0s").await?;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let (status, body) = api
            .post("/v1/locks/renewed/renew", json!({"token": token(&held)}))
            .await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token"], held["token"]);
        assert_eq!(body["ttl_ms"], 2000);
        assert_eq!(body["lease_id"], held["lease_id"]);
    }
    let (_, status) = api.get("/v1/locks/renewed").await?;
    assert_eq!(status["holder"]["token"], held["token"]);
    Ok(())
}

/// FIFO: ten waiters queued in order acquire in that order.
#[tokio::test]
async fn waiters_are_served_in_order() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, first) = api.acquire_ttl("fifo", "30s", "0s").await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..10 {
        let waiter = api.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let (status, body) = waiter.acquire_ttl("fifo", "30s", "60s").await.unwrap();
            assert_eq!(status, 200, "{body}");
            tx.send((i, token(&body))).unwrap();
            waiter
                .post("/v1/locks/fifo/release", json!({"token": token(&body)}))
                .await
                .unwrap();
        });
        // Each waiter must be in line before the next one arrives.
        wait_for_waiters(&api, "fifo", i + 1).await?;
    }
    api.post("/v1/locks/fifo/release", json!({"token": token(&first)}))
        .await?;
    let mut last = token(&first);
    for expected in 0..10 {
        // Each waiter releases as soon as it is granted, so the next grant follows at once. A
        // wakeup lost and caught only by the 10 s re-read backstop would blow this bound.
        let (i, t) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a handoff took longer than 5 s: a lost wakeup?")
            .unwrap();
        assert_eq!(i, expected, "waiter {i} served out of order");
        assert!(t > last);
        last = t;
    }
    Ok(())
}

/// Idempotent retry: the same lease acquiring the same lock twice gets the same token, and
/// is in line once.
#[tokio::test]
async fn same_lease_acquire_is_idempotent() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (s1, s2) = (
        TestServer::start(&etcd).await?,
        TestServer::start(&etcd).await?,
    );
    let (a1, a2) = (Api::new(s1.url()), Api::new(s2.url()));
    let lease = a1.grant("10s").await?;
    let (_, first) = a1
        .post("/v1/locks/idem/acquire", json!({"lease_id": lease}))
        .await?;
    let (_, again) = a2
        .post("/v1/locks/idem/acquire", json!({"lease_id": lease}))
        .await?;
    assert_eq!(first["token"], again["token"]);
    let (_, status) = a1.get("/v1/locks/idem").await?;
    assert_eq!(status["waiters"], 0);

    // A waiting lease retrying its acquire keeps its place rather than queueing twice.
    let other = a1.grant("10s").await?;
    let (status, _) = a1
        .post(
            "/v1/locks/idem/acquire",
            json!({"lease_id": other, "wait": "300ms"}),
        )
        .await?;
    assert_eq!(status, 409);
    let background = tokio::spawn({
        let a1 = a1.clone();
        let other = other.clone();
        async move {
            a1.post(
                "/v1/locks/idem/acquire",
                json!({"lease_id": other, "wait": "10s"}),
            )
            .await
        }
    });
    wait_for_waiters(&a1, "idem", 1).await?;
    let retry = tokio::spawn({
        let a2 = a2.clone();
        let other = other.clone();
        async move {
            a2.post(
                "/v1/locks/idem/acquire",
                json!({"lease_id": other, "wait": "10s"}),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, status) = a1.get("/v1/locks/idem").await?;
    assert_eq!(
        status["waiters"], 1,
        "the retry must not queue a second time"
    );
    a1.post("/v1/locks/idem/release", json!({"token": token(&first)}))
        .await?;
    let (s_a, b_a) = background.await??;
    let (s_b, b_b) = retry.await??;
    assert_eq!((s_a, s_b), (200, 200), "{b_a} {b_b}");
    assert_eq!(b_a["token"], b_b["token"]);
    Ok(())
}

/// Names `a`, `a/b`, `a%2Fb` and unicode are independent locks.
#[tokio::test]
async fn similar_names_are_independent() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let names = ["a", "a/b", "a%2Fb", "a/", "концерт 🎫", "a b"];
    for name in names {
        let (status, body) = api.acquire_ttl(name, "10s", "0s").await?;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["name"], name);
    }
    for name in names {
        let (_, status) = api.get(&format!("/v1/locks/{}", encode(name))).await?;
        assert_eq!(status["name"], name);
        assert!(status["holder"].is_object(), "{name}");
        assert_eq!(status["waiters"], 0, "{name}");
    }
    let mut etcd_client = etcd.client().await?;
    assert_eq!(
        keys_under(&mut etcd_client, "/leasehold/locks/")
            .await?
            .len(),
        names.len()
    );
    Ok(())
}

/// Polls `GET /v1/locks/{name}` until `n` waiters are queued.
async fn wait_for_waiters(api: &Api, name: &str, n: usize) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = api.get(&format!("/v1/locks/{}", encode(name))).await?;
        if status["waiters"].as_u64() == Some(n as u64) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "never saw {n} waiters: {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A grant after a wait, under a lease the server granted for the request, comes with the
/// lease's full TTL from the moment of the answer: the lease was refreshed before answering, so
/// a client that renews within `ttl_ms` of the answer keeps the lock.
#[tokio::test]
async fn a_waited_grant_has_its_full_ttl() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, first) = api.acquire_ttl("fresh", "30s", "0s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move { api.acquire_ttl("fresh", "9s", "20s").await }
    });
    wait_for_waiters(&api, "fresh", 1).await?;
    // The server refreshes the waiting lease every 3 s (TTL/3); release between two refreshes.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    api.post("/v1/locks/fresh/release", json!({"token": token(&first)}))
        .await?;
    let (status, granted) = waiter.await??;
    assert_eq!(status, 200);
    let (_, lease) = api
        .get(&format!(
            "/v1/leases/{}",
            granted["lease_id"].as_str().unwrap()
        ))
        .await?;
    // etcd reports whole seconds, rounded down: 8 s right after a refresh, about 6 s without.
    assert!(lease["remaining_ms"].as_u64().unwrap() >= 8000, "{lease}");
    Ok(())
}

/// A try (no wait) at a lock someone holds is refused from a read: etcd's revision does not
/// move, however many tries come (a try that put a key and deleted it again would cost two
/// writes each, and tries that overlap would refuse one another). The holder's own try under its
/// lease still answers its hold, and of many tries at a free lock exactly one wins.
#[tokio::test]
async fn a_refused_try_writes_nothing() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (holder, other) = (api.grant("30s").await?, api.grant("30s").await?);
    let (status, held) = api
        .post(
            "/v1/locks/front-row/acquire",
            json!({"lease_id": holder, "wait": "0s", "owner": "first"}),
        )
        .await?;
    assert_eq!(status, 200, "{held}");
    let mut etcd_client = etcd.client().await?;
    let before = leasehold_tests::revision(&mut etcd_client).await?;
    for _ in 0..20 {
        let (status, body) = api
            .post(
                "/v1/locks/front-row/acquire",
                json!({"lease_id": other, "wait": "0s"}),
            )
            .await?;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "lock_held");
        assert_eq!(body["holder"]["token"], held["token"], "{body}");
        assert_eq!(body["holder"]["owner"], "first", "{body}");
    }
    assert_eq!(
        leasehold_tests::revision(&mut etcd_client).await?,
        before,
        "twenty refused tries wrote nothing"
    );
    let (status, body) = api
        .post(
            "/v1/locks/front-row/acquire",
            json!({"ttl": "5s", "wait": "0s"}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    // The ttl try granted a lease and revoked it again (neither moves the revision); it wrote no
    // key, of the lock or of the lease.
    assert_eq!(
        leasehold_tests::revision(&mut etcd_client).await?,
        before,
        "a refused try with a ttl wrote no key"
    );
    let (status, again) = api
        .post(
            "/v1/locks/front-row/acquire",
            json!({"lease_id": holder, "wait": "0s"}),
        )
        .await?;
    assert_eq!((status, &again["token"]), (200, &held["token"]), "{again}");
    let (_, status) = api.get("/v1/locks/front-row").await?;
    assert_eq!(status["waiters"], 0, "{status}");

    // Many tries at once at a free lock: exactly one holds.
    let mut tries = Vec::new();
    for _ in 0..40 {
        let api = api.clone();
        tries.push(tokio::spawn(async move {
            api.acquire_ttl("box-office", "10s", "0s").await
        }));
    }
    let mut granted = 0;
    for t in tries {
        let (status, body) = t.await??;
        match status {
            200 => granted += 1,
            409 => assert_eq!(body["error"]["code"], "lock_held"),
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert_eq!(granted, 1, "exactly one of the tries holds");
    Ok(())
}

/// A waiter whose turn came while its wake-up was still on its way is granted at its deadline,
/// not turned away: at the deadline it looks once more. The server here misses every wake-up,
/// the extreme of wake-ups that arrive late under load. Without that last look, each head of a
/// busy line gave up before it learned it was the head, and a lock went to nobody for as long
/// as the line stayed busy (the 5x flash sale's last seat, for 13 s).
#[tokio::test]
async fn a_waiter_whose_turn_came_unheard_is_granted_at_its_deadline() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let mut config = leasehold_server::Config::default().with_etcd_endpoints(etcd.endpoints());
    config.fault_waiters_miss_wakeups = true;
    let server = TestServer::start_with(config).await?;
    let api = Api::new(server.url());

    let holder = api.grant("10s").await?;
    let (status, held) = api
        .post("/v1/locks/last-seat/acquire", json!({"lease_id": holder}))
        .await?;
    assert_eq!(status, 200, "{held}");
    let waiter = api.grant("10s").await?;
    let waiting = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/v1/locks/last-seat/acquire",
                json!({"lease_id": waiter, "wait": "1s"}),
            )
            .await
        }
    });
    wait_for_waiters(&api, "last-seat", 1).await?;
    let (status, body) = api
        .post(
            "/v1/locks/last-seat/release",
            json!({"token": token(&held)}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let (status, granted) = waiting.await??;
    assert_eq!(
        status, 200,
        "the waiter's turn came before its deadline: {granted}"
    );
    assert!(token(&granted) > token(&held));

    // A waiter whose turn does not come is still turned away at its deadline, its key gone.
    let third = api.grant("10s").await?;
    let (status, body) = api
        .post(
            "/v1/locks/last-seat/acquire",
            json!({"lease_id": third, "wait": "300ms"}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    let (_, lock) = api.get("/v1/locks/last-seat").await?;
    assert_eq!(lock["waiters"], 0, "{lock}");
    Ok(())
}
