//! The deployment artefacts, checked against the code they drive:
//!
//! - `app.yaml` (Databricks Apps): its command runs this binary's `serve` with a config file
//!   that exists, through the loader the binary asks for; every variable that file needs is set
//!   by app.yaml or injected by the platform;
//! - `config/databricks.toml`, through the real binary's `check-config`: accepted with a
//!   realistic platform environment (secrets redacted, no warnings), refused without it, naming
//!   each missing variable;
//! - `docker/Dockerfile`: copies the file `cargo build --release` produces, runs real
//!   subcommands with a shipped config, health-checks with `healthcheck`;
//! - the CLI pieces the artefacts rely on: `healthcheck` (ok / unhealthy / unreachable),
//!   `serve`'s start-up and warning lines, one-line config errors.
//!
//! Nothing here needs a service: no Postgres, MLflow or agent is contacted.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use feedback_proxy::config::{Config, Env};
use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_feedback-proxy");

/// Set by Databricks Apps in every app ("Databricks Apps system environment", default
/// environment variables). `DATABRICKS_APP_PORT` is also the one name the platform substitutes
/// in `command`.
const PLATFORM_ENV: [&str; 6] = [
    "DATABRICKS_APP_NAME",
    "DATABRICKS_WORKSPACE_ID",
    "DATABRICKS_HOST",
    "DATABRICKS_APP_PORT",
    "DATABRICKS_CLIENT_ID",
    "DATABRICKS_CLIENT_SECRET",
];

/// Set by Databricks Apps for the app's first Lakebase database resource ("Add a Lakebase
/// resource to a Databricks app", environment variables).
const DATABASE_RESOURCE_ENV: [&str; 6] = [
    "PGAPPNAME",
    "PGDATABASE",
    "PGHOST",
    "PGPORT",
    "PGSSLMODE",
    "PGUSER",
];

/// Variables app.yaml may set that the process reads directly rather than through the config
/// file (the logger).
const READ_BY_THE_PROCESS: [&str; 2] = ["NO_COLOR", "RUST_LOG"];

/// The x86-64 dynamic loader app.yaml starts the binary with.
const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

/// A client secret that must never appear in any output.
const SECRET: &str = "dose-5ecret-0123456789abcdef";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The binary's file name as cargo builds it (what app.yaml and the Dockerfile must name).
fn bin_name() -> String {
    Path::new(BIN)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("binary has a file name")
        .to_owned()
}

