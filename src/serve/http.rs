//! The HTTP server loop: axum's router on hyper's HTTP/1 connections, with what `axum::serve`
//! does not bound: how many connections are open at once (past `--max-connections` a new one
//! gets a 503 and is closed) and how long a client may take to send its request headers
//! (`--header-timeout`; a stalled client is dropped). Slow request bodies are bounded per route
//! (the job upload, `--body-timeout`, in `form.rs`). Shutdown stops accepting and lets open
//! requests finish, for a grace period.

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Bounds on the connections themselves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for open connections.
pub async fn serve(listener: TcpListener, app: Router, limits: ConnectionLimits, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    // Refusals answered at once; past these a connection is closed without an answer, so a
    // flood cannot hold file descriptors in refusals either.
    let refusing = Arc::new(Semaphore::new(REFUSALS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, limits.max_connections).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone().map_request(|req: hyper::Request<Incoming>| req.map(Body::new)));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    // Open requests finish (event streams end as their jobs are cancelled); a client that
    // keeps a connection open past the grace period is cut.
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {} s: closing them", SHUTDOWN_GRACE.as_secs());
    }
    Ok(())
}

/// Connections over the cap answered with a 503 at the same time.
const REFUSALS: usize = 64;
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Answers a connection over the cap with a 503 (the same JSON as every error) and closes it.
async fn refuse(mut stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncReadExt;
    // Read what the client sent first: closing with unread input would reset the connection
    // before it reads the answer.
    let mut request = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut request)).await;
    let body = serde_json::json!({ "error": format!("too many open connections (at most {max}, --max-connections); retry shortly") }).to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
