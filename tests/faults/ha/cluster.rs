//! The HA cluster of `scripts/ha-cluster.sh` as the test sees it: bringing
//! it up and down, faulting it, and asking which node a process or a
//! quorum queue is on.

use outbox_tests::Servers;
use outbox_tests::dispatch::wait_for;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ha-cluster.sh");
/// The script's exit code when rabbitmq-server or initdb is not installed.
const NOT_INSTALLED: i32 = 3;
const FIRST_AMQP_PORT: u16 = 5681;
pub const NODES: u16 = 3;

fn amqp_url(node: u16) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        FIRST_AMQP_PORT + node - 1
    )
}

/// The nodes' AMQP URLs in `order`, comma-separated.
pub fn node_list(order: impl Iterator<Item = u16>) -> String {
    order.map(amqp_url).collect::<Vec<_>>().join(",")
}

pub fn servers() -> Servers {
    Servers {
        admin_url: "postgres://postgres@127.0.0.1:5441,127.0.0.1:5442/postgres\
                    ?target_session_attrs=read-write"
            .into(),
        amqp_url: node_list(1..=NODES),
        quorum_queues: true,
    }
}

/// The cluster while the test runs; down when it ends, however it ends
/// (its logs kept in target/ha-logs when it failed, or with `HA_KEEP_LOGS`).
pub struct Cluster;

impl Cluster {
    /// `None` (the test is skipped) when the servers are not installed.
    pub async fn up() -> Option<Cluster> {
        let check = script(&["check"]).await;
        if check.status.code() == Some(NOT_INSTALLED) {
            eprintln!("skipped: {}", String::from_utf8_lossy(&check.stderr).trim());
            return None;
        }
        assert!(check.status.success(), "ha-cluster.sh check: {check:?}");
        let cluster = Cluster;
        cluster.run(&["up"]).await;
        Some(cluster)
    }

    pub async fn run(&self, args: &[&str]) {
        let output = script(args).await;
        assert!(
            output.status.success(),
            "ha-cluster.sh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("HA_KEEP_LOGS").is_some() {
            let kept = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/ha-logs");
            let _ = std::fs::remove_dir_all(kept);
            let _ = std::process::Command::new(SCRIPT)
                .args(["save-logs", kept])
                .output();
            eprintln!("the cluster's logs are in {kept}");
        }
        let _ = std::process::Command::new(SCRIPT).arg("down").output();
    }
}

async fn script(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(SCRIPT)
        .args(args)
        .output()
        .await
        .expect("run scripts/ha-cluster.sh")
}

/// The node (1 to 3) process `pid` has an AMQP connection to, from its sockets.
pub async fn connected_node(pid: u32) -> Option<u16> {
    let output = tokio::process::Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .output()
        .await
        .expect("run ss");
    let owner = format!("pid={pid},");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&owner))
        .filter_map(|line| {
            line.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .find(|port: &u16| (FIRST_AMQP_PORT..FIRST_AMQP_PORT + NODES).contains(port))
        .map(|port| port - FIRST_AMQP_PORT + 1)
}

/// Waits until `pid` is connected to a node other than `lost`; that node.
pub async fn moved_from(pid: u32, lost: u16, who: &str) -> u16 {
    wait_for(&format!("the {who} connects to another node"), || async {
        connected_node(pid).await.filter(|node| *node != lost)
    })
    .await
}

/// The leader of quorum queue `queue` and how many members are online,
/// asked of node `ask`.
pub async fn quorum_state(ask: u16, queue: &str) -> Option<(u16, usize)> {
    // Through the script: with HA_ROOT its nodes run in another root.
    let output = tokio::process::Command::new(SCRIPT)
        .args(["ctl", "-n", &format!("ha{ask}@localhost"), "list_queues"])
        .args(["name", "leader", "online", "--formatter", "json", "--quiet"])
        .output()
        .await
        .expect("run scripts/ha-cluster.sh ctl");
    let queues: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let entry = queues.as_array()?.iter().find(|q| q["name"] == queue)?;
    let leader = entry["leader"].as_str()?;
    let node = leader.strip_prefix("ha")?.split('@').next()?.parse().ok()?;
    Some((node, entry["online"].as_array()?.len()))
}
