//! `deploy/k8s/`, checked without a cluster: `kubectl kustomize` renders it
//! (kubectl's built-in kustomize, offline), kubernetes-validate (pinned in
//! `tests/deploy/requirements.txt`, installed into `.venv-deploy` by
//! `scripts/test`) checks every rendered object against the schemas of one
//! Kubernetes version, strictly (an unknown field fails), and the tests
//! below check what the schemas cannot: that the pieces fit together and
//! agree with the server (its settings parsed by the server's own
//! `Config`, its image's environment, its shutdown sequence);
//! `tests/integration/k8s_exposure.rs` checks what reaches the pods and what they may do.

pub mod support;

use std::collections::HashSet;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::{Value, json};
use support::*;

#[test]
fn the_manifests_pass_strict_schema_validation() {
    let rendered = rendered();
    let passed = validate(&rendered.yaml)
        .unwrap_or_else(|report| panic!("deploy/k8s does not validate for Kubernetes {KUBERNETES_VERSION}: {report}"));
    assert_eq!(
        passed,
        rendered.objects.len(),
        "kubernetes-validate passed {passed} of the {} rendered objects",
        rendered.objects.len()
    );
}

/// The validation above can fail: an unknown field (strict mode) and a kind
/// with no schema (only a warning to kubernetes-validate) are failures. On
/// objects of their own, valid but for the one fault.
#[test]
fn the_validation_rejects_unknown_fields_and_unknown_kinds() {
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "probe"},
        "spec": {"selector": {"app": "probe"}, "ports": [{"port": 80}]},
    });
    assert_eq!(
        validate(&service.to_string()),
        Ok(1),
        "a valid Service did not pass: the checks below would prove nothing"
    );

    service["spec"]["portz"] = json!([]);
    let report = validate(&service.to_string())
        .expect_err("a Service with an unknown field passed: is kubernetes-validate run with --strict?");
    assert!(
        report.contains("portz"),
        "the report should name the unknown field:\n{report}"
    );

    let autoscaler = json!({
        "apiVersion": "autoscaling/v2beta2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "probe"}, "maxReplicas": 2},
    });
    let report = validate(&autoscaler.to_string()).expect_err(
        "a HorizontalPodAutoscaler of an apiVersion removed in Kubernetes 1.26 passed: kubernetes-validate's \
         warnings must count as failures",
    );
    assert!(report.contains("autoscaling/v2beta2"), "{report}");
}

#[test]
fn every_object_an_operator_needs_is_rendered_in_one_namespace() {
    let objects = &rendered().objects;
    let kinds: HashSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "Job",
        "NetworkPolicy",
    ] {
        assert!(
            kinds.contains(kind),
            "deploy/k8s renders no {kind} (it renders {kinds:?})"
        );
    }
    assert_eq!(name(one("Namespace")), NAMESPACE);
    for object in objects.iter().filter(|o| o["kind"] != "Namespace") {
        assert_eq!(
            object["metadata"]["namespace"],
            NAMESPACE,
            "{} is not in the namespace {NAMESPACE}",
            describe(object)
        );
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/name"],
            "mana-sync",
            "{} lacks the app.kubernetes.io/name label",
            describe(object)
        );
    }
    // The server and the migration run the same build.
    let image = container(one("Deployment"))["image"].as_str().expect("an image");
    assert_eq!(
        container(one("Job"))["image"].as_str(),
        Some(image),
        "the migration Job and the replicas run different images"
    );
}

#[test]
fn the_configmap_holds_only_settings_the_server_reads_and_they_parse() {
    let config_map = one("ConfigMap");
    let (config, asked) = config(&environment(one("Deployment")));
    // Names read outside `Config`: logs, and OpenTelemetry's own variables.
    let elsewhere = |key: &str| key == "LOG_FORMAT" || key == "RUST_LOG" || key.starts_with("OTEL_");
    for key in config_map["data"].as_object().expect("ConfigMap data").keys() {
        assert!(
            asked.contains(key) || elsewhere(key),
            "ConfigMap key {key} is no setting of the server (a misspelling is ignored silently)"
        );
    }
    assert!(
        config.jwks_url.is_some(),
        "JWKS_URL is not set: every replica would be in local mode, with a signing key of its own"
    );
    let url = config
        .database_url
        .as_ref()
        .map(ExposeSecret::expose_secret)
        .unwrap_or_default();
    assert!(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "replicas must share PostgreSQL; DATABASE_URL is {url:?}"
    );
    assert_eq!(
        config.max_connections_per_address, 0,
        "behind the ingress every connection comes from its addresses: MAX_CONNECTIONS_PER_ADDRESS must be 0"
    );
}

