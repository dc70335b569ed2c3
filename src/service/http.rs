//! `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1.
//!
//! Three GET routes with no body to read do not need a web framework: this
//! reads the request line, answers and closes the connection.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Metrics;

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    loop {
        let (mut conn, _) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the whole head: a client may write it in pieces, and
            // closing with unread bytes would reset the connection.
            // A client that never finishes its head is dropped after
            // HEAD_TIMEOUT: it cannot hold a task for ever.
            let mut buf = [0u8; 8192];
            let mut n = 0;
            let head = async {
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => n += k,
                    }
                }
                true
            };
            if !matches!(tokio::time::timeout(HEAD_TIMEOUT, head).await, Ok(true)) {
                return;
            }
            let line = std::str::from_utf8(&buf[..n])
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" if metrics.is_ready() => ("200 OK", "ready\n".to_string()),
                "/readyz" => (
                    "503 Service Unavailable",
                    "loading the catalogue or joining the group\n".to_string(),
                ),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
