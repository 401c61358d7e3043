//! Static checks of the deployment and monitoring files in `compose/` (no container engine
//! needed):
//!
//! - `docker-compose config -q` accepts `compose/docker-compose.yml`, and the resolved services
//!   are wired as documented (3 etcd members, 2 servers, collector → Jaeger, Prometheus,
//!   Grafana);
//! - `promtool check config`, `promtool check rules` and `promtool test rules` accept the
//!   Prometheus files;
//! - the Grafana dashboard parses, every panel has a query, every query parses as PromQL and
//!   names only metrics that `leasehold-server` exports (plus `up`);
//! - every alert names only those metrics, and carries a severity, a summary and a description;
//! - the Prometheus targets, Grafana provisioning, collector pipeline and Dockerfile agree with
//!   the compose file and the workspace.
//!
//! Tools: Debian packages `docker-compose`, `prometheus` (for `promtool`) and `python3-yaml`
//! (YAML → JSON). A missing tool fails the test unless `LEASEHOLD_SKIP_COMPOSE_TOOLS=1`; then
//! the checks that need it are skipped with a notice and the rest still run.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// Counters and gauges `leasehold-server` exports (the metrics contract).
const PLAIN_METRICS: &[&str] = &[
    "leasehold_acquires_total",
    "leasehold_releases_total",
    "leasehold_renewals_total",
    "leasehold_lease_grants_total",
    "leasehold_lease_revocations_total",
    "leasehold_holds_lost_total",
    "leasehold_stale_token_rejections_total",
    "leasehold_waits_in_flight",
    "leasehold_etcd_up",
    "leasehold_build_info",
    "leasehold_http_requests_total",
    "leasehold_requests_shed_total",
    "leasehold_etcd_overloaded_total",
    "leasehold_admission_limit",
    "leasehold_admission_queue",
    "leasehold_watch_restarts_total",
    "leasehold_lock_delays_installed_total",
    "leasehold_lock_delay_refresh_failures_total",
    "leasehold_lock_delay_held_off_total",
];

/// Histograms `leasehold-server` exports; queried through `_bucket`, `_sum` and `_count`.
const HISTOGRAMS: &[&str] = &[
    "leasehold_acquire_duration_seconds",
    "leasehold_acquire_wait_seconds",
    "leasehold_etcd_request_duration_seconds",
    "leasehold_http_request_duration_seconds",
];

const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

/// Prometheus' own series, allowed besides the contract.
const PROMETHEUS_METRICS: &[&str] = &["up"];

const SKIP_ENV: &str = "LEASEHOLD_SKIP_COMPOSE_TOOLS";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

