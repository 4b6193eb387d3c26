//! The built `mana-sync` binary as a child process: killed when dropped,
//! and waited for until it answers.

use std::process::Child;
use std::time::{Duration, Instant};

/// A server process, killed (SIGKILL) if still running when dropped.
pub struct ServerProcess(pub Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 30 s) until `url` answers with a success, and returns
/// that answer. Panics if the process exits first.
pub async fn answered(child: &mut Child, url: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::new();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mana-sync exited at start-up ({status})");
        }
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
        {
            return response;
        }
        assert!(Instant::now() < deadline, "mana-sync never answered {url}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
