//! Scraping a test server's `/metrics` and reading it as Prometheus text.

use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricNumber, MetricsExposition, PrometheusType, PrometheusValue};
use reqwest::StatusCode;

use super::app::TestApp;

pub type Scrape = MetricsExposition<PrometheusType, PrometheusValue>;

pub async fn scrape(app: &TestApp) -> Scrape {
    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "Prometheus text format"
    );
    let text = response.text().await.unwrap();
    parse_prometheus(&text).unwrap_or_else(|e| panic!("not valid Prometheus text ({e:?}): {text}"))
}

fn number(n: &MetricNumber) -> f64 {
    match n {
        MetricNumber::Float(f) => *f,
        MetricNumber::Int(i) => *i as f64,
    }
}

/// The sum of a metric's samples with these labels (0 when there are
/// none): a counter's or gauge's value, or a histogram's count.
pub fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let Some(family) = scrape.families.get(metric) else {
        return 0.0;
    };
    family
        .iter_samples()
        .filter(|sample| {
            let set = sample.get_labelset().expect("a parsed sample has labels");
            labels.iter().all(|(k, v)| set.get_label_value(k) == Some(*v))
        })
        .map(|sample| match &sample.value {
            PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => number(n),
            PrometheusValue::Counter(c) => number(&c.value),
            PrometheusValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            PrometheusValue::Summary(_) => panic!("{metric} is a summary"),
        })
        .sum()
}
