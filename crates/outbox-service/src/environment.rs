//! Refuses an unknown `PREFIX_*` environment variable (a typo would
//! otherwise silently leave a default in force). The known names come from
//! the clap definitions themselves, so no list is kept by hand.

use clap::Command;

/// `--help` text ending in the default, as in
/// `#[arg(long, env = "X_SIZE", help = with_default!("Rows per query", defaults::SIZE))]`:
/// settings stay `Option` (so a config file can sit under the flags) and
/// the default is written once, where the validation applies it.
#[macro_export]
macro_rules! with_default {
    ($text:literal, $default:expr) => {
        format!(concat!($text, " [default: {}]"), $default)
    };
}

/// A variable that starts with the binary's prefix but names no setting.
#[derive(Debug, thiserror::Error)]
#[error("unknown setting {name} in the environment (see `{help}`)")]
pub struct UnknownSetting {
    pub name: String,
    help: String,
}

/// Every `env` name of `command`'s arguments and of its subcommands'.
pub fn known(command: &Command) -> Vec<String> {
    let mut names: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    for sub in command.get_subcommands() {
        names.extend(known(sub));
    }
    names
}

/// Fails on the first variable of `vars` that starts with `prefix` and is
/// not one of `command`'s (nor one of `also`: names read outside clap).
/// The error points at `--help` of `command` under its full name once
/// clap has built it (`outbox-relay run`), else under its own.
pub fn check(
    command: &Command,
    prefix: &str,
    also: &[&str],
    vars: impl Iterator<Item = (String, String)>,
) -> Result<(), UnknownSetting> {
    let known = known(command);
    for (name, _) in vars {
        let listed = known.contains(&name) || also.contains(&name.as_str());
        if name.starts_with(prefix) && !listed {
            return Err(UnknownSetting {
                name,
                help: format!(
                    "{} --help",
                    command.get_bin_name().unwrap_or(command.get_name())
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn command() -> Command {
        Command::new("tool")
            .arg(Arg::new("top").long("top").env("TOOL_TOP"))
            .subcommand(Command::new("run").arg(Arg::new("deep").long("deep").env("TOOL_DEEP")))
    }

    fn vars(names: &[&str]) -> impl Iterator<Item = (String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), String::new()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn names_come_from_every_subcommand() {
        let command = command();
        assert!(
            check(
                &command,
                "TOOL_",
                &[],
                vars(&["TOOL_TOP", "TOOL_DEEP", "PATH"])
            )
            .is_ok()
        );
        assert!(check(&command, "TOOL_", &["TOOL_EXTRA"], vars(&["TOOL_EXTRA"])).is_ok());
        let error = check(&command, "TOOL_", &[], vars(&["TOOL_DEPE"])).expect_err("a typo");
        assert_eq!(
            error.to_string(),
            "unknown setting TOOL_DEPE in the environment (see `tool --help`)"
        );
    }
}
