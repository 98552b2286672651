//! The dispatch binary's configuration checks: the seed's defaults, names
//! in errors, ranges.

use super::*;
use crate::cli::check_environment;

fn base() -> Settings {
    Settings {
        database_url: Some("postgres://u@localhost/db".into()),
        ..Settings::default()
    }
}

#[test]
fn defaults_are_the_seeds() {
    let config = base().validate().expect("valid");
    let topology = &config.consumer.topology;
    assert_eq!(topology.exchange, "order_confirm_fanoutExchange");
    assert_eq!(topology.queue, "order_confirm_fanoutQueue");
    assert_eq!(topology.dead_letter_queue, "order_confirm_fanoutQueue.dlq");
    assert_eq!(topology.queue_type, QueueType::Classic);
    assert_eq!(config.http_addr.port(), 9000);
    assert_eq!(config.consumer.amqp_url, outbox_service::amqp::DEFAULT_URL);
    assert!(config.dispatcher.slow_order.is_none());
}

#[test]
fn derived_names_follow_the_queue() {
    let settings = Settings {
        queue: Some("q".into()),
        ..base()
    };
    let topology = settings.validate().expect("valid").consumer.topology;
    assert_eq!(
        (
            topology.retry_queue.as_str(),
            topology.dead_letter_exchange.as_str()
        ),
        ("q.retry", "q.dlx")
    );
}

#[test]
fn bad_values_are_named() {
    let cases = [
        (
            Settings {
                database_url: None,
                ..base()
            },
            "DISPATCH_DATABASE_URL",
        ),
        (
            Settings {
                queue_type: Some("stream".into()),
                ..base()
            },
            "DISPATCH_QUEUE_TYPE",
        ),
        (
            Settings {
                prefetch: Some(0),
                ..base()
            },
            "DISPATCH_PREFETCH",
        ),
        (
            Settings {
                http_addr: Some("nine".into()),
                ..base()
            },
            "DISPATCH_HTTP_ADDR",
        ),
        (
            Settings {
                slow_order_ms: Some(5),
                ..base()
            },
            "DISPATCH_SLOW_ORDER_ID",
        ),
        (
            Settings {
                riders: Some(" , ".into()),
                ..base()
            },
            "DISPATCH_RIDERS",
        ),
        (
            Settings {
                queue_expires_ms: Some(0),
                ..base()
            },
            "DISPATCH_QUEUE_EXPIRES_MS",
        ),
        (
            Settings {
                retry_max_ms: Some(10),
                ..base()
            },
            "DISPATCH_RETRY_MAX_MS",
        ),
    ];
    for (settings, expected) in cases {
        let error = settings.validate().expect_err(expected).to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

#[test]
fn every_numeric_setting_is_range_checked() {
    type Bound = (&'static str, fn(&mut Settings, u64), u64, u64);
    let bounds: [Bound; 6] = [
        (
            "DISPATCH_QUEUE_EXPIRES_MS",
            |s, v| s.queue_expires_ms = Some(v),
            1,
            2_592_000_000,
        ),
        (
            "DISPATCH_MAX_DELIVERIES",
            |s, v| s.max_deliveries = Some(v as u32),
            1,
            10_000,
        ),
        (
            "DISPATCH_RETRY_BASE_MS",
            |s, v| s.retry_base_ms = Some(v),
            1,
            2_592_000_000,
        ),
        (
            "DISPATCH_RETRY_MAX_MS",
            |s, v| s.retry_max_ms = Some(v),
            1,
            2_592_000_000,
        ),
        (
            "DISPATCH_SHUTDOWN_TIMEOUT_MS",
            |s, v| s.shutdown_timeout_ms = Some(v),
            0,
            3_600_000,
        ),
        (
            "DISPATCH_SLOW_ORDER_MS",
            |s, v| s.slow_order_ms = Some(v),
            1,
            3_600_000,
        ),
    ];
    for (name, set, min, max) in bounds {
        let run = |value: u64| {
            // Room for the setting's own bounds: base ≤ max, a slow order id.
            let mut settings = Settings {
                retry_base_ms: Some(1),
                retry_max_ms: Some(2_592_000_000),
                slow_order_id: Some(1),
                ..base()
            };
            set(&mut settings, value);
            settings.validate()
        };
        run(min).unwrap_or_else(|e| panic!("{name}={min}: {e}"));
        run(max).unwrap_or_else(|e| panic!("{name}={max}: {e}"));
        let mut refused = vec![max + 1, u64::MAX];
        if min > 0 {
            refused.push(min - 1);
        }
        for value in refused {
            let error = run(value)
                .expect_err(&format!("{name}={value}"))
                .to_string();
            assert!(error.starts_with(name), "{name}={value}: {error}");
            assert!(error.contains("allowed:"), "{name}={value}: {error}");
        }
    }
}

#[test]
fn slow_order_defaults_to_the_seeds_three_seconds() {
    let settings = Settings {
        slow_order_id: Some(100001),
        ..base()
    };
    let slow = settings.validate().expect("valid").dispatcher.slow_order;
    assert_eq!(slow.map(|s| s.delay), Some(Duration::from_secs(3)));
}

#[test]
fn unknown_environment_setting_is_rejected() {
    let typo = vec![("DISPATCH_PREFECH".to_string(), "5".to_string())];
    assert!(check_environment(typo.into_iter()).is_err());
    let known = vec![("DISPATCH_PREFETCH".to_string(), "5".to_string())];
    assert!(check_environment(known.into_iter()).is_ok());
}
