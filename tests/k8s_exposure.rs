//! `deploy/k8s/`, what reaches the pods and what they may do: selectors
//! that pick the server's pods and not the migration Job's, an Ingress
//! that routes the public API but not `/metrics`, pods locked down within
//! their memory, and replicas that fit in PostgreSQL's connections.

mod common;
#[path = "k8s/support.rs"]
mod support;

use serde_json::{Value, json};
use support::*;

#[test]
fn selectors_pick_the_server_pods_and_not_the_migration_job() {
    let (deployment, server, migration) = (one("Deployment"), server_pod_labels(), migration_pod_labels());
    let mut selectors = vec![
        (
            "the Deployment's selector",
            at(deployment, "/spec/selector/matchLabels").clone(),
        ),
        ("the Service's selector", at(one("Service"), "/spec/selector").clone()),
        (
            "the PodDisruptionBudget's selector",
            at(one("PodDisruptionBudget"), "/spec/selector/matchLabels").clone(),
        ),
    ];
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let labels = spread
            .pointer("/labelSelector/matchLabels")
            .expect("a topology spread constraint without matchLabels");
        selectors.push(("a topology spread constraint's selector", labels.clone()));
    }
    for (what, selector) in &selectors {
        assert!(
            selects(selector, server),
            "{what} {selector} does not select the server's pods {server}"
        );
        assert!(
            !selects(selector, migration),
            "{what} {selector} also selects the migration Job's pod {migration}"
        );
    }
    let autoscaler = one("HorizontalPodAutoscaler");
    assert_eq!(
        at(autoscaler, "/spec/scaleTargetRef"),
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": name(deployment)}),
        "the autoscaler scales something else than the Deployment"
    );
    let policy = one("NetworkPolicy");
    assert!(
        selects(at(policy, "/spec/podSelector/matchLabels"), server),
        "the NetworkPolicy does not apply to the server's pods"
    );
    // kustomize's selector labelling (includeSelectors) rewrites the
    // ingress controller's pod selector here into mana-sync's own, which
    // would cut the ingress off.
    for rule in at(policy, "/spec/ingress").as_array().expect("ingress rules") {
        for peer in rule["from"].as_array().into_iter().flatten() {
            if let Some(labels) = peer.pointer("/podSelector/matchLabels") {
                assert!(
                    !selects(labels, server),
                    "the NetworkPolicy admits mana-sync's own pods where it means another application's: {peer}"
                );
            }
        }
    }
}

/// Whether an Ingress `path` sends requests for `target` to its backend.
fn reaches(path: &Value, target: &str) -> bool {
    let prefix = path["path"].as_str().expect("an Ingress path");
    if path["pathType"] == "Exact" {
        target == prefix
    } else {
        // Prefix (and ImplementationSpecific, taken as the widest reading).
        let prefix = prefix.trim_end_matches('/');
        target == prefix || target.starts_with(&format!("{prefix}/"))
    }
}

#[test]
fn the_ingress_routes_the_public_api_but_not_metrics() {
    let (ingress, service) = (one("Ingress"), one("Service"));
    let service_ports = at(service, "/spec/ports").as_array().expect("ports");
    assert!(
        ingress["spec"].get("defaultBackend").is_none(),
        "a default backend sends every path to the server, /metrics included"
    );
    let rules = at(ingress, "/spec/rules").as_array().expect("rules");
    let paths: Vec<&Value> = rules
        .iter()
        .flat_map(|rule| rule.pointer("/http/paths").and_then(Value::as_array).expect("paths"))
        .collect();
    for path in &paths {
        let backend = &path["backend"]["service"];
        assert_eq!(
            backend["name"], service["metadata"]["name"],
            "{} goes to another Service",
            path["path"]
        );
        assert!(
            service_ports
                .iter()
                .any(|p| p["name"] == backend["port"]["name"] || p["port"] == backend["port"]["number"]),
            "{} goes to a port the Service does not have: {backend}",
            path["path"]
        );
        assert!(
            !reaches(path, "/metrics"),
            "the Ingress path {} ({}) exposes /metrics to the public",
            path["path"],
            path["pathType"]
        );
    }
    for target in ["/sync/todo", "/sync/todo/pull", "/sync/todo/stream", "/ws", "/ws/todo"] {
        assert!(
            paths.iter().any(|path| reaches(path, target)),
            "the Ingress does not route {target}"
        );
    }
    let tls_hosts: Vec<&Value> = ingress["spec"]["tls"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|tls| tls["hosts"].as_array().into_iter().flatten())
        .collect();
    for rule in rules {
        assert!(
            tls_hosts.contains(&&rule["host"]),
            "the Ingress serves {} without TLS",
            rule["host"]
        );
    }
    let annotation = |key: &str| {
        ingress["metadata"]["annotations"][format!("nginx.ingress.kubernetes.io/{key}")]
            .as_str()
            .unwrap_or_else(|| panic!("the Ingress has no nginx.ingress.kubernetes.io/{key} annotation"))
    };
    for timeout in ["proxy-read-timeout", "proxy-send-timeout"] {
        let value: u64 = annotation(timeout).parse().expect("a number of seconds");
        assert!(
            value > 60,
            "{timeout} {value} s would cut idle WebSockets and change streams (the server pings every 30 s)"
        );
    }
    assert_eq!(
        annotation("proxy-buffering"),
        "off",
        "buffered, change stream events wait in nginx"
    );
    let body = annotation("proxy-body-size");
    let megabytes: u64 = body
        .strip_suffix('m')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("proxy-body-size {body} is not in megabytes (e.g. 11m)"));
    assert!(
        megabytes > 10,
        "proxy-body-size {body}: a body the server accepts (up to 10 MB) would get nginx's 413"
    );
}