/// A realistic Databricks Apps environment with a Lakebase resource and app.yaml's own entries.
fn platform_env() -> BTreeMap<String, String> {
    let sp = "6f1e1c2a-0b7d-4e5f-9a8b-1c2d3e4f5a6b";
    [
        ("DATABRICKS_APP_NAME", "feedback-proxy"),
        ("DATABRICKS_WORKSPACE_ID", "1234567890123456"),
        // As the platform may give it: without a scheme.
        (
            "DATABRICKS_HOST",
            "adb-1234567890123456.7.azuredatabricks.net",
        ),
        ("DATABRICKS_APP_PORT", "8000"),
        ("DATABRICKS_CLIENT_ID", sp),
        ("DATABRICKS_CLIENT_SECRET", SECRET),
        ("PGAPPNAME", "feedback-proxy"),
        ("PGDATABASE", "databricks_postgres"),
        (
            "PGHOST",
            "instance-0a1b2c3d-4e5f-6789-abcd-ef0123456789.database.azuredatabricks.net",
        ),
        ("PGPORT", "5432"),
        ("PGSSLMODE", "require"),
        ("PGUSER", sp),
        ("MLFLOW_EXPERIMENT_ID", "3141592653589793"),
        (
            "AGENT_URL",
            "https://agent-1234567890123456.11.azure.databricksapps.com",
        ),
        ("NO_COLOR", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn run(args: &[&str], env: &BTreeMap<String, String>) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(repo(""))
        .env_clear()
        .envs(env)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// app.yaml

/// app.yaml, parsed and checked for shape: only `command` and `env` at the top level, each env
/// entry a `name` with exactly one of `value` / `valueFrom` (a typo such as `valuefrom` would
/// otherwise be silently ignored by a lenient reader).
struct AppYaml {
    command: Vec<String>,
    env: Vec<EnvEntry>,
}

#[derive(Debug)]
struct EnvEntry {
    name: String,
    value: Option<String>,
    value_from: Option<String>,
}

fn str_of(y: &Yaml, what: &str) -> String {
    y.as_str()
        .unwrap_or_else(|| panic!("app.yaml: {what} must be a string, got {y:?}"))
        .to_owned()
}

fn app_yaml() -> AppYaml {
    let docs = YamlLoader::load_from_str(&read("app.yaml")).expect("app.yaml is valid YAML");
    assert_eq!(docs.len(), 1, "app.yaml holds one document");
    let top = docs[0].as_hash().expect("app.yaml is a mapping");
    for key in top.keys() {
        let key = str_of(key, "a top-level key");
        assert!(
            ["command", "env"].contains(&key.as_str()),
            "app.yaml: unexpected top-level key {key:?}"
        );
    }
    let command = docs[0]["command"]
        .as_vec()
        .expect("app.yaml: command is a list (the platform runs it without a shell)")
        .iter()
        .map(|a| str_of(a, "a command argument"))
        .collect();
    let mut env = Vec::new();
    for item in docs[0]["env"].as_vec().expect("app.yaml: env is a list") {
        let entry = item.as_hash().expect("app.yaml: env entries are mappings");
        for key in entry.keys() {
            let key = str_of(key, "an env entry key");
            assert!(
                ["name", "value", "valueFrom"].contains(&key.as_str()),
                "app.yaml: unexpected env entry key {key:?}"
            );
        }
        let e = EnvEntry {
            name: str_of(&item["name"], "env[].name"),
            value: item["value"].as_str().map(str::to_owned),
            value_from: item["valueFrom"].as_str().map(str::to_owned),
        };
        assert!(
            e.value.is_some() != e.value_from.is_some(),
            "app.yaml: {} needs exactly one of value / valueFrom (strings): {e:?}",
            e.name
        );
        env.push(e);
    }
    AppYaml { command, env }
}

/// The `${VAR}` / `${VAR:-default}` references in the string values of a TOML document (comments
/// do not count), with whether each has a default.
fn env_references(toml_text: &str) -> BTreeMap<String, bool> {
    fn walk(v: &toml::Value, out: &mut BTreeMap<String, bool>) {
        match v {
            toml::Value::String(s) => {
                let mut rest = s.as_str();
                while let Some(i) = rest.find('$') {
                    let after = &rest[i + 1..];
                    if let Some(stripped) = after.strip_prefix('$') {
                        rest = stripped;
                    } else if let Some(body) = after.strip_prefix('{') {
                        let end = body.find('}').expect("terminated ${…} reference");
                        let inner = &body[..end];
                        let (name, default) = match inner.split_once(":-") {
                            Some((n, _)) => (n, true),
                            None => (inner, false),
                        };
                        let has_default = out.get(name).copied().unwrap_or(true) && default;
                        out.insert(name.to_owned(), has_default);
                        rest = &body[end + 1..];
                    } else {
                        rest = after;
                    }
                }
            }
            toml::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            toml::Value::Table(t) => t.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let value: toml::Value = toml::from_str(toml_text).expect("valid TOML");
    let mut out = BTreeMap::new();
    walk(&value, &mut out);
    out
}

/// The `--config` argument of a `serve` command line.
fn config_arg(args: &[String]) -> String {
    let i = args
        .iter()
        .position(|a| a == "--config" || a == "-c")
        .expect("the command passes --config");
    args.get(i + 1).expect("--config has a value").clone()
}

#[test]
fn app_yaml_command_runs_serve_with_a_shipped_config() {
    let app = app_yaml();
    let cmd = &app.command;
    assert_eq!(
        cmd.first().map(String::as_str),
        Some(LOADER),
        "started through the loader: {cmd:?}"
    );
    let exe = cmd.get(1).expect("the binary follows the loader");
    assert_eq!(
        exe,
        &format!("./{}", bin_name()),
        "app.yaml runs the binary cargo builds, from the bundle's top directory"
    );
    assert_eq!(cmd.get(2).map(String::as_str), Some("serve"));
    let config = config_arg(cmd);
    assert!(
        Path::new(&config).is_relative(),
        "the config path is inside the bundle: {config}"
    );
    assert!(
        repo(&config).is_file(),
        "{config} (named by app.yaml) exists in the repository"
    );
    assert_eq!(
        config, "config/databricks.toml",
        "scripts/build-release.sh bundles exactly this file"
    );
    // The binary accepts this exact command line (minus the loader): `serve --help` parses it.
    let out = Command::new(BIN)
        .args(&cmd[2..])
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // No shell syntax: the platform does not expand it.
    for arg in cmd {
        assert!(
            !arg.contains('$') && !arg.contains('|') && !arg.contains("&&"),
            "app.yaml command is not run by a shell: {arg:?}"
        );
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn the_loader_app_yaml_names_is_the_binarys_interpreter_and_needs_no_exec_bit() {
    // PT_INTERP from the ELF program headers.
    let elf = std::fs::read(BIN).expect("read the binary");
    assert_eq!(&elf[..4], b"\x7fELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let interp = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32::from_le_bytes([elf[ph], elf[ph + 1], elf[ph + 2], elf[ph + 3]]) == 3)
        .map(|ph| {
            let (off, size) = (u64_at(ph + 0x08), u64_at(ph + 0x20));
            String::from_utf8_lossy(&elf[off..off + size])
                .trim_end_matches('\0')
                .to_owned()
        })
        .expect("a dynamically linked binary has an interpreter");
    assert_eq!(interp, LOADER);

    // A copy without the executable bit (as a workspace upload may leave it) still runs.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join(bin_name());
    std::fs::copy(BIN, &copy).expect("copy the binary");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(LOADER)
        .arg(&copy)
        .arg("--version")
        .output()
        .expect("the loader runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("feedback-proxy "));
}

#[test]
fn every_variable_the_databricks_config_reads_is_provided() {
    let app = app_yaml();
    let set_by_app_yaml: BTreeSet<&str> = app.env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        set_by_app_yaml.len(),
        app.env.len(),
        "app.yaml sets a name twice"
    );
    let injected: BTreeSet<&str> = PLATFORM_ENV
        .iter()
        .chain(DATABASE_RESOURCE_ENV.iter())
        .copied()
        .collect();
    for name in &set_by_app_yaml {
        assert!(
            !injected.contains(name),
            "app.yaml must not override {name}, which the platform sets"
        );
    }

    let refs = env_references(&read(&config_arg(&app.command)));
    assert!(!refs.is_empty());
    for (var, has_default) in &refs {
        assert!(
            set_by_app_yaml.contains(var.as_str()) || injected.contains(var.as_str()),
            "config/databricks.toml reads ${{{var}}} (default: {has_default}), which neither app.yaml sets nor the platform injects"
        );
    }
    // And nothing app.yaml sets is dead weight.
    for name in &set_by_app_yaml {
        assert!(
            refs.contains_key(*name) || READ_BY_THE_PROCESS.contains(name),
            "app.yaml sets {name}, which nothing reads"
        );
    }
    // The shipped config must not fall back to SQLite (or to defaults) when the platform's
    // database variables are missing.
    for var in ["PGHOST", "PGUSER", "PGDATABASE"] {
        assert_eq!(refs.get(var), Some(&false), "{var} is required");
    }
    // app.yaml takes the experiment from a resource, never a hard-coded id.
    let exp = app
        .env
        .iter()
        .find(|e| e.name == "MLFLOW_EXPERIMENT_ID")
        .expect("app.yaml sets MLFLOW_EXPERIMENT_ID");
    assert!(exp.value_from.is_some(), "{exp:?}");
}

#[test]
fn the_platform_env_in_these_tests_matches_the_documented_lists() {
    // Keeps `platform_env()` honest: it holds what the platform injects plus app.yaml's names.
    let env = platform_env();
    let app = app_yaml();
    for name in PLATFORM_ENV
        .iter()
        .chain(DATABASE_RESOURCE_ENV.iter())
        .copied()
        .chain(app.env.iter().map(|e| e.name.as_str()))
    {
        assert!(env.contains_key(name), "platform_env() lacks {name}");
    }
}

// ---------------------------------------------------------------------------------------------
// check-config on the shipped Databricks config

#[test]
fn check_config_accepts_the_platform_environment_and_redacts_secrets() {
    let mut env = platform_env();
    // A weaker PGSSLMODE from the environment must not weaken the connection.
    env.insert("PGSSLMODE".into(), "disable".into());
    let out = run(
        &["check-config", "--config", "config/databricks.toml"],
        &env,
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(
        stderr.is_empty(),
        "the shipped config raises no warning on the platform: {stderr}"
    );
    assert!(!stdout.contains(SECRET), "secret leaked:\n{stdout}");
    assert!(!stderr.contains(SECRET));
    for expected in [
        "listen = \"0.0.0.0:8000\"",
        "trust_forwarded_headers = true",
        "client_secret = \"<redacted>\"",
        "host = \"https://adb-1234567890123456.7.azuredatabricks.net/\"",
        "url = \"https://agent-1234567890123456.11.azure.databricksapps.com/\"",
        "experiment_id = \"3141592653589793\"",
        "kind = \"postgres\"",
        "sslmode = \"require\"",
        "user = \"6f1e1c2a-0b7d-4e5f-9a8b-1c2d3e4f5a6b\"",
        "dbname = \"databricks_postgres\"",
        "password = \"databricks-oauth\"",
        "on_main_port = false",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.matches("auth = \"databricks-oauth\"").count(),
        2,
        "agent and MLflow both use the app's OAuth token:\n{stdout}"
    );
    assert!(!stdout.contains("dev_user"), "no dev_user on the platform");
    let parsed: toml::Value = toml::from_str(&stdout).expect("the effective config is TOML");
    assert_eq!(
        parsed["mlflow"]["tracking_uri"].as_str(),
        Some("https://adb-1234567890123456.7.azuredatabricks.net/")
    );
}

#[test]
fn check_config_without_the_platform_names_each_missing_variable() {
    let required: Vec<String> = env_references(&read("config/databricks.toml"))
        .into_iter()
        .filter(|(_, has_default)| !has_default)
        .map(|(var, _)| var)
        .collect();
    assert!(required.len() >= 8, "{required:?}");

    let out = run(
        &["check-config", "--config", "config/databricks.toml"],
        &BTreeMap::new(),
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing printed as effective config");
    for var in &required {
        assert!(
            stderr.contains(&format!("environment variable {var} is not set")),
            "{var} not named in:\n{stderr}"
        );
    }
    assert_eq!(
        stderr.lines().count(),
        required.len(),
        "one line each:\n{stderr}"
    );

    // One missing at a time: exactly that one is named.
    for var in &required {
        let mut env = platform_env();
        env.remove(var);
        let out = run(
            &["check-config", "--config", "config/databricks.toml"],
            &env,
        );
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "accepted without {var}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("environment variable {var} is not set")),
            "{stderr}"
        );
    }
}

#[test]
fn check_config_reports_an_unknown_key_or_a_bad_url_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[agent]\nurl = \"http://127.0.0.1:5056\"\nresponse_timeout = \"5s\"\n",
            "agent.response_timeout: unknown key",
        ),
        ("[agent]\nurl = \"htp:/agent\"\n", "agent.url: invalid URL"),
        (
            "[agent]\nurl = \"http://127.0.0.1:5056\"\n[mlflow]\ntracking_uri = \"localhost:5055\"\n",
            "mlflow.tracking_uri: invalid URL",
        ),
    ];
    for (i, (toml_text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, toml_text).expect("write");
        let path = path.to_str().expect("utf-8 path");
        let out = run(&["check-config", "--config", path], &BTreeMap::new());
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{toml_text}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!("{path}: {expected}")),
            "{stderr}"
        );
    }
}

/// Issue 12 finding 8: a malformed URL is quoted back without its password or credential-like
/// query values.
#[test]
fn check_config_never_prints_credentials_from_a_bad_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[agent]\nurl = \"http://svc:hunter2@agent:notaport\"\n",
            "agent.url",
            "hunter2",
        ),
        (
            "[agent]\nurl = \"http://agent.internal/x?token=abc123\"\n",
            "agent.url",
            "abc123",
        ),
        (
            "[agent]\nurl = \"http://127.0.0.1:5056\"\n[mlflow]\ntracking_uri = \"ftp://svc:hunter2@mlflow\"\n",
            "mlflow.tracking_uri",
            "hunter2",
        ),
    ];
    for (i, (toml_text, key, secret)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, toml_text).expect("write");
        let path = path.to_str().expect("utf-8 path");
        let out = run(&["check-config", "--config", path], &BTreeMap::new());
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{toml_text}");
        assert!(all.contains(key), "{all}");
        assert!(all.contains("<redacted>"), "{all}");
        assert!(!all.contains(secret), "{secret} printed: {all}");
    }
}

