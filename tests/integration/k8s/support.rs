#![allow(dead_code)]
//! `deploy/k8s/` as `kubectl kustomize` renders it (kubectl and
//! kubernetes-validate pinned in `tests/deploy/requirements.txt`, installed
//! into `.venv-deploy` by `scripts/test`), and the pieces of it the tests in
//! `tests/integration/k8s.rs` and `k8s_exposure.rs` look at.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use mana_sync::config::Config;
use serde_json::Value;

use crate::common::process::{deploy_tool, repository};

/// The Kubernetes version the manifests are validated against, kubectl's
/// here. They need 1.30 or later: the preStop `sleep` action is on by
/// default from 1.30 (the image has no shell for `exec: sleep`), and the
/// PodDisruptionBudget's `unhealthyPodEvictionPolicy` from 1.27.
pub const KUBERNETES_VERSION: &str = "1.32.0";
/// The namespace kustomization.yaml puts everything in.
pub const NAMESPACE: &str = "mana-sync";

/// Runs `program` with `input` on its standard input.
pub fn run(program: &Path, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_owned();
    // Written from another thread: a program that answers as it reads
    // would otherwise fill its output pipe while this one still writes.
    let writer = std::thread::spawn(move || {
        // A program that stops reading (it failed) is reported by its
        // status, below.
        let _ = stdin.write_all(input.as_bytes());
    });
    let output = child.wait_with_output().expect("wait for the program");
    writer.join().expect("the writer thread");
    output
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `deploy/k8s` as `kubectl kustomize` renders it: YAML, and its objects.
pub struct Rendered {
    pub yaml: String,
    pub objects: Vec<Value>,
}

pub fn rendered() -> &'static Rendered {
    // Every test asks at once; one renders, the others wait for it.
    static RENDERED: OnceLock<Rendered> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let output = Command::new(deploy_tool("kubectl"))
            .arg("kustomize")
            .arg(repository().join("deploy/k8s"))
            .output()
            .expect("run kubectl kustomize");
        assert!(
            output.status.success(),
            "`kubectl kustomize deploy/k8s` failed:\n{}",
            text(&output.stderr)
        );
        let yaml = text(&output.stdout);
        let objects = yaml_to_json(&yaml);
        Rendered { yaml, objects }
    })
}

/// The documents of `yaml`, through PyYAML (in `.venv-deploy`, with
/// kubernetes-validate) and serde_json.
pub fn yaml_to_json(yaml: &str) -> Vec<Value> {
    let script = "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
    let output = run(&deploy_tool("python"), &["-c", script], yaml);
    assert!(
        output.status.success(),
        "the rendered manifests are not YAML:\n{}",
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("PyYAML's JSON")
}

/// Validates every document of `yaml` with kubernetes-validate, strictly, for
/// [`KUBERNETES_VERSION`]: how many passed, or its report. A kind it has no
/// schema for (a misspelled or removed apiVersion) is only a warning to it,
/// and a failure here.
pub fn validate(yaml: &str) -> Result<usize, String> {
    let tool = deploy_tool("kubernetes-validate");
    let output = run(
        &tool,
        &["--strict", "--kubernetes-version", KUBERNETES_VERSION, "-"],
        yaml,
    );
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    let version = KUBERNETES_VERSION.rsplit_once('.').expect("major.minor.patch").0;
    let passed = stdout
        .lines()
        .filter(|line| {
            line.starts_with("INFO ")
                && line.contains(" passed for resource ")
                && line.ends_with(&format!("against version {version}"))
        })
        .count();
    let problems: Vec<&str> = stdout
        .lines()
        .filter(|line| !(line.starts_with("INFO ") && line.contains(" passed for resource ")))
        .collect();
    if output.status.success() && problems.is_empty() && stderr.trim().is_empty() {
        Ok(passed)
    } else {
        Err(format!(
            "kubernetes-validate ({}):\n{}\n{stderr}",
            output.status,
            problems.join("\n")
        ))
    }
}

/// The one rendered object of `kind`.
pub fn one(kind: &str) -> &'static Value {
    let found: Vec<&Value> = rendered().objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/k8s should render exactly one {kind}, renders {}",
        found.len()
    );
    found[0]
}

pub fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().expect("every object has a name")
}

/// "Kind name", for messages.
pub fn describe(object: &Value) -> String {
    format!(
        "{} {}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The value at `pointer` in `object`, or a failure naming what is missing.
pub fn at<'a>(object: &'a Value, pointer: &str) -> &'a Value {
    object
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{}: {pointer} is missing", describe(object)))
}

/// The only container of a Deployment's or Job's pods.
pub fn container(workload: &Value) -> &Value {
    let containers = at(workload, "/spec/template/spec/containers")
        .as_array()
        .expect("containers is a list");
    assert_eq!(
        containers.len(),
        1,
        "{} should run one container (the server's image), runs {}",
        describe(workload),
        containers.len()
    );
    &containers[0]
}