#[test]
fn pods_run_locked_down_within_their_memory() {
    for workload in [one("Deployment"), one("Job")] {
        let (pod, container) = (at(workload, "/spec/template/spec"), container(workload));
        let what = describe(workload);
        let setting = |key: &str| {
            let own = &container["securityContext"][key];
            if own.is_null() {
                &pod["securityContext"][key]
            } else {
                own
            }
        };
        assert_eq!(setting("runAsNonRoot"), true, "{what}: runAsNonRoot is not set");
        assert_eq!(
            setting("runAsUser"),
            65532,
            "{what}: the image's user is 65532 (distroless nonroot)"
        );
        assert_eq!(
            setting("seccompProfile")["type"],
            "RuntimeDefault",
            "{what}: no RuntimeDefault seccomp profile"
        );
        let own = &container["securityContext"];
        assert_eq!(
            own["readOnlyRootFilesystem"], true,
            "{what}: the root filesystem is writable"
        );
        assert_eq!(
            own["allowPrivilegeEscalation"], false,
            "{what}: privilege escalation is allowed"
        );
        assert!(
            own["capabilities"]["drop"]
                .as_array()
                .is_some_and(|d| d.contains(&json!("ALL"))),
            "{what}: capabilities are not all dropped"
        );
        // With a read-only root, DATA_DIR must be a volume of its own.
        let (config, _) = config(&environment(workload));
        let data_dir = config.data_dir.to_str().expect("a UTF-8 path");
        let mount = container["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .find(|m| m["mountPath"] == data_dir)
            .unwrap_or_else(|| panic!("{what}: nothing is mounted at DATA_DIR {data_dir}, on a read-only root"));
        let volume = pod["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{what}: no volume {} for DATA_DIR", mount["name"]));
        assert!(
            volume.get("emptyDir").is_some(),
            "{what}: DATA_DIR should be an emptyDir"
        );
        assert!(
            container.pointer("/resources/limits/memory").is_some(),
            "{what}: no memory limit"
        );
    }
    let server = container(one("Deployment"));
    assert!(
        server.pointer("/resources/requests/cpu").is_some(),
        "the server has no CPU request: the autoscaler measures against it"
    );
    assert!(
        server.pointer("/resources/limits/cpu").is_none(),
        "the server has a CPU limit: CFS throttling stalls every socket of a pod after a burst \
         (deployment.yaml says why there is none)"
    );
}

#[test]
fn the_replicas_at_most_fit_in_postgresqls_connections() {
    let (config, _) = config(&environment(one("Deployment")));
    let autoscaler = one("HorizontalPodAutoscaler");
    let most = at(autoscaler, "/spec/maxReplicas").as_u64().expect("maxReplicas");
    let least = at(autoscaler, "/spec/minReplicas").as_u64().expect("minReplicas");
    assert!(
        least >= 2,
        "minReplicas {least}: a drain (the PodDisruptionBudget lets one pod go) would leave none"
    );
    assert_eq!(
        at(one("PodDisruptionBudget"), "/spec/maxUnavailable"),
        1,
        "the PodDisruptionBudget should let one pod go at a time"
    );
    // Each pod: its pool, plus the listener, the NOTIFY sender and the
    // availability probe; one pod surging and one terminating in a rollout;
    // two for the migration Job. PostgreSQL's default max_connections (100)
    // less its superuser_reserved_connections (3).
    let per_pod = u64::from(config.database_max_connections) + 3;
    let total = (most + 2) * per_pod + 2;
    assert!(
        total <= 97,
        "maxReplicas {most} x (DATABASE_MAX_CONNECTIONS {} + 3), with a surging and a terminating pod and the \
         migration, needs {total} connections: more than a default PostgreSQL allows (97); lower one or say in \
         hpa.yaml what max_connections it needs",
        config.database_max_connections
    );
}
