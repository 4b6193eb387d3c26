//! `deploy/k8s/`, what reaches the pods and what they may do: selectors
//! that pick the server's pods and not the migration Job's, Ingresses
//! that route the public API but not `/metrics` and buffer all but the
//! sockets and change streams, pods locked down within their memory, and
//! replicas that fit in PostgreSQL's connections.

use crate::k8s::support;

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

/// Paths the public must not reach: Prometheus' (in-cluster), the
/// kubelet's (one random pod's readiness through the balancer), local
/// mode's key set.
const UNROUTED: [&str; 3] = ["/metrics", "/ready", "/.well-known/jwks.json"];

#[test]
fn the_ingresses_route_the_public_api_but_not_metrics() {
    let (ingresses, service) = (all("Ingress"), one("Service"));
    let service_ports = at(service, "/spec/ports").as_array().expect("ports");
    let mut hosts = Vec::new();
    for &ingress in &ingresses {
        let what = describe(ingress);
        assert!(
            ingress["spec"].get("defaultBackend").is_none(),
            "{what}: a default backend sends every path to the server, /metrics included"
        );
        let rules = at(ingress, "/spec/rules").as_array().expect("rules");
        let tls_hosts: Vec<&Value> = ingress["spec"]["tls"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|tls| tls["hosts"].as_array().into_iter().flatten())
            .collect();
        for rule in rules {
            assert!(
                tls_hosts.contains(&&rule["host"]),
                "{what} serves {} without TLS",
                rule["host"]
            );
            hosts.extend(rule["host"].as_str());
            for path in rule.pointer("/http/paths").and_then(Value::as_array).expect("paths") {
                let backend = &path["backend"]["service"];
                assert_eq!(
                    backend["name"], service["metadata"]["name"],
                    "{what}: {} goes to another Service",
                    path["path"]
                );
                assert!(
                    service_ports
                        .iter()
                        .any(|p| p["name"] == backend["port"]["name"] || p["port"] == backend["port"]["number"]),
                    "{what}: {} goes to a port the Service does not have: {backend}",
                    path["path"]
                );
                // Either reading: use-regex on any Ingress of the host
                // widens every path of it.
                for target in UNROUTED {
                    assert!(
                        !reaches(path, target, true) && !reaches(path, target, false),
                        "{what}: the path {} ({}) exposes {target} to the public",
                        path["path"],
                        path["pathType"]
                    );
                }
            }
        }
    }
    assert!(!hosts.is_empty(), "no Ingress serves a host");
    for host in hosts {
        let routes = HostRoutes::new(&ingresses, host);
        let by = |target: &str| {
            routes
                .route(target)
                .unwrap_or_else(|| panic!("no Ingress routes {host}{target}"))
                .ingress
        };
        let annotation = |ingress: &'static Value, key: &str| -> &'static str {
            nginx_annotation(ingress, key)
                .unwrap_or_else(|| panic!("{} has no nginx.ingress.kubernetes.io/{key}", describe(ingress)))
        };
        for target in ["/sync/todo/stream", "/ws", "/ws/todo"] {
            let ingress = by(target);
            for timeout in ["proxy-read-timeout", "proxy-send-timeout"] {
                let value: u64 = annotation(ingress, timeout).parse().expect("a number of seconds");
                assert!(
                    value > 60,
                    "{} takes {target} with {timeout} {value} s: it would cut idle WebSockets and change \
                     streams (the server pings every 30 s)",
                    describe(ingress)
                );
            }
            assert_eq!(
                annotation(ingress, "proxy-buffering"),
                "off",
                "{} takes {target}: buffered, change stream events wait in nginx",
                describe(ingress)
            );
        }
        for target in ["/sync/todo", "/sync/todo/pull"] {
            let ingress = by(target);
            // ingress-nginx's default is off: "on" must be said.
            assert_eq!(
                nginx_annotation(ingress, "proxy-buffering"),
                Some("on"),
                "{} takes {target} unbuffered: the pod holds an answer for as long as its client takes to read it",
                describe(ingress)
            );
            let body = annotation(ingress, "proxy-body-size");
            let megabytes: u64 = body
                .strip_suffix('m')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("proxy-body-size {body} is not in megabytes (e.g. 11m)"));
            assert!(
                megabytes > 10,
                "{} takes {target} with proxy-body-size {body}: a body the server accepts (up to 10 MB) would \
                 get nginx's 413",
                describe(ingress)
            );
        }
    }
}

/// The reading of paths above, on Ingresses of its own: it must tell the
/// stream from a pull, and fail when use-regex is missing.
#[test]
fn the_routing_model_reads_paths_as_ingress_nginx_does() {
    let ingress = |name: &str, regex: bool, paths: Value| {
        let annotations = if regex {
            json!({"nginx.ingress.kubernetes.io/use-regex": "true"})
        } else {
            json!({})
        };
        json!({
            "kind": "Ingress",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"rules": [{"host": "h", "http": {"paths": paths}}]},
        })
    };
    let api = ingress(
        "api",
        false,
        json!([
            {"path": "/sync", "pathType": "Prefix"},
            {"path": "/health", "pathType": "Exact"},
            {"path": "/openapi.json", "pathType": "Exact"},
        ]),
    );
    let stream = json!([{"path": "/sync/[^/]+/stream$", "pathType": "ImplementationSpecific"}]);
    let taker = |routes: &HostRoutes, target: &str| routes.route(target).map(|p| name(p.ingress).to_owned());
    let (with, without) = (ingress("live", true, stream.clone()), ingress("live", false, stream));

    let routes = HostRoutes::new(&[&api, &with], "h");
    assert!(routes.regex);
    for (target, expected) in [
        ("/sync/todo/stream", Some("live")),
        ("/SYNC/todo/Stream", Some("live")),
        ("/sync/todo/stream/more", Some("api")),
        ("/sync/todo/pull", Some("api")),
        ("/sync/todo", Some("api")),
        // Exact widened to a prefix, `.` to any character.
        ("/healthz", Some("api")),
        ("/openapi-json", Some("api")),
        ("/metrics", None),
    ] {
        assert_eq!(taker(&routes, target).as_deref(), expected, "with use-regex: {target}");
    }

    let routes = HostRoutes::new(&[&api, &without], "h");
    assert!(!routes.regex);
    for (target, expected) in [
        // Without use-regex the stream path is a literal: the API takes
        // the stream.
        ("/sync/todo/stream", Some("api")),
        ("/sync/todo/pull", Some("api")),
        ("/syncing", None),
        ("/healthz", None),
        ("/openapi-json", None),
    ] {
        assert_eq!(
            taker(&routes, target).as_deref(),
            expected,
            "without use-regex: {target}"
        );
    }
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