/// The Secret and key a container's `variable` comes from.
pub fn secret_key(workload: &Value, variable: &str) -> (String, String) {
    let env = container(workload)["env"].as_array().cloned().unwrap_or_default();
    let entry = env
        .iter()
        .find(|e| e["name"] == variable)
        .unwrap_or_else(|| panic!("{} does not set {variable}", describe(workload)));
    let reference = entry.pointer("/valueFrom/secretKeyRef").unwrap_or_else(|| {
        panic!(
            "{}: {variable} should come from a Secret (secretKeyRef), not be written in the manifest",
            describe(workload)
        )
    });
    (
        reference["name"].as_str().expect("secret name").to_owned(),
        reference["key"].as_str().expect("secret key").to_owned(),
    )
}

/// What a Secret holds under `key` (`stringData`, else `data`).
pub fn secret_value(secret_name: &str, key: &str) -> String {
    let secret = one("Secret");
    assert_eq!(
        name(secret),
        secret_name,
        "the pods read Secret {secret_name}, but deploy/k8s's Secret is {}",
        name(secret)
    );
    if let Some(value) = secret["stringData"][key].as_str() {
        return value.to_owned();
    }
    use base64::Engine as _;
    let encoded = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {secret_name} has no key {key}"));
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("Secret data is base64");
    String::from_utf8(decoded).expect("a UTF-8 URL")
}

/// The environment the image itself sets (`ENV` in deploy/Dockerfile).
pub fn image_env() -> BTreeMap<String, String> {
    let dockerfile = std::fs::read_to_string(repository().join("deploy/Dockerfile")).expect("read deploy/Dockerfile");
    dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .flat_map(|vars| vars.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The environment a workload's container starts with: the image's, the
/// ConfigMap's (envFrom), then its own `env`, Secret references resolved.
pub fn environment(workload: &Value) -> BTreeMap<String, String> {
    let mut env = image_env();
    let container = container(workload);
    for source in container["envFrom"].as_array().cloned().unwrap_or_default() {
        let map = source.get("configMapRef").unwrap_or_else(|| {
            panic!(
                "{}: envFrom {source} is not the ConfigMap (a Secret read whole would hand the pod every key, the \
                 other role's URL too)",
                describe(workload)
            )
        });
        let config_map = one("ConfigMap");
        assert_eq!(
            map["name"], config_map["metadata"]["name"],
            "envFrom names another ConfigMap"
        );
        for (k, v) in config_map["data"].as_object().expect("ConfigMap data") {
            env.insert(k.clone(), v.as_str().expect("ConfigMap values are strings").to_owned());
        }
    }
    for entry in container["env"].as_array().cloned().unwrap_or_default() {
        let variable = entry["name"].as_str().expect("env name").to_owned();
        let value = match entry["value"].as_str() {
            Some(value) => value.to_owned(),
            None => {
                let (secret, key) = secret_key(workload, &variable);
                secret_value(&secret, &key)
            }
        };
        env.insert(variable, value);
    }
    env
}

/// The server's settings in `env`, read by the server's own `Config`; with
/// the names it asked for.
pub fn config(env: &BTreeMap<String, String>) -> (Config, HashSet<String>) {
    let asked = Mutex::new(HashSet::new());
    let config = Config::from_lookup(|name| {
        asked.lock().unwrap().insert(name.to_owned());
        env.get(name).cloned()
    })
    .unwrap_or_else(|e| panic!("the server would refuse to start with deploy/k8s's settings: {e}"));
    (config, asked.into_inner().unwrap())
}

/// Whether a selector's `matchLabels` select a pod with `labels`.
pub fn selects(match_labels: &Value, labels: &Value) -> bool {
    let wanted = match_labels.as_object().expect("matchLabels is a map");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn server_pod_labels() -> &'static Value {
    at(one("Deployment"), "/spec/template/metadata/labels")
}

pub fn migration_pod_labels() -> &'static Value {
    at(one("Job"), "/spec/template/metadata/labels")
}

pub fn seconds(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what} should be a whole number of seconds, is {value}"))
}

/// Every rendered object of `kind`.
pub fn all(kind: &str) -> Vec<&'static Value> {
    rendered().objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// An Ingress's ingress-nginx annotation `key`, if it has one.
pub fn nginx_annotation<'a>(ingress: &'a Value, key: &str) -> Option<&'a str> {
    ingress["metadata"]["annotations"][format!("nginx.ingress.kubernetes.io/{key}")].as_str()
}

/// One path of an Ingress's rules, and the Ingress whose annotations it
/// takes.
pub struct IngressPath<'a> {
    pub ingress: &'a Value,
    pub path: &'a Value,
}

/// The paths that Ingresses give one host, as ingress-nginx writes them
/// into that host's one server block.
pub struct HostRoutes<'a> {
    /// Longest first, as ingress-nginx writes them.
    pub paths: Vec<IngressPath<'a>>,
    /// use-regex (or rewrite-target) on any Ingress of the host makes every
    /// path of the host a regex, whichever Ingress it comes from.
    pub regex: bool,
}

