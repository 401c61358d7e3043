//! What the CLI prints: results on stdout, errors and `lock`'s events on stderr, as text or as
//! one JSON object per line; and the `-v` log of renewals and fail-overs.

use std::io::IsTerminal;

use serde_json::{Value, json};

use super::{EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_USAGE, Output};
use crate::Error;

/// The output format, and the printing that depends on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    json: bool,
}

impl Out {
    pub fn new(output: Output) -> Self {
        Self {
            json: output == Output::Json,
        }
    }

    /// True for `--output json`.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// A command's result, on stdout.
    pub fn result(&self, text: &str, value: &Value) {
        if self.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    }

    /// Something `lock` reports while CMD owns stdout: on stderr, as `leasehold: text`, or as
    /// the JSON `value` (which should carry an `"event"`).
    pub fn event(&self, text: &str, value: Value) {
        if self.json {
            eprintln!("{value}");
        } else {
            eprintln!("leasehold: {text}");
        }
    }

    /// Prints `err` and returns the exit code for it.
    pub fn fail(&self, err: &Error) -> u8 {
        let code = if err.is_retryable() {
            EXIT_UNAVAILABLE
        } else {
            EXIT_ERROR
        };
        self.fail_with(err, code, None)
    }

    /// Prints `err` (after `context`, in text) and returns `exit_code`.
    pub fn fail_with(&self, err: &Error, exit_code: u8, context: Option<&str>) -> u8 {
        if self.json {
            let mut error = json!({"code": err.code(), "message": err.to_string()});
            if let Error::LockHeld { holder } = err {
                error["holder"] = json!(holder);
            }
            if let Error::Overloaded {
                retry_after: Some(after),
                ..
            } = err
            {
                error["retry_after_ms"] = json!(after.as_millis() as u64);
            }
            eprintln!("{}", json!({"error": error, "exit_code": exit_code}));
        } else {
            match context {
                Some(context) => eprintln!("leasehold: {context}: {err}"),
                None => eprintln!("leasehold: {err}"),
            }
        }
        exit_code
    }

    /// A usage error found after parsing (a value that does not fit with another).
    pub fn usage(&self, message: &str) -> u8 {
        if self.json {
            eprintln!(
                "{}",
                json!({"error": {"code": "usage", "message": message}, "exit_code": EXIT_USAGE})
            );
        } else {
            eprintln!("leasehold: {message}");
        }
        EXIT_USAGE
    }
}

/// Reports a command line the parser refused (in JSON if `--output json` was asked for) and
/// returns the exit code; `--help` and `--version` print as usual.
pub(crate) fn usage_error(err: clap::Error) -> u8 {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return 0;
    }
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .windows(2)
        .any(|w| w[0] == "--output" && w[1] == "json")
        || args.iter().any(|a| a == "--output=json");
    if json {
        let message = err.render().to_string();
        let message = message.trim().trim_start_matches("error: ");
        eprintln!(
            "{}",
            json!({"error": {"code": "usage", "message": message}, "exit_code": EXIT_USAGE})
        );
    } else {
        let _ = err.print();
    }
    EXIT_USAGE
}

/// Sends the crate's events to stderr: warnings (renewal trouble, a lost hold) always, and with
/// `-v` acquires, renewals, fail-overs and retries too (`-vv`: everything).
pub(crate) fn init_logging(verbose: u8, output: Output) {
    let level = match verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::new(format!("leasehold={level}"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match output {
        Output::Json => builder.json().try_init(),
        Output::Text => builder.compact().try_init(),
    };
}