#[test]
fn probes_ask_the_servers_port_ready_for_readiness_and_health_for_liveness() {
    let deployment = one("Deployment");
    let container = container(deployment);
    let (config, _) = config(&environment(deployment));
    let ports = container["ports"].as_array().expect("container ports");
    let port_of = |port: &Value| -> u64 {
        match port {
            Value::String(named) => ports
                .iter()
                .find(|p| p["name"] == named.as_str())
                .unwrap_or_else(|| panic!("no container port is named {named}"))["containerPort"]
                .as_u64()
                .expect("a port number"),
            number => number.as_u64().expect("a port number"),
        }
    };
    for (probe, path) in [
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
        ("startupProbe", "/health"),
    ] {
        let Some(handler) = container.get(probe) else {
            assert_ne!(probe, "readinessProbe", "the Deployment has no readinessProbe");
            assert_ne!(probe, "livenessProbe", "the Deployment has no livenessProbe");
            continue;
        };
        assert_eq!(
            handler["httpGet"]["path"], path,
            "{probe} should ask {path}: /ready turns 503 when the database or the listener is down and at \
             shutdown, /health stays 200 while the process serves"
        );
        assert_eq!(
            port_of(&handler["httpGet"]["port"]),
            u64::from(config.port),
            "{probe} asks another port than the server's PORT"
        );
    }
    // The Service sends traffic to that port too.
    let service = one("Service");
    let service_port = &at(service, "/spec/ports").as_array().expect("ports")[0];
    assert_eq!(
        port_of(&service_port["targetPort"]),
        u64::from(config.port),
        "the Service targets another port than the server's PORT"
    );
}

#[test]
fn the_grace_period_covers_prestop_drain_and_shutdown_timeout() {
    let deployment = one("Deployment");
    let container = container(deployment);
    let (config, _) = config(&environment(deployment));
    // The image has no shell: `exec` can only run the binary itself.
    for handler in [
        container.pointer("/lifecycle/preStop"),
        container.pointer("/lifecycle/postStart"),
        container.get("readinessProbe"),
        container.get("livenessProbe"),
        container.get("startupProbe"),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(command) = handler.pointer("/exec/command/0") {
            assert_eq!(
                command, "/usr/local/bin/mana-sync",
                "the image has no shell or coreutils: {handler} cannot run"
            );
        }
    }
    let pre_stop = seconds(
        container
            .pointer("/lifecycle/preStop/sleep/seconds")
            .unwrap_or_else(|| {
                panic!(
                    "the Deployment has no preStop sleep: SIGTERM would come while the ingress still sends the pod new \
                 requests"
                )
            }),
        "preStop sleep",
    );
    assert!(
        pre_stop > 0,
        "a preStop sleep of 0 s leaves no time for endpoint removal"
    );
    let grace = seconds(
        at(deployment, "/spec/template/spec/terminationGracePeriodSeconds"),
        "terminationGracePeriodSeconds",
    );
    // After the requests' grace, the server waits for the sockets' close
    // frames and then the last NOTIFYs, each up to SHUTDOWN_TIMEOUT or 5 s.
    let settling = 2 * config.shutdown_timeout.min(Duration::from_secs(5));
    let needed = Duration::from_secs(pre_stop) + config.shutdown_drain + config.shutdown_timeout + settling;
    assert!(
        Duration::from_secs(grace) > needed,
        "terminationGracePeriodSeconds {grace} leaves no margin over preStop {pre_stop} s + SHUTDOWN_DRAIN {:?} + \
         SHUTDOWN_TIMEOUT {:?} + {settling:?} of socket and NOTIFY settling = {needed:?}: the kubelet would \
         SIGKILL the server mid-shutdown",
        config.shutdown_drain,
        config.shutdown_timeout,
    );
}

#[test]
fn replicas_serve_as_mana_sync_and_only_the_job_migrates_as_the_owner() {
    let (deployment, job) = (one("Deployment"), one("Job"));
    let (served_from, migrated_from) = (secret_key(deployment, "DATABASE_URL"), secret_key(job, "DATABASE_URL"));
    assert_ne!(
        served_from, migrated_from,
        "the replicas and the migration Job read DATABASE_URL from the same Secret key: the replicas must connect \
         as the serving role, which cannot change the schema"
    );
    let user = |(secret, key): &(String, String)| {
        let url = secret_value(secret, key);
        url::Url::parse(&url)
            .unwrap_or_else(|e| panic!("Secret {secret} key {key} is no URL ({e})"))
            .username()
            .to_owned()
    };
    assert_eq!(
        user(&served_from),
        "mana_sync",
        "the replicas should connect as mana_sync (deploy/init-role.sql)"
    );
    assert_eq!(
        user(&migrated_from),
        "mana_sync_owner",
        "the migration Job should connect as mana_sync_owner (deploy/init-role.sql)"
    );
    assert_eq!(
        container(job)["args"],
        json!(["migrate"]),
        "the Job should run `mana-sync migrate`"
    );
    let serve = &container(deployment)["args"];
    assert!(
        serve.is_null() || *serve == json!(["serve"]),
        "the replicas should run `mana-sync serve`, run {serve}"
    );
}