fn compose_dir() -> PathBuf {
    repo_root().join("compose")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---- external tools ----------------------------------------------------------------------------

/// Whether `program` (probed with `probe_args`) runs here. When it does not: panics, unless
/// `LEASEHOLD_SKIP_COMPOSE_TOOLS=1`, in which case it prints a loud notice and returns false.
fn have_tool(program: &str, probe_args: &[&str], package: &str) -> bool {
    let ok = Command::new(program)
        .args(probe_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        // The harness captures a passing test's stderr: the skip log is what scripts/test
        // prints at the end.
        leasehold_tests::report_skip(&format!(
            "compose_files: checks that need `{program}` (Debian package `{package}`; {SKIP_ENV}=1)"
        ));
        return false;
    }
    panic!(
        "`{program}` is not available: install it with \
         `apt-get install -y --no-install-recommends {package}` \
         (or set {SKIP_ENV}=1 to skip the checks that need it)"
    );
}

fn have_docker_compose() -> bool {
    have_tool("docker-compose", &["version"], "docker-compose")
}

fn have_promtool() -> bool {
    have_tool("promtool", &["--version"], "prometheus")
}

/// The Python with PyYAML: `LEASEHOLD_PYTHON` (scripts/test points it at its pinned tools venv),
/// else `python3` on PATH.
fn python() -> String {
    std::env::var("LEASEHOLD_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn have_yaml() -> bool {
    have_tool(&python(), &["-c", "import yaml"], "python3-yaml")
}

/// Runs `cmd`, feeding it `stdin`; panics with its output unless it exits 0. Returns stdout.
fn run(cmd: &mut Command, stdin: Option<&str>) -> String {
    let description = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {description}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{description} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

/// YAML text → JSON value, through Python's yaml module (serde_yaml is not in the workspace).
fn yaml_to_json(yaml: &str) -> Value {
    let json = run(
        Command::new(python()).args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ]),
        Some(yaml),
    );
    serde_json::from_str(&json).expect("python emitted JSON")
}

fn yaml_file(path: &Path) -> Value {
    yaml_to_json(&read(path))
}

/// The compose file as `docker-compose config` resolves it (anchors merged, paths absolute).
fn resolved_compose() -> Value {
    let out = run(
        Command::new("docker-compose")
            .current_dir(repo_root())
            .args(["-f", "compose/docker-compose.yml", "config"]),
        None,
    );
    yaml_to_json(&out)
}

// ---- PromQL metric names -----------------------------------------------------------------------

const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Clauses whose parenthesised list holds label names, not series.
const LABEL_LIST_CLAUSES: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers outside string literals, label
/// matchers (`{...}`), ranges (`[...]`) and label lists (`by (...)` etc.), not followed by `(`
/// (functions, aggregations) and not keywords. Grafana variables (`$name`) are ignored.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Pass 1: drop strings, `{...}` and `[...]`, leaving a space in their place.
    let mut cleaned = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let (mut braces, mut brackets) = (0usize, 0usize);
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q != '`' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '[' => brackets += 1,
            ']' => brackets = brackets.saturating_sub(1),
            _ if braces == 0 && brackets == 0 => {
                cleaned.push(c);
                continue;
            }
            _ => continue,
        }
        cleaned.push(' ');
    }

    // Pass 2: identifiers.
    let chars: Vec<char> = cleaned.chars().collect();
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let next_non_space = |from: usize| chars[from..].iter().position(|c| !c.is_whitespace());
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            // A Grafana variable: skip its name.
            i += 1;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (0.99, 5m, 1e3).
            while i < chars.len() && (is_part(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            let paren_at = next_non_space(i)
                .map(|off| i + off)
                .filter(|&at| chars[at] == '(');
            if LABEL_LIST_CLAUSES.contains(&ident.as_str()) {
                if let Some(open) = paren_at {
                    // Skip the label list up to its closing parenthesis.
                    let mut depth = 0usize;
                    i = open;
                    while i < chars.len() {
                        match chars[i] {
                            '(' => depth += 1,
                            ')' => {
                                depth -= 1;
                                if depth == 0 {
                                    i += 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                        i += 1;
                    }
                }
            } else if paren_at.is_none()
                && !PROMQL_KEYWORDS.contains(&ident.as_str())
                && !followed_by_grouping(&chars[i..])
            {
                // (An identifier followed by `by`/`without` is an aggregation: `sum by (le) (...)`.)
                names.insert(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Whether `rest` starts (after spaces) with the `by` or `without` keyword.
fn followed_by_grouping(rest: &[char]) -> bool {
    let word: String = rest
        .iter()
        .skip_while(|c| c.is_whitespace())
        .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
        .collect();
    word == "by" || word == "without"
}

/// Every `leasehold_[a-z_]+` anywhere in the text, strings and matchers included.
fn leasehold_identifiers(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("leasehold_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

/// Whether `name` is a series `leasehold-server` or Prometheus exposes.
fn is_contract_series(name: &str) -> bool {
    PLAIN_METRICS.contains(&name)
        || PROMETHEUS_METRICS.contains(&name)
        || HISTOGRAM_SUFFIXES.iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| HISTOGRAMS.contains(&base))
        })
}

/// The contract family a `leasehold_...` identifier belongs to, with histogram suffixes
/// stripped.
fn is_contract_family(name: &str) -> bool {
    let base = HISTOGRAM_SUFFIXES
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    PLAIN_METRICS.contains(&base) || HISTOGRAMS.contains(&base)
}

/// Problems with the metric names `expr` uses; empty when it uses only the contract.
fn metric_problems(expr: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for name in metric_names(expr) {
        if !is_contract_series(&name) {
            problems.push(format!("`{name}` is not a series leasehold-server exports"));
        }
    }
    for name in leasehold_identifiers(expr) {
        if !is_contract_family(&name) {
            problems.push(format!("`{name}` is not in the metrics contract"));
        }
    }
    if metric_names(expr).is_empty() {
        problems.push("selects no metric".to_owned());
    }
    problems
}

#[test]
fn metric_name_extraction_sees_through_promql() {
    let expr = r#"histogram_quantile(0.99, sum by (le, op) (rate(leasehold_etcd_request_duration_seconds_bucket{job="leasehold", op=~"txn|get"}[$__rate_interval])))"#;
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(["leasehold_etcd_request_duration_seconds_bucket".to_owned()])
    );
    assert!(metric_problems(expr).is_empty());

    let joined = "sum without (instance) (rate(process_cpu_seconds_total[5m])) * on (instance) group_left (version) leasehold_build_info offset 5m > bool 0";
    assert_eq!(
        metric_names(joined),
        BTreeSet::from([
            "leasehold_build_info".to_owned(),
            "process_cpu_seconds_total".to_owned()
        ])
    );
    assert_eq!(
        metric_problems(joined).len(),
        1,
        "{:?}",
        metric_problems(joined)
    );

    for bad in [
        "rate(leasehold_acquires_total_count[5m])",
        "leasehold_acquire_duration_seconds",
        "rate(leasehold_made_up_total[5m])",
        r#"count({__name__=~"leasehold_not_a_metric"})"#,
        "sum(rate(http_requests_total[5m]))",
        "vector(1)",
    ] {
        assert!(!metric_problems(bad).is_empty(), "accepted {bad}");
    }
    for good in [
        r#"up{job="leasehold"} == 0"#,
        "sum(rate(leasehold_http_request_duration_seconds_sum[5m])) / sum(rate(leasehold_http_request_duration_seconds_count[5m]))",
        "leasehold_etcd_up == 0",
    ] {
        assert!(metric_problems(good).is_empty(), "rejected {good}");
    }
}

// ---- (a) compose file --------------------------------------------------------------------------

#[test]
fn compose_file_validates() {
    if !have_docker_compose() {
        return;
    }
    run(
        Command::new("docker-compose")
            .current_dir(repo_root())
            .args(["-f", "compose/docker-compose.yml", "config", "-q"]),
        None,
    );
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let svc = &compose["services"][name];
    assert!(svc.is_object(), "compose has no service `{name}`");
    svc
}

fn env_var<'a>(svc: &'a Value, key: &str) -> &'a str {
    svc["environment"][key]
        .as_str()
        .unwrap_or_else(|| panic!("environment {key} not set in {svc}"))
}

fn published_ports(svc: &Value) -> Vec<(u64, u64)> {
    svc["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    (
                        p["published"].as_u64().expect("published port"),
                        p["target"].as_u64().expect("target port"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        Value::String(s) => vec![s.clone()],
        Value::Object(map) => map.values().flat_map(strings).collect(),
        other => vec![other.to_string()],
    }
}

#[test]
fn compose_services_are_wired_as_documented() {
    if !have_docker_compose() || !have_yaml() {
        return;
    }
    let compose = resolved_compose();
    let root = repo_root();
    let peers = "etcd1=http://etcd1:2380,etcd2=http://etcd2:2380,etcd3=http://etcd3:2380";

    let mut volumes = BTreeSet::new();
    for n in 1..=3 {
        let etcd = service(&compose, &format!("etcd{n}"));
        let image = etcd["image"].as_str().expect("etcd image");
        assert!(
            image.ends_with("/etcd:v3.5.17"),
            "etcd{n} image {image} is not etcd v3.5.17"
        );
        let args = strings(&etcd["command"]).join(" ");
        assert!(
            args.contains(&format!("--initial-cluster={peers}")),
            "etcd{n} lacks the 3-member --initial-cluster: {args}"
        );
        assert!(args.contains(&format!("--name=etcd{n}")), "{args}");
        assert!(
            args.contains(&format!("--advertise-client-urls=http://etcd{n}:2379")),
            "{args}"
        );
        let check = strings(&etcd["healthcheck"]["test"]).join(" ");
        assert!(
            check.contains("endpoint health"),
            "etcd{n} healthcheck: {check}"
        );
        let vols = strings(&etcd["volumes"]);
        assert_eq!(
            vols.len(),
            1,
            "etcd{n} should have one data volume: {vols:?}"
        );
        volumes.insert(vols[0].split(':').next().unwrap().to_owned());
    }
    assert_eq!(volumes.len(), 3, "each etcd member needs its own volume");

    for (name, host_port) in [("leasehold-1", 7070), ("leasehold-2", 7071)] {
        let svc = service(&compose, name);
        let context = PathBuf::from(svc["build"]["context"].as_str().expect("build context"));
        assert_eq!(
            context.canonicalize().expect("build context exists"),
            root,
            "{name} must build from the repository root"
        );
        let dockerfile = svc["build"]["dockerfile"].as_str().expect("dockerfile");
        assert_eq!(dockerfile, "compose/Dockerfile");
        assert!(root.join(dockerfile).is_file());
        let endpoints: BTreeSet<&str> = env_var(svc, "LEASEHOLD_ETCD_ENDPOINTS")
            .split(',')
            .collect();
        assert_eq!(
            endpoints,
            BTreeSet::from([
                "http://etcd1:2379",
                "http://etcd2:2379",
                "http://etcd3:2379"
            ]),
            "{name} must know all three etcd members"
        );
        assert_eq!(env_var(svc, "LEASEHOLD_LISTEN"), "0.0.0.0:7070");
        assert_eq!(
            env_var(svc, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            "http://otel-collector:4317"
        );
        let check = strings(&svc["healthcheck"]["test"]).join(" ");
        assert!(
            check.contains(":7070/readyz"),
            "{name} healthcheck: {check}"
        );
        assert_eq!(
            published_ports(svc),
            vec![(host_port, 7070)],
            "{name} ports"
        );
    }

    let jaeger = service(&compose, "jaeger");
    assert_eq!(env_var(jaeger, "COLLECTOR_OTLP_ENABLED"), "true");
    for (name, port) in [("jaeger", 16686), ("prometheus", 9090), ("grafana", 3000)] {
        assert!(
            published_ports(service(&compose, name)).contains(&(port, port)),
            "{name} should publish {port}"
        );
    }
    let grafana = service(&compose, "grafana");
    assert_eq!(env_var(grafana, "GF_SECURITY_ADMIN_USER"), "admin");
    assert_eq!(env_var(grafana, "GF_SECURITY_ADMIN_PASSWORD"), "admin");

    // Every bind-mounted host path exists.
    for (name, svc) in compose["services"].as_object().expect("services") {
        for volume in strings(&svc["volumes"]) {
            let source = volume.split(':').next().unwrap();
            if source.starts_with('/') {
                assert!(Path::new(source).exists(), "{name} mounts missing {source}");
            }
        }
    }
}

/// The container path `host` (a path under compose/) is mounted at in `service`.
fn mount_target(compose: &Value, service_name: &str, host: &Path) -> String {
    let svc = service(compose, service_name);
    strings(&svc["volumes"])
        .iter()
        .find_map(|volume| {
            let mut parts = volume.split(':');
            let source = parts.next()?;
            let target = parts.next()?;
            (Path::new(source) == host).then(|| target.to_owned())
        })
        .unwrap_or_else(|| panic!("{service_name} does not mount {}", host.display()))
}

#[test]
fn monitoring_configs_point_at_compose_services() {
    if !have_docker_compose() || !have_yaml() {
        return;
    }
    let compose = resolved_compose();
    let dir = compose_dir();

    // Prometheus: scrape jobs name the compose services.
    let prometheus = yaml_file(&dir.join("prometheus/prometheus.yml"));
    let targets = |job: &str| -> BTreeSet<String> {
        let config = prometheus["scrape_configs"]
            .as_array()
            .expect("scrape_configs")
            .iter()
            .find(|c| c["job_name"] == job)
            .unwrap_or_else(|| panic!("no scrape job `{job}`"));
        assert_eq!(
            config["metrics_path"].as_str().unwrap_or("/metrics"),
            "/metrics"
        );
        strings(&config["static_configs"]).into_iter().collect()
    };
    assert_eq!(
        targets("leasehold"),
        BTreeSet::from(["leasehold-1:7070".to_owned(), "leasehold-2:7070".to_owned()])
    );
    assert_eq!(
        targets("etcd"),
        BTreeSet::from([
            "etcd1:2379".to_owned(),
            "etcd2:2379".to_owned(),
            "etcd3:2379".to_owned()
        ])
    );
    let rule_files = strings(&prometheus["rule_files"]);
    assert_eq!(rule_files, vec!["alerts.yml".to_owned()]);
    assert_eq!(
        mount_target(&compose, "prometheus", &dir.join("prometheus")),
        "/etc/prometheus"
    );

    // Grafana: the datasource is the prometheus service; the provider reads the mounted
    // dashboards; every panel uses the provisioned datasource.
    let datasources = yaml_file(&dir.join("grafana/provisioning/datasources/prometheus.yml"));
    let ds = &datasources["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    assert_eq!(ds["url"], "http://prometheus:9090");
    let uid = ds["uid"].as_str().expect("datasource uid");
    let providers = yaml_file(&dir.join("grafana/provisioning/dashboards/leasehold.yml"));
    let provider_path = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path");
    assert_eq!(
        mount_target(&compose, "grafana", &dir.join("grafana/dashboards")),
        provider_path
    );
    assert_eq!(
        mount_target(&compose, "grafana", &dir.join("grafana/provisioning")),
        "/etc/grafana/provisioning"
    );
    for panel in dashboard_panels(&dashboard()) {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], uid, "panel {}", panel["title"]);
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["datasource"]["uid"], uid, "panel {}", panel["title"]);
        }
    }

    // Collector: OTLP gRPC + HTTP in, batch, OTLP out to Jaeger's OTLP gRPC port.
    let otel = yaml_file(&dir.join("otel-collector.yaml"));
    check_collector(&otel);
    assert_eq!(
        mount_target(&compose, "otel-collector", &dir.join("otel-collector.yaml")),
        "/etc/otelcol-contrib/config.yaml"
    );
}

/// The collector's trace pipeline: OTLP gRPC and HTTP in, a memory limiter first and a batch
/// processor, OTLP out to Jaeger's gRPC port without TLS; every component the pipeline (or the
/// service) names is defined in its section (the collector refuses to start otherwise), and a
/// component given settings has them as a mapping (a bare `batch:` means the defaults).
fn check_collector(otel: &Value) {
    let protocols = &otel["receivers"]["otlp"]["protocols"];
    assert_eq!(protocols["grpc"]["endpoint"], "0.0.0.0:4317");
    assert_eq!(protocols["http"]["endpoint"], "0.0.0.0:4318");
    let defined = |section: &str, name: &str| -> bool {
        otel[section]
            .as_object()
            .and_then(|components| components.get(name))
            .is_some_and(|c| c.is_object() || c.is_null())
    };
    let traces = &otel["service"]["pipelines"]["traces"];
    for (section, names) in [
        ("receivers", strings(&traces["receivers"])),
        ("processors", strings(&traces["processors"])),
        ("exporters", strings(&traces["exporters"])),
        ("extensions", strings(&otel["service"]["extensions"])),
    ] {
        for name in names {
            assert!(
                defined(section, &name),
                "the pipeline uses {section} `{name}`, which is not defined"
            );
        }
    }
    assert_eq!(strings(&traces["receivers"]), vec!["otlp".to_owned()]);
    let processors = strings(&traces["processors"]);
    assert!(processors.contains(&"batch".to_owned()), "{processors:?}");
    // The memory limiter must see data first, or it cannot refuse it under pressure.
    if processors.contains(&"memory_limiter".to_owned()) {
        assert_eq!(processors[0], "memory_limiter", "{processors:?}");
    }
    let exporters = strings(&traces["exporters"]);
    assert!(!exporters.is_empty());
    for exporter in &exporters {
        assert!(exporter.starts_with("otlp"), "exporter {exporter}");
        assert_eq!(otel["exporters"][exporter]["endpoint"], "jaeger:4317");
        assert_eq!(
            otel["exporters"][exporter]["tls"]["insecure"], true,
            "Jaeger's OTLP port in the compose file speaks plain gRPC"
        );
    }
}

#[test]
fn collector_check_catches_undefined_components() {
    let good = serde_json::json!({
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": "0.0.0.0:4317"}, "http": {"endpoint": "0.0.0.0:4318"}}}},
        "processors": {"memory_limiter": {"limit_mib": 256}, "batch": null},
        "exporters": {"otlp/jaeger": {"endpoint": "jaeger:4317", "tls": {"insecure": true}}},
        "extensions": {"health_check": {}},
        "service": {"extensions": ["health_check"], "pipelines": {"traces": {
            "receivers": ["otlp"], "processors": ["memory_limiter", "batch"],
            "exporters": ["otlp/jaeger"]}}}
    });
    check_collector(&good);
    let broken = |edit: fn(&mut Value)| {
        let mut otel = good.clone();
        edit(&mut otel);
        std::panic::catch_unwind(|| check_collector(&otel)).is_err()
    };
    assert!(broken(|o| {
        o["processors"].as_object_mut().unwrap().remove("batch");
    }));
    assert!(broken(|o| {
        o["extensions"]
            .as_object_mut()
            .unwrap()
            .remove("health_check");
    }));
    assert!(broken(|o| {
        o["exporters"]
            .as_object_mut()
            .unwrap()
            .remove("otlp/jaeger");
    }));
    assert!(broken(|o| {
        o["service"]["pipelines"]["traces"]["processors"] =
            serde_json::json!(["batch", "memory_limiter"]);
    }));
    assert!(broken(
        |o| o["processors"]["batch"] = serde_json::json!("oops")
    ));
}

#[test]
fn dockerfile_builds_the_workspace_and_runs_as_non_root() {
    let dockerfile = read(&compose_dir().join("Dockerfile"));
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "multi-stage build expected: {froms:?}");
    assert!(froms[0].contains("rust:1.95-bookworm"), "{}", froms[0]);
    assert!(froms[1].contains("debian:bookworm-slim"), "{}", froms[1]);
    assert!(dockerfile.contains("protobuf-compiler"));
    assert!(dockerfile.contains("cargo build --release --locked -p leasehold-server"));
    let user = dockerfile
        .lines()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");

    // Every workspace member is copied into the build (Cargo needs all their manifests).
    let root_manifest = read(&repo_root().join("Cargo.toml"));
    let members_line = root_manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(members.contains(&"server"), "{members:?}");
    for member in members {
        assert!(
            dockerfile.contains(&format!("COPY {member} {member}")),
            "Dockerfile does not copy workspace member `{member}`"
        );
    }
    let ignore = read(&compose_dir().join("Dockerfile.dockerignore"));
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}

// ---- (b) Prometheus ----------------------------------------------------------------------------

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    if !have_promtool() {
        return;
    }
    let dir = compose_dir().join("prometheus");
    run(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "config", "prometheus.yml"]),
        None,
    );
    run(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "rules", "alerts.yml"]),
        None,
    );
    // Each alert fires on a failing input and stays quiet on a healthy one.
    run(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["test", "rules", "alerts.test.yml"]),
        None,
    );
}

