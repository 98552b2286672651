//! The relay's configuration checks: defaults, ranges, layering.

use super::*;
use crate::cli::check_environment;
use clap::CommandFactory;

fn base() -> Settings {
    Settings {
        database_url: Some("postgres://u@localhost/db".into()),
        ..Settings::default()
    }
}

#[test]
fn defaults_are_sane() {
    let config = base().validate().expect("valid");
    assert_eq!(config.mode, Mode::Notify);
    assert_eq!(config.max_attempts, 5);
    assert!(config.sweep_interval <= Duration::from_secs(1));
    assert_eq!(config.retention, Duration::from_secs(3600));
    assert_eq!(config.amqp_url, defaults::AMQP_URL);
    assert_eq!(config.metrics_addr, Some(defaults::METRICS_ADDR));
    assert!(!config.metrics_addr_given);
}

#[test]
fn metrics_can_be_turned_off_or_moved() {
    for (text, expected) in [("off", None), ("0.0.0.0:9200", Some("0.0.0.0:9200"))] {
        let config = Settings {
            metrics_addr: Some(text.into()),
            ..base()
        }
        .validate()
        .expect(text);
        assert_eq!(
            config.metrics_addr.map(|a| a.to_string()).as_deref(),
            expected
        );
        assert!(config.metrics_addr_given);
    }
}

#[test]
fn zero_batch_size_is_rejected() {
    let settings = Settings {
        batch_size: Some(0),
        ..base()
    };
    let error = settings.validate().expect_err("zero batch");
    assert!(
        error
            .to_string()
            .contains("OUTBOX_BATCH_SIZE must be at least 1"),
        "{error}"
    );
}

/// Each numeric setting, how to set it, and its allowed range.
type Bound = (&'static str, fn(&mut Settings, u64), u64, u64);

fn bounds() -> Vec<Bound> {
    vec![
        (
            "OUTBOX_BATCH_SIZE",
            |s, v| s.batch_size = Some(v as u32),
            1,
            10_000,
        ),
        (
            "OUTBOX_MAX_IN_FLIGHT",
            |s, v| s.max_in_flight = Some(v as u32),
            1,
            65_535,
        ),
        (
            "OUTBOX_SWEEP_INTERVAL_MS",
            |s, v| s.sweep_interval_ms = Some(v),
            1,
            3_600_000,
        ),
        (
            "OUTBOX_LEASE_MS",
            |s, v| s.lease_ms = Some(v),
            1001,
            86_400_000,
        ),
        (
            "OUTBOX_MAX_ATTEMPTS",
            |s, v| s.max_attempts = Some(v as u32),
            1,
            10_000,
        ),
        (
            "OUTBOX_RETRY_BASE_MS",
            |s, v| s.retry_base_ms = Some(v),
            1,
            2_592_000_000,
        ),
        (
            "OUTBOX_RETRY_MAX_MS",
            |s, v| s.retry_max_ms = Some(v),
            1,
            2_592_000_000,
        ),
        (
            "OUTBOX_MAX_PAYLOAD_BYTES",
            |s, v| s.max_payload_bytes = Some(v as u32),
            1,
            512 << 20,
        ),
        (
            "OUTBOX_CONFIRM_TIMEOUT_MS",
            |s, v| s.confirm_timeout_ms = Some(v),
            1,
            86_399_999,
        ),
        (
            "OUTBOX_MAX_IN_FLIGHT_BYTES",
            |s, v| s.max_in_flight_bytes = Some(v),
            1 << 20,
            4 << 30,
        ),
        (
            "OUTBOX_SHUTDOWN_TIMEOUT_MS",
            |s, v| s.shutdown_timeout_ms = Some(v),
            0,
            3_600_000,
        ),
    ]
}

/// Settings that let `name` reach its own bounds: the retry base must
/// not exceed the retry max, and the confirm timeout must stay below
/// the lease.
fn room_for(name: &str) -> Settings {
    let mut settings = base();
    match name {
        "OUTBOX_RETRY_BASE_MS" => settings.retry_max_ms = Some(2_592_000_000),
        "OUTBOX_RETRY_MAX_MS" => settings.retry_base_ms = Some(1),
        "OUTBOX_CONFIRM_TIMEOUT_MS" => settings.lease_ms = Some(86_400_000),
        "OUTBOX_LEASE_MS" => settings.confirm_timeout_ms = Some(1),
        _ => {}
    }
    settings
}

#[test]
fn every_numeric_setting_is_range_checked() {
    for (name, set, min, max) in bounds() {
        let run = |value: u64| {
            let mut settings = room_for(name);
            set(&mut settings, value);
            settings.validate()
        };
        run(min).unwrap_or_else(|e| panic!("{name}={min}: {e}"));
        run(max).unwrap_or_else(|e| panic!("{name}={max}: {e}"));
        // u64::MAX of a u32 setting: clap refuses it before we see it,
        // the cast here gives u32::MAX, also out of range.
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
            assert!(!error.contains('\n'), "{error}");
        }
    }
}

