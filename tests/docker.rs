//! The docker stack: no engine runs here, but `docker-compose config` checks
//! the file when the tool is installed (Debian package `docker-compose`).

use std::process::Command;

use outbox_tests::observe::{documented_metrics, metric_names};

#[test]
fn compose_file_is_accepted_by_docker_compose() {
    let compose = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker/compose.yml");
    let Ok(output) = Command::new("docker-compose")
        .args(["-f", compose, "config"])
        .output()
    else {
        eprintln!("docker-compose is not installed: skipping");
        return;
    };
    assert!(
        output.status.success(),
        "docker-compose config failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config = String::from_utf8_lossy(&output.stdout);
    for service in [
        "postgres:",
        "rabbitmq:",
        "orders:",
        "relay:",
        "console:",
        "dispatch:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(config.contains(service), "service {service} missing");
    }
    // Least privilege: only postgres-init.sql runs as the superuser.
    assert!(!config.contains("postgres:postgres@"), "{config}");
    for url in [
        "OUTBOX_DATABASE_URL: postgres://outbox_relay:",
        "OUTBOX_DATABASE_URL: postgres://outbox_console:",
        "DISPATCH_DATABASE_URL: postgres://dispatch_consumer:",
    ] {
        assert!(config.contains(url), "{url} missing");
    }
}

/// The dashboard and the alerts query only metrics docs/operations.md
/// documents (the metrics tests check that each documented one is
/// served), and Prometheus scrapes the ports the stack serves them on.
#[test]
fn dashboard_and_alerts_use_documented_metrics() {
    let docker = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker");
    let read = |file: &str| {
        std::fs::read_to_string(format!("{docker}/{file}"))
            .unwrap_or_else(|e| panic!("read docker/{file}: {e}"))
    };
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/dashboards/outbox.json")).expect("dashboard is JSON");
    let mut queries = String::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push_str(target["expr"].as_str().expect("expr"));
            queries.push('\n');
        }
    }
    let alerts = read("alerts.yml");
    for prefix in ["outbox_", "consumer_"] {
        let documented = documented_metrics(prefix);
        for (file, text) in [("the dashboard", &queries), ("alerts.yml", &alerts)] {
            let used = metric_names(text, prefix);
            assert!(!used.is_empty(), "{file} uses no {prefix} metric");
            let unknown: Vec<_> = used.difference(&documented).collect();
            assert!(unknown.is_empty(), "{file} uses undocumented {unknown:?}");
        }
    }
    let scrape = read("prometheus.yml");
    let compose = read("compose.yml");
    for (target, served) in [
        ("relay:9100", "OUTBOX_METRICS_ADDR: 0.0.0.0:9100"),
        ("dispatch:9000", "DISPATCH_HTTP_ADDR: 0.0.0.0:9000"),
    ] {
        assert!(
            scrape.contains(target),
            "prometheus.yml does not scrape {target}"
        );
        assert!(
            compose.contains(served),
            "compose.yml does not serve {target}"
        );
    }
}
