//! Serving HTTP on the accepted connections: hyper's HTTP/1.1 (with
//! upgrades, for WebSockets) under a header timeout, until the
//! [`Lifecycle`] says to close.
//!
//! poem's own `Server` sets no timer on hyper, so a connection that never
//! completes a request head (a silent socket, headers sent a byte at a
//! time, a keep-alive connection left idle) would be held for ever. This
//! loop drives hyper itself, with hyper's header read timeout, and hands
//! each request to the poem application.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt, Response};

use crate::api::listener::{Lingering, Listener};
use crate::lifecycle::{Connection, Lifecycle, Stage};

/// Serves `app` on `listener` until `lifecycle` reaches
/// [`Stage::Closing`]: then accepts no more connections, and each open one
/// finishes the request it serves and closes (or ends at
/// [`Stage::CutOff`]). Returns once it has stopped accepting: the
/// lifecycle, not this loop, waits for the connections left.
///
/// `idle_timeout` bounds the wait for a request's head, from a
/// connection's opening or from the previous response until the head is
/// complete: it closes idle keep-alive connections and ones whose headers
/// trickle in. HTTP/1.1 only: browsers speak HTTP/2 only over TLS, which
/// the load balancer ends.
pub async fn run(
    listener: Listener,
    app: impl Endpoint + 'static,
    idle_timeout: Duration,
    lifecycle: Lifecycle,
) -> std::io::Result<()> {
    let app = Arc::new(app.map_to_response());
    let local = LocalAddr(listener.local_addr()?.into());
    let mut http = http1::Builder::new();
    // A client may send its request and then close its sending side (a
    // half-close, as `curl --data … | nc -N` does, or a proxy passing on a
    // client's FIN): its request is still answered, and a push applied.
    http.timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .half_close(true);
    let closing = lifecycle.reached(Stage::Closing);
    tokio::pin!(closing);
    loop {
        let (io, peer) = tokio::select! {
            () = &mut closing => break,
            accepted = listener.accept() => accepted,
        };
        let service = {
            let (app, local, remote) = (app.clone(), local.clone(), RemoteAddr(peer.into()));
            hyper::service::service_fn(move |req: poem::http::Request<Incoming>| {
                let (app, local, remote) = (app.clone(), local.clone(), remote.clone());
                async move {
                    let response: Response = app.get_response((req, local, remote, Scheme::HTTP).into()).await;
                    Ok::<_, Infallible>(hyper::Response::from(response))
                }
            })
        };
        let counted = lifecycle.connection();
        tokio::spawn(connection(http.clone(), io, service, lifecycle.clone(), counted));
    }
    // No more connections are accepted; those open finish what they do
    // (the lifecycle waits for them).
    Ok(())
}

/// Serves one connection until it closes or the [`Lifecycle`] ends it.
async fn connection<S, B>(http: http1::Builder, io: Lingering, service: S, lifecycle: Lifecycle, _counted: Connection)
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = http.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(connection);
    let drained = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = lifecycle.reached(Stage::Closing) => None,
    };
    let result = match drained {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = lifecycle.reached(Stage::CutOff) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
