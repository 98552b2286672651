//! Bad configuration exits non-zero with one clear line.

use std::process::Command;

use outbox_tests::*;

fn relay_run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(workspace_binary("outbox-relay"));
    command.arg("run").args(args);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("OUTBOX_")) {
        command.env_remove(name);
    }
    command
        .env(
            "OUTBOX_DATABASE_URL",
            "postgres://app:s3cret@127.0.0.1:5432/x",
        )
        .env("OUTBOX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run outbox-relay");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Flags, environment, and what stderr must say.
type BadConfig<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn bad_configuration_exits_non_zero_with_one_clear_line() {
    let config_file = std::env::temp_dir().join(format!("{}.toml", unique_name("relay_config")));
    std::fs::write(&config_file, "batch_size = 10\nbatch_sise = 5\n").expect("write config");
    let config_arg = config_file.to_string_lossy().into_owned();
    let cases: Vec<BadConfig> = vec![
        (
            vec![],
            vec![("OUTBOX_BATCH_SIZ", "5")],
            "unknown setting OUTBOX_BATCH_SIZ",
        ),
        (
            vec!["--batch-size", "0"],
            vec![],
            "OUTBOX_BATCH_SIZE must be at least 1",
        ),
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqp://u:s3cret@host:port/")],
            "invalid AMQP URL",
        ),
        (
            vec![],
            vec![("OUTBOX_DATABASE_URL", "postgres://app:s3cret@h:port/x")],
            "PostgreSQL URL",
        ),
        // A password with `/`, `?` or `@` unescaped, or a URL without `//`
        // (which lapin's parser quotes whole).
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqp://guest:s3cret/x@host/%2f")],
            "invalid AMQP URL",
        ),
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqps://guest:s3cret?@host:99999/")],
            "invalid AMQP URL",
        ),
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqp:guest:s3cret@host")],
            "invalid AMQP URL",
        ),
        (vec![], vec![("OUTBOX_MODE", "push")], "OUTBOX_MODE must be"),
        // Upper bounds: refused at start, not by every claim afterwards.
        (
            vec![],
            vec![("OUTBOX_LEASE_MS", "18446744073709551615")],
            "OUTBOX_LEASE_MS must be at most 86400000",
        ),
        (
            vec!["--retry-max-ms", "99999999999"],
            vec![],
            "OUTBOX_RETRY_MAX_MS must be at most",
        ),
        (
            vec![],
            vec![("OUTBOX_RETENTION", "100000000y")],
            "OUTBOX_RETENTION must be at most",
        ),
        (
            vec![],
            vec![("OUTBOX_MAX_PAYLOAD_BYTES", "536870913")],
            "OUTBOX_MAX_PAYLOAD_BYTES must be at most 536870912",
        ),
        (
            vec![],
            vec![("OUTBOX_CONFIRM_TIMEOUT_MS", "30000")],
            "OUTBOX_CONFIRM_TIMEOUT_MS must be less than OUTBOX_LEASE_MS",
        ),
        (
            vec!["--config", &config_arg],
            vec![],
            "unknown field `batch_sise`",
        ),
    ];
    for (args, env, expected) in cases {
        let (ok, stderr) = relay_run(&args, &env);
        assert!(!ok, "{args:?} {env:?} must fail");
        assert!(stderr.contains(expected), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
    }
    let _ = std::fs::remove_file(config_file);
}