#[test]
fn confirm_timeout_must_be_below_the_lease() {
    let settings = Settings {
        lease_ms: Some(5_000),
        confirm_timeout_ms: Some(5_000),
        ..base()
    };
    let error = settings.validate().expect_err("equal").to_string();
    assert!(error.contains("less than OUTBOX_LEASE_MS"), "{error}");
    // Unset, it follows a short lease down.
    let config = Settings {
        lease_ms: Some(5_000),
        ..base()
    }
    .validate()
    .expect("valid");
    assert_eq!(config.confirm_timeout, Duration::from_millis(2_500));
    assert_eq!(
        base().validate().expect("valid").confirm_timeout,
        Duration::from_secs(10)
    );
}

#[test]
fn retention_is_bounded() {
    for (text, ok) in [
        ("3650d", true),
        ("3651d", false),
        ("100000000y", false),
        ("0", true),
    ] {
        let settings = Settings {
            retention: Some(text.into()),
            ..base()
        };
        match settings.validate() {
            Ok(_) => assert!(ok, "{text} accepted"),
            Err(e) => {
                assert!(!ok, "{text}: {e}");
                assert!(
                    e.to_string()
                        .starts_with("OUTBOX_RETENTION must be at most"),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn flags_win_over_the_file() {
    let file = Settings {
        batch_size: Some(7),
        max_attempts: Some(9),
        ..Settings::default()
    };
    let flags = Settings {
        batch_size: Some(3),
        ..base()
    };
    let config = flags.over(file).expect("merge").validate().expect("valid");
    assert_eq!((config.batch_size, config.max_attempts), (3, 9));
}

#[test]
fn unknown_environment_setting_is_rejected() {
    let vars = vec![("OUTBOX_BATCH_SIZ".to_string(), "5".to_string())];
    assert!(check_environment(vars.into_iter()).is_err());
}

#[test]
fn retention_accepts_zero_and_durations() {
    for (text, expected) in [("0", 0), ("90s", 90), ("7d", 7 * 86_400)] {
        let settings = Settings {
            retention: Some(text.into()),
            ..base()
        };
        assert_eq!(
            settings.validate().expect(text).retention,
            Duration::from_secs(expected)
        );
    }
    let settings = Settings {
        retention: Some("soon".into()),
        ..base()
    };
    assert!(settings.validate().is_err());
}

#[test]
fn every_run_variable_is_known_without_a_list() {
    let run = ["OUTBOX_CONFIG", "OUTBOX_LOG_FORMAT", "OUTBOX_DATABASE_URL"];
    let settings = ["OUTBOX_METRICS_ADDR", "OUTBOX_ALERT_EMAIL_FROM"];
    for name in run.iter().chain(&settings) {
        let vars = vec![(name.to_string(), "x".to_string())];
        check_environment(vars.into_iter()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let typo = vec![("OUTBOX_BATCH_SIZ".to_string(), "5".to_string())];
    let error = check_environment(typo.into_iter()).expect_err("a typo");
    assert_eq!(
        error.to_string(),
        "unknown setting OUTBOX_BATCH_SIZ in the environment (see `outbox-relay run --help`)"
    );
}

#[test]
fn help_names_the_defaults_validate_applies() {
    let mut command = crate::cli::Cli::command();
    command.build();
    let run = command.find_subcommand("run").expect("run");
    let help = |id: &str| {
        let arg = run.get_arguments().find(|a| a.get_id() == id);
        arg.and_then(|a| a.get_help()).map(|h| h.to_string())
    };
    assert_eq!(
        help("batch_size").as_deref(),
        Some("Rows claimed per query [default: 500]")
    );
    assert!(help("metrics_addr").is_some_and(|h| h.ends_with("[default: 127.0.0.1:9100]")));
    assert!(help("retention").is_some_and(|h| h.ends_with("[default: 1h]")));
}