impl<'a> HostRoutes<'a> {
    pub fn new(ingresses: &[&'a Value], host: &str) -> Self {
        let mut paths = Vec::new();
        let mut regex = false;
        for &ingress in ingresses {
            let rules = ingress["spec"]["rules"].as_array().into_iter().flatten();
            for rule in rules.filter(|rule| rule["host"] == host) {
                regex |= nginx_annotation(ingress, "use-regex") == Some("true")
                    || nginx_annotation(ingress, "rewrite-target").is_some();
                for path in rule
                    .pointer("/http/paths")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    paths.push(IngressPath { ingress, path });
                }
            }
        }
        // ingress-nginx's two stable sorts: by path descending, then by
        // length descending.
        let text = |p: &IngressPath| p.path["path"].as_str().expect("an Ingress path").to_owned();
        paths.sort_by_key(|p| std::cmp::Reverse(text(p)));
        paths.sort_by_key(|p| std::cmp::Reverse(text(p).len()));
        HostRoutes { paths, regex }
    }

    /// The path nginx takes `target` by, if any. With regexes, the first
    /// that matches (nginx's rule for regex locations); without, an exact
    /// match, else the longest prefix.
    pub fn route(&self, target: &str) -> Option<&IngressPath<'a>> {
        let takes = |p: &&IngressPath| reaches(p.path, target, self.regex);
        if self.regex {
            return self.paths.iter().find(takes);
        }
        let exact = |p: &&IngressPath| p.path["pathType"] == "Exact";
        self.paths
            .iter()
            .filter(exact)
            .find(takes)
            .or_else(|| self.paths.iter().filter(|p| !exact(p)).find(takes))
    }
}

/// Whether an Ingress `path` takes requests for `target`, as ingress-nginx
/// writes it. With `regex` (use-regex anywhere on the host), every path,
/// Exact ones included, is `location ~* "^{path}"`: a case-insensitive
/// regex anchored at the start only. Without, Exact is `location =`,
/// Prefix is element-wise (`location /p/` and `location = /p`), and
/// ImplementationSpecific a plain nginx prefix.
pub fn reaches(path: &Value, target: &str, regex: bool) -> bool {
    let pattern = path["path"].as_str().expect("an Ingress path");
    if regex {
        let tokens = regex_tokens(pattern);
        return regex_prefix_matches(&tokens, &target.to_ascii_lowercase());
    }
    match path["pathType"].as_str() {
        Some("Exact") => target == pattern,
        Some("Prefix") => {
            let prefix = pattern.trim_end_matches('/');
            target == prefix || target.starts_with(&format!("{prefix}/"))
        }
        _ => target.starts_with(pattern),
    }
}

/// One piece of a path regex.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RegexToken {
    Char(char),
    /// `.`
    Any,
    /// `[^/]+`
    Segment,
    /// `$`
    End,
}

/// The path regexes deploy/k8s uses: literal characters (or `\`-escaped
/// ones), `.`, `[^/]+` and a final `$`. By hand, as the `regex` crate is no
/// dependency of this one; anything else fails here, to be taught first.
fn regex_tokens(pattern: &str) -> Vec<RegexToken> {
    let mut tokens = Vec::new();
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        let (token, len) = match c {
            '.' => (RegexToken::Any, 1),
            '$' if rest.len() == 1 => (RegexToken::End, 1),
            '[' if rest.starts_with("[^/]+") => (RegexToken::Segment, "[^/]+".len()),
            '\\' => {
                let escaped = rest[1..].chars().next().expect("a character after \\");
                (RegexToken::Char(escaped.to_ascii_lowercase()), 1 + escaped.len_utf8())
            }
            '^' | '$' | '[' | ']' | '(' | ')' | '{' | '}' | '*' | '+' | '?' | '|' => {
                panic!("the Ingress path {pattern:?} uses a regex form the test does not read (at {rest:?})")
            }
            c => (RegexToken::Char(c.to_ascii_lowercase()), c.len_utf8()),
        };
        tokens.push(token);
        rest = &rest[len..];
    }
    tokens
}

/// Whether `tokens` match the start of `text` (already lower case).
fn regex_prefix_matches(tokens: &[RegexToken], text: &str) -> bool {
    let Some((&first, rest)) = tokens.split_first() else {
        return true;
    };
    let mut chars = text.chars();
    match first {
        RegexToken::End => text.is_empty(),
        RegexToken::Char(c) => chars.next() == Some(c) && regex_prefix_matches(rest, chars.as_str()),
        RegexToken::Any => chars.next().is_some() && regex_prefix_matches(rest, chars.as_str()),
        RegexToken::Segment => {
            let run = text.find('/').unwrap_or(text.len());
            (1..=run)
                .filter(|&n| text.is_char_boundary(n))
                .any(|n| regex_prefix_matches(rest, &text[n..]))
        }
    }
}