// ---- (c) dashboard -----------------------------------------------------------------------------

fn dashboard() -> Value {
    let path = compose_dir().join("grafana/dashboards/leasehold.json");
    serde_json::from_str(&read(&path)).expect("dashboard is valid JSON")
}

/// All panels, including those nested in collapsed rows.
fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, expr) for every query of every non-row panel; panics on a panel without one.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in dashboard_panels(dashboard) {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("<untitled>").to_owned();
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel `{title}` has no targets");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("").trim();
            assert!(
                !expr.is_empty(),
                "panel `{title}` has a target without expr"
            );
            exprs.push((title.clone(), expr.to_owned()));
        }
    }
    exprs
}

#[test]
fn dashboard_queries_use_only_contract_metrics() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "leasehold");
    let exprs = dashboard_exprs(&dashboard);
    let mut problems = Vec::new();
    for (title, expr) in &exprs {
        for problem in metric_problems(expr) {
            problems.push(format!("panel `{title}`: {problem}\n    {expr}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The panels the runbook refers to are there.
    let joined: String = exprs.iter().map(|(_, e)| e.as_str()).collect();
    for metric in [
        "leasehold_acquires_total",
        "leasehold_acquire_duration_seconds_bucket",
        "leasehold_acquire_wait_seconds_bucket",
        "leasehold_etcd_request_duration_seconds_bucket",
        "leasehold_waits_in_flight",
        "leasehold_etcd_up",
        "leasehold_http_requests_total",
        "leasehold_holds_lost_total",
        "leasehold_stale_token_rejections_total",
        "leasehold_lease_grants_total",
        "leasehold_lease_revocations_total",
    ] {
        assert!(joined.contains(metric), "no panel queries {metric}");
    }
}

#[test]
fn dashboard_queries_parse_as_promql() {
    if !have_promtool() {
        return;
    }
    // promtool parses rule expressions: check each query as a recording rule, with Grafana's
    // interval variables replaced by a duration.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in dashboard_exprs(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        rules.push_str(&format!(
            "      # {title}\n      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let mut file = tempfile::Builder::new()
        .suffix(".yml")
        .tempfile()
        .expect("temp file");
    file.write_all(rules.as_bytes()).expect("write rules");
    run(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(file.path()),
        None,
    );
}

// ---- (d) alerts --------------------------------------------------------------------------------

/// The `expr:` values of a rules file, read as text (block scalars included), so this check
/// needs no YAML tool.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        i += 1;
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let mut block = Vec::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push(next.trim());
                i += 1;
            }
            exprs.push(block.join(" ").trim().to_owned());
        } else {
            exprs.push(value.trim_matches(|c| c == '"' || c == '\'').to_owned());
        }
    }
    exprs
}

