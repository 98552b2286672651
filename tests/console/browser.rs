//! The console in a real headless browser: Debian's chromium driven by
//! playwright-core (tests/browser/console.mjs, installed by
//! tests/browser/install.sh). It loads the overview, filters the dead
//! letters by exchange, opens one, requeues two after a dry-run preview,
//! and finds its change in the audit trail; then the database must agree.
//!
//! `OUTBOX_SCREENSHOTS=DIR` keeps the screenshots there (docs/ takes the
//! overview and the dead-letter page from such a run).

use std::path::PathBuf;
use std::process::Command;

use outbox_tests::console::{RunningConsole, TOKEN};
use outbox_tests::*;

use super::{count, dead_letters};

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[tokio::test]
async fn an_operator_filters_dry_runs_and_requeues_dead_letters_in_a_browser() {
    let install = Command::new(browser_dir().join("install.sh"))
        .status()
        .expect("run tests/browser/install.sh");
    assert!(install.success(), "tests/browser/install.sh failed");

    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("orders");
    let other = unique_name("billing");
    dead_letters(&client, &exchange, 5, "NOT_FOUND - no exchange 'orders'").await;
    dead_letters(&client, &other, 3, "returned: NO_ROUTE").await;
    // A published hour for the lag chart.
    client
        .batch_execute(&format!(
            "SELECT outbox.enqueue('{exchange}', 'rk', jsonb_build_object('n', g)) \
             FROM generate_series(1, 40) g; \
             UPDATE outbox.messages SET created_at = now() - (id % 50) * interval '1 minute', \
                    published_at = now() - (id % 50) * interval '1 minute' \
                                   + (id % 7) * interval '150 milliseconds' \
             WHERE dead_at IS NULL"
        ))
        .await
        .expect("published rows");
    let console = RunningConsole::start(&db.url, &[]).await;

    let screenshots = match std::env::var_os("OUTBOX_SCREENSHOTS") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(unique_name("console_shots")),
    };
    let run = tokio::process::Command::new("node")
        .arg(browser_dir().join("console.mjs"))
        .args([
            "--url",
            &console.url(),
            "--token",
            TOKEN,
            "--exchange",
            &exchange,
        ])
        .arg("--screenshots")
        .arg(&screenshots)
        .output()
        .await
        .expect("run node");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    for shot in ["console-overview.png", "console-dead-letters.png"] {
        assert!(
            screenshots.join(shot).is_file(),
            "no {shot} in {screenshots:?}"
        );
    }

    // What the page said it did, the database did.
    let still_dead =
        format!("SELECT count(*) FROM outbox.dead_letters WHERE exchange = '{exchange}'");
    assert_eq!(count(&db, &still_dead).await, 3);
    let other_dead = format!("SELECT count(*) FROM outbox.dead_letters WHERE exchange = '{other}'");
    assert_eq!(
        count(&db, &other_dead).await,
        3,
        "the filter kept the other exchange out"
    );
    let logged = count(
        &db,
        "SELECT count(*) FROM outbox.admin_log \
         WHERE via = 'console' AND actor = 'tester' AND action = 'requeue' \
           AND NOT dry_run AND matched = 2 AND changed = 2",
    )
    .await;
    assert_eq!(logged, 1);
    let previewed = count(
        &db,
        "SELECT count(*) FROM outbox.admin_log WHERE via = 'console' AND dry_run",
    )
    .await;
    assert!(
        previewed >= 1,
        "the requeue was previewed with a dry run first"
    );
}
