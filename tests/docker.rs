//! The docker stack: no engine runs here, but `docker-compose config` checks
//! the file when the tool is installed (Debian package `docker-compose`).

use std::process::Command;

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
    for service in ["postgres:", "rabbitmq:", "orders:", "relay:", "dispatch:"] {
        assert!(config.contains(service), "service {service} missing");
    }
    // Least privilege: only postgres-init.sql runs as the superuser.
    assert!(!config.contains("postgres:postgres@"), "{config}");
    for url in [
        "OUTBOX_DATABASE_URL: postgres://outbox_relay:",
        "DISPATCH_DATABASE_URL: postgres://dispatch_consumer:",
    ] {
        assert!(config.contains(url), "{url} missing");
    }
}