#[test]
fn alert_exprs_use_only_contract_metrics() {
    let text = read(&compose_dir().join("prometheus/alerts.yml"));
    let exprs = rule_exprs(&text);
    assert!(
        exprs.len() >= 5,
        "expected at least 5 alert exprs, found {exprs:?}"
    );
    let mut problems = Vec::new();
    for expr in &exprs {
        for problem in metric_problems(expr) {
            problems.push(format!("{problem}\n    {expr}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn alerts_are_complete() {
    if !have_yaml() {
        return;
    }
    let text = read(&compose_dir().join("prometheus/alerts.yml"));
    let rules: Vec<Value> = yaml_to_json(&text)["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(
        rules.len(),
        rule_exprs(&text).len(),
        "the text scan of exprs must see every rule"
    );
    let find = |name: &str| -> &Value {
        rules
            .iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("no alert {name}"))
    };
    for (name, hold_for, expr_parts) in [
        (
            "LeaseholdServerDown",
            Some("1m"),
            &[r#"up{job="leasehold"} == 0"#][..],
        ),
        (
            "LeaseholdEtcdUnreachable",
            Some("1m"),
            &["leasehold_etcd_up == 0"][..],
        ),
        (
            "LeaseholdAcquireLatencyHigh",
            Some("5m"),
            &[
                "histogram_quantile(0.99",
                "leasehold_acquire_duration_seconds_bucket[5m]",
                "> 1",
            ][..],
        ),
        (
            "LeaseholdErrorRateHigh",
            Some("5m"),
            &[
                r#"leasehold_http_requests_total{status=~"5.."}[5m]"#,
                "leasehold_http_requests_total[5m]",
                "> 0.05",
            ][..],
        ),
        (
            "LeaseholdHoldsLostRising",
            None,
            &["increase(leasehold_holds_lost_total[10m]) > 0"][..],
        ),
    ] {
        let rule = find(name);
        assert_eq!(rule["for"].as_str(), hold_for, "{name} `for`");
        let expr = rule["expr"].as_str().expect("expr");
        for part in expr_parts {
            assert!(expr.contains(part), "{name} expr lacks `{part}`: {expr}");
        }
    }
    for rule in &rules {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity label `{severity}`"
        );
        for key in ["summary", "description"] {
            let text = rule["annotations"][key].as_str().unwrap_or("");
            assert!(!text.trim().is_empty(), "{name}: no {key} annotation");
        }
    }
}

/// Both servers read the mounted auth file, and it is one the server accepts (authentication is
/// on in the compose stack).
#[test]
fn compose_servers_require_bearer_tokens() {
    let compose = read(&compose_dir().join("docker-compose.yml"));
    assert_eq!(
        compose
            .matches("LEASEHOLD_AUTH_FILE: /etc/leasehold/auth.json")
            .count(),
        2,
        "both replicas read the auth file"
    );
    assert!(compose.contains("./auth.json:/etc/leasehold/auth.json:ro"));
    let tenants = leasehold_server::Tenants::from_file(&compose_dir().join("auth.json"))
        .expect("compose/auth.json loads");
    assert!(tenants.required());
    assert!(
        tenants
            .authenticate(Some("Bearer demo-token-change-me"))
            .is_ok()
    );
    assert!(tenants.authenticate(None).is_err());
}
