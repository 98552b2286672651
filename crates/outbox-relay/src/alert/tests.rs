//! The alerter against real HTTP and SMTP receivers: delivery, timeouts,
//! coalescing, bad configurations.

use super::receivers::{http_receiver, hung_http_receiver, smtp_receiver};
use super::*;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn dead_letter() -> DeadLetter {
    DeadLetter {
        message_id: uuid::Uuid::new_v4(),
        exchange: "orders".into(),
        routing_key: "order.created".into(),
        ordering_key: Some("order-42".into()),
        attempts: 5,
        last_error: "exchange not found".into(),
        database: "relay@127.0.0.1:5432/shop".into(),
    }
}

#[tokio::test]
async fn alerts_reach_webhook_and_mailbox() {
    let (webhook_url, mut hooks) = http_receiver().await;
    let (smtp_url, mut mails) = smtp_receiver().await;
    let alerter = Alerter::new(&AlertConfig {
        webhook_url: Some(webhook_url),
        smtp_url: Some(smtp_url),
        smtp_from: "outbox-relay@localhost".into(),
        smtp_to: vec!["ops@example.com".into()],
    })
    .expect("valid config");

    // Twice: the receivers and the alerter each serve more than one alert.
    for _ in 0..2 {
        let dead = dead_letter();
        let outcome = alerter.send(&dead).await;
        assert_eq!(
            outcome,
            AlertOutcome {
                webhook_ok: Some(true),
                email_ok: Some(true)
            }
        );

        let hook = timeout(WAIT, hooks.recv()).await.expect("webhook in time");
        let hook = hook.expect("webhook body");
        assert_eq!(hook["kind"], "outbox.dead_letter");
        assert_eq!(hook["message_id"], dead.message_id.to_string());
        assert_eq!(hook["ordering_key"], "order-42");
        assert_eq!(hook["attempts"], 5);
        let at = hook["at"].as_str().expect("at is a string");
        assert!(humantime::parse_rfc3339(at).is_ok(), "at: {at}");

        let mail = timeout(WAIT, mails.recv()).await.expect("mail in time");
        let mail = mail.expect("mail data");
        assert!(mail.contains(&dead.message_id.to_string()), "{mail}");
        assert!(mail.contains("To: ops@example.com"), "{mail}");
        assert!(mail.contains("From: outbox-relay@localhost"), "{mail}");
        assert!(mail.contains("exchange not found"), "{mail}");
    }
}

#[tokio::test]
async fn bad_urls_are_rejected_without_the_password() {
    let webhook = |url: &str| AlertConfig {
        webhook_url: Some(url.into()),
        ..AlertConfig::default()
    };
    let smtp = |url: &str| AlertConfig {
        smtp_url: Some(url.into()),
        smtp_from: "relay@localhost".into(),
        smtp_to: vec!["ops@example.com".into()],
        ..AlertConfig::default()
    };
    for config in [
        webhook("ftp://alice:s3cret@example.com/hook"),
        webhook("http://alice:s3cret@exa mple.com/hook"),
        webhook("alice:s3cret@example.com"),
        smtp("smtpx://alice:s3cret@mail.example.com"),
        smtp("smtp://alice:s3cret@mail.example.com?tls=sometimes"),
        smtp("smtp://alice:s3cret@[::1"),
    ] {
        let error = Alerter::new(&config).err().expect("rejected");
        let text = error.to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
}

#[tokio::test]
async fn bad_addresses_are_rejected() {
    let config = AlertConfig {
        smtp_url: Some("smtp://127.0.0.1:2525".into()),
        smtp_from: "relay@localhost".into(),
        smtp_to: vec!["not an address".into()],
        ..AlertConfig::default()
    };
    let error = Alerter::new(&config).err().expect("rejected");
    assert!(
        matches!(
            error,
            AlertError::Address {
                field: "smtp_to",
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn unreachable_webhook_fails_quickly() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);

    let alerter = Alerter::new(&AlertConfig {
        webhook_url: Some(format!("http://127.0.0.1:{port}/hook")),
        ..AlertConfig::default()
    })
    .expect("valid config");
    let outcome = timeout(WAIT, alerter.send(&dead_letter()))
        .await
        .expect("send does not hang");
    assert_eq!(
        outcome,
        AlertOutcome {
            webhook_ok: Some(false),
            email_ok: None
        }
    );
}

#[tokio::test]
async fn a_thousand_dead_letters_make_few_webhook_calls_that_count_them_all() {
    let (webhook_url, mut hooks) = http_receiver().await;
    let (smtp_url, mut mails) = smtp_receiver().await;
    let interval = Duration::from_millis(300);
    let alerter = Alerter::new(&AlertConfig {
        webhook_url: Some(webhook_url),
        smtp_url: Some(smtp_url),
        smtp_from: "outbox-relay@localhost".into(),
        smtp_to: vec!["ops@example.com".into()],
    })
    .expect("valid config")
    .with_interval(interval);
    let dead: Vec<DeadLetter> = (0..1000).map(|_| dead_letter()).collect();
    let ids: std::collections::HashSet<_> = dead.iter().map(|d| d.message_id).collect();
    for one in &dead {
        alerter.raise(one.clone());
    }

    let mut counted = 0;
    let mut calls = 0;
    while counted < 1000 {
        let hook = timeout(WAIT, hooks.recv()).await.expect("webhook in time");
        let hook = hook.expect("webhook body");
        calls += 1;
        counted += hook["count"].as_u64().expect("count");
        let listed = hook["message_ids"].as_array().expect("ids");
        assert!(!listed.is_empty() && listed.len() <= SAMPLE, "{hook}");
        for id in listed {
            let id = id.as_str().and_then(|id| id.parse().ok()).expect("uuid");
            assert!(ids.contains(&id), "{hook}");
        }
        assert_eq!(hook["message_id"], listed[0], "{hook}");
        if calls == 1 {
            // The first raised is the first reported.
            assert_eq!(hook["message_id"], dead[0].message_id.to_string());
        }
    }
    assert_eq!(counted, 1000);
    // The first at once, the rest after one interval (two calls unless
    // this machine is slow enough to spread the raises over an interval).
    assert!(calls <= 3, "{calls} webhook calls");
    for _ in 0..calls {
        let mail = timeout(WAIT, mails.recv()).await.expect("mail in time");
        assert!(mail.expect("mail data").contains("exchange not found"));
    }
    // Nothing more comes.
    assert!(timeout(interval * 2, hooks.recv()).await.is_err());
    assert_eq!(alerter.waiting(), 0);
}

#[tokio::test]
async fn a_hung_webhook_never_blocks_raise() {
    let (webhook_url, mut requests) = hung_http_receiver().await;
    let alerter = Alerter::new(&AlertConfig {
        webhook_url: Some(webhook_url),
        ..AlertConfig::default()
    })
    .expect("valid config")
    .with_interval(Duration::from_millis(50));
    alerter.raise(dead_letter());
    // The worker is now stuck in a POST that is never answered.
    timeout(WAIT, requests.recv())
        .await
        .expect("the webhook was called")
        .expect("receiver open");
    let started = std::time::Instant::now();
    for _ in 0..10_000 {
        alerter.raise(dead_letter());
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "10,000 raises took {took:?}");
    assert_eq!(alerter.waiting(), 10_000);
}

#[tokio::test]
async fn log_only_by_default() {
    let alerter = Alerter::new(&AlertConfig::default()).expect("valid config");
    assert_eq!(alerter.send(&dead_letter()).await, AlertOutcome::default());
}