// ---------------------------------------------------------------------------------------------
// healthcheck

/// A one-shot HTTP server answering every request with `status`; returns its address.
fn tiny_server(status: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let body = "{\"status\":\"ok\"}";
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn healthcheck_exits_0_on_2xx_and_1_otherwise() {
    let ok = tiny_server("200 OK");
    let out = run(
        &["healthcheck", "--url", &format!("http://{ok}/healthz")],
        &BTreeMap::new(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let sick = tiny_server("503 Service Unavailable");
    let out = run(
        &["healthcheck", "--url", &format!("http://{sick}/healthz")],
        &BTreeMap::new(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("503"), "{}", text(&out.stderr));

    // Nothing listening: a port we bound and released.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let out = run(
        &[
            "healthcheck",
            "--url",
            &format!("http://{closed}/healthz"),
            "--timeout",
            "2s",
        ],
        &BTreeMap::new(),
    );
    assert_eq!(out.status.code(), Some(1));

    let out = run(&["healthcheck", "--url", "no url"], &BTreeMap::new());
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn healthcheck_defaults_to_the_app_port() {
    let ok = tiny_server("204 No Content");
    let port = ok.rsplit(':').next().expect("port").to_owned();
    let env = BTreeMap::from([("DATABRICKS_APP_PORT".to_owned(), port)]);
    let out = run(&["healthcheck"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("127.0.0.1"));
}

// ---------------------------------------------------------------------------------------------
// serve: start-up line, warnings, /healthz

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_logs_one_start_up_line_and_warns_about_dev_user_on_the_platform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n\
             [identity]\ntrust_forwarded_headers = true\ndev_user = \"dev@example.com\"\n\
             [databricks]\nclient_secret = \"${{DATABRICKS_CLIENT_SECRET}}\"\n\
             [agent]\nurl = \"http://127.0.0.1:5056/base\"\n\
             [mlflow]\ntracking_uri = \"http://127.0.0.1:5055\"\nexperiment_id = \"7\"\n\
             [store]\nurl = \"sqlite://{}\"\n",
            dir.path().join("fp.db").display()
        ),
    )
    .expect("write config");
    let env = BTreeMap::from([
        (
            "DATABRICKS_APP_NAME".to_owned(),
            "feedback-proxy".to_owned(),
        ),
        ("DATABRICKS_CLIENT_SECRET".to_owned(), SECRET.to_owned()),
        ("NO_COLOR".to_owned(), "1".to_owned()),
    ]);
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_clear()
        .envs(&env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let _child = Running(child);

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut before = Vec::new();
    let start = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no start-up line ({e}); got: {before:#?}"));
        if line.contains("feedback-proxy starting") {
            break line;
        }
        before.push(line);
    };

    for field in [
        "version=\"0.1.0\"",
        "listen=127.0.0.1:",
        "agent=http://127.0.0.1:5056/base",
        "store=\"sqlite\"",
        "mlflow=\"http://127.0.0.1:5055/\"",
    ] {
        assert!(start.contains(field), "{field} missing from: {start}");
    }
    assert!(!start.contains('\x1b'), "NO_COLOR is honoured: {start:?}");
    let warnings: Vec<_> = before.iter().filter(|l| l.contains("WARN")).collect();
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("identity.dev_user") && l.contains("Databricks App")),
        "{before:#?}"
    );
    assert!(
        warnings.iter().any(|l| l.contains("SQLite store")),
        "{before:#?}"
    );
    assert!(
        before.iter().chain([&start]).all(|l| !l.contains(SECRET)),
        "secret in the log"
    );

    // The real /healthz, probed the way the Docker HEALTHCHECK does.
    let listen = start
        .split_whitespace()
        .find_map(|f| f.strip_prefix("listen="))
        .expect("listen field")
        .to_owned();
    let out = run(
        &["healthcheck", "--url", &format!("http://{listen}/healthz")],
        &BTreeMap::new(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------------
// Config::warnings: the risky settings flagged at start-up

fn warnings(toml_text: &str, env: &[(&str, &str)]) -> Vec<String> {
    let env = Env::from_pairs(env.iter().copied());
    Config::from_toml_str(toml_text, &env)
        .unwrap_or_else(|e| panic!("{e}\n{toml_text}"))
        .warnings(&env)
}

#[test]
fn warnings_flag_tokens_in_clear_text_and_unauthenticated_databricks_calls() {
    let creds = [
        ("DATABRICKS_HOST", "adb-1.2.azuredatabricks.net"),
        ("DATABRICKS_CLIENT_ID", "id"),
        ("DATABRICKS_CLIENT_SECRET", "secret"),
    ];
    // OAuth token over plain HTTP to another machine.
    let w = warnings(
        "[agent]\nurl = \"http://agent.internal:8080\"\nauth = \"databricks-oauth\"\n",
        &creds,
    );
    assert!(
        w.iter()
            .any(|l| l.starts_with("agent.url is plain http:// to agent.internal")),
        "{w:#?}"
    );
    // …but not to this machine.
    let w = warnings(
        "[agent]\nurl = \"http://127.0.0.1:8080\"\nauth = \"databricks-oauth\"\n",
        &creds,
    );
    assert!(!w.iter().any(|l| l.contains("plain http://")), "{w:#?}");

    // A Databricks App or the workspace without a token.
    let w = warnings(
        "[agent]\nurl = \"https://agent-1.aws.databricksapps.com\"\n\
         [mlflow]\ntracking_uri = \"databricks\"\nexperiment_id = \"1\"\n",
        &creds,
    );
    for key in ["agent.url", "mlflow.tracking_uri"] {
        assert!(
            w.iter().any(|l| l.starts_with(&format!(
                "{key} is a Databricks URL but its auth is \"none\""
            ))),
            "{key}: {w:#?}"
        );
    }
}

#[test]
fn warnings_flag_a_remote_postgres_without_any_password() {
    let remote = "[agent]\nurl = \"http://127.0.0.1:1\"\n\
                  [store]\nurl = \"postgres://u@db.example.com/app?sslmode=require\"\n";
    let w = warnings(remote, &[]);
    assert!(
        w.iter()
            .any(|l| l.starts_with("store: Postgres at db.example.com with no password")),
        "{w:#?}"
    );
    assert!(
        !warnings(remote, &[("PGPASSWORD", "pw")])
            .iter()
            .any(|l| l.contains("no password")),
        "PGPASSWORD counts"
    );
    let local =
        "[agent]\nurl = \"http://127.0.0.1:1\"\n[store]\nurl = \"postgres://u@localhost/app\"\n";
    assert!(
        !warnings(local, &[])
            .iter()
            .any(|l| l.contains("no password"))
    );
}

// ---------------------------------------------------------------------------------------------
// docker/Dockerfile

/// Dockerfile instructions with line continuations joined: (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("docker/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instr, args) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((current.as_str(), ""));
                out.push((instr.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

fn json_args(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("exec-form JSON array expected: {s} ({e})"))
}

#[test]
fn dockerfile_ships_the_release_binary_and_runs_real_subcommands() {
    let instrs = dockerfile();
    let all = |name: &str| -> Vec<&str> {
        instrs
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let one = |name: &str| -> &str {
        let found = all(name);
        assert_eq!(found.len(), 1, "one {name} in the final image: {found:?}");
        found[0]
    };

    // Two stages; the first builds.
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "{froms:?}");
    let stage = froms[0]
        .split_whitespace()
        .last()
        .expect("FROM … AS <stage>");
    assert!(froms[0].contains(" AS "), "named build stage: {}", froms[0]);
    let workdir = all("WORKDIR")[0];
    let runs = all("RUN");
    assert!(
        runs[0].contains("cargo build --release"),
        "the build stage runs a release build: {runs:?}"
    );
    for r in &runs {
        assert!(
            !r.contains("--target ") && !r.contains("CARGO_TARGET_DIR") && !r.contains("--profile"),
            "the output path must stay target/release: {r}"
        );
    }
    assert!(
        !repo(".cargo/config.toml").exists() || !read(".cargo/config.toml").contains("target-dir"),
        "a configured target-dir would move the binary"
    );

    // The binary cargo produces is what gets copied.
    let built = format!("{workdir}/target/release/{}", bin_name());
    let copy = all("COPY")
        .into_iter()
        .find(|c| c.starts_with(&format!("--from={stage} ")))
        .expect("COPY --from=<build stage>");
    let parts: Vec<_> = copy.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{copy}");
    assert_eq!(parts[1], built, "copies the release build's output");
    let installed = parts[2];

    // Runs as a non-root user.
    let user = one("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "non-root: {user}"
    );

    // ENTRYPOINT is that binary; CMD and HEALTHCHECK are real subcommands.
    let entrypoint = json_args(one("ENTRYPOINT"));
    assert_eq!(entrypoint, [installed]);
    let cmd = json_args(one("CMD"));
    assert_eq!(cmd, ["serve"]);
    let health = one("HEALTHCHECK");
    let health_cmd = json_args(
        health
            .split_once("CMD ")
            .map(|(_, c)| c)
            .expect("HEALTHCHECK … CMD [...]"),
    );
    assert_eq!(health_cmd.first().map(String::as_str), Some(installed));
    for sub in [&cmd[..], &health_cmd[1..]] {
        let out = Command::new(BIN)
            .args(sub)
            .arg("--help")
            .output()
            .expect("runs");
        assert!(out.status.success(), "{sub:?}: {}", text(&out.stderr));
    }
    // `serve` takes its config from FEEDBACK_PROXY_CONFIG, which names a shipped file.
    let serve_help = text(
        &Command::new(BIN)
            .args(["serve", "--help"])
            .output()
            .expect("runs")
            .stdout,
    );
    assert!(serve_help.contains("FEEDBACK_PROXY_CONFIG"), "{serve_help}");
    let env_line = all("ENV").join(" ");
    let config_path = env_line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("FEEDBACK_PROXY_CONFIG="))
        .expect("ENV FEEDBACK_PROXY_CONFIG=…");
    let config_copy = all("COPY")
        .into_iter()
        .find(|c| c.starts_with("config/ "))
        .expect("COPY config/ <dir>");
    let config_dir = config_copy
        .split_whitespace()
        .nth(1)
        .expect("destination")
        .trim_end_matches('/');
    let shipped = config_path
        .strip_prefix(&format!("{config_dir}/"))
        .expect("FEEDBACK_PROXY_CONFIG points into the copied config directory");
    assert!(repo(&format!("config/{shipped}")).is_file(), "{shipped}");
    assert!(env_line.contains("NO_COLOR=1"), "plain logs: {env_line}");

    // The exposed port is the one the shipped config listens on and healthcheck probes.
    assert_eq!(one("EXPOSE"), "8000");
    assert!(read(&format!("config/{shipped}")).contains(":${DATABRICKS_APP_PORT:-8000}\""));

    // The build context keeps what the build needs.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    for needed in ["Cargo.toml", "Cargo.lock", "src", "config"] {
        assert!(
            !ignored.iter().any(|i| i == needed || i == "*" || i == "**"),
            ".dockerignore excludes {needed}"
        );
    }
    assert!(
        ignored.iter().any(|i| i == "target"),
        "target/ stays out of the context"
    );
}
