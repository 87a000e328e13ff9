//! Serving HTTP: the accept loop, with the connection limits and deadlines of `[http]`.
//!
//! Each connection is served by hyper's HTTP/1 connection builder with tokio's timer, so
//! hyper's own header read timeout applies (`http.header_timeout_ms`): a connection that
//! waits for a request's headers longer than that (a silent socket, slowloris, or an idle
//! keep-alive connection, since hyper starts that clock as soon as the previous response is
//! sent) is closed. Bodies are read under `http.body_timeout_ms` by the handlers that read
//! them. On top, a connection on which no request is in progress and no byte has moved for
//! `http.idle_timeout_ms` is closed, whatever state hyper is in.
//!
//! At most `http.max_connections` connections are open at once, WebSocket sessions included
//! (the slot goes with the socket, through the upgrade, until it is dropped); a connection over
//! the limit is closed at accept. `imgate_http_connections` is the gauge of open ones.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpConfig;
use crate::metrics::Metrics;

/// When a connection last moved a byte, and whether a request is in progress on it.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last byte read or written.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether nothing moved for `idle` and no request is being handled.
    fn idle_for(&self, idle: Duration) -> bool {
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.in_flight.load(Ordering::Relaxed) == 0 && last.elapsed() >= idle
    }
}

/// Counts a request in progress until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// An accepted socket: records activity, and holds its connection slot until dropped (also
/// after a WebSocket upgrade, which takes the socket over).
struct Conn {
    io: TcpStream,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.http_connections.dec();
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting, lets each connection
/// finish its request in progress, and returns when all have ended (the caller bounds this).
/// With `tls`, every connection is HTTPS (and WSS): the handshake must complete within
/// `http.header_timeout_ms`, and a client that speaks anything else is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: HttpConfig,
    metrics: Arc<Metrics>,
    tls: Option<crate::client_tls::ClientTls>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let connections = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_timeout_ms));
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, the way hyper and
                    // axum do, rather than spin on an error that persists.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            tracing::debug!(%peer, "connection refused: http.max_connections open");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        metrics.http_connections.inc();
        let activity = Arc::new(Activity::new());
        let conn = Conn {
            io: tcp,
            activity: activity.clone(),
            metrics: metrics.clone(),
            _slot: slot,
        };
        let app = app.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let header_timeout = Duration::from_millis(cfg.header_timeout_ms);
        connections.spawn(async move {
            match tls {
                None => serve_connection(conn, app, builder, activity, idle, shutdown, peer).await,
                Some(tls) => {
                    let accepted =
                        tokio::time::timeout(header_timeout, tls.acceptor().accept(conn)).await;
                    match accepted {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, app, builder, activity, idle, shutdown, peer)
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection (plain or TLS) until it ends, goes idle, or the node drains it.
async fn serve_connection<I>(
    io: I,
    app: Router,
    builder: hyper::server::conn::http1::Builder,
    activity: Arc<Activity>,
    idle: Duration,
    shutdown: CancellationToken,
    peer: std::net::SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = TowerToHyperService::new(app);
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |req| {
            let guard = InFlight::new(activity.clone());
            let response = router.call(req);
            async move {
                let r = response.await;
                drop(guard);
                r
            }
        }
    });
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let mut check = tokio::time::interval(idle / 4);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "http connection ended");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = check.tick() => {
                if activity.idle_for(idle) {
                    tracing::debug!(%peer, "http connection idle: closed");
                    return;
                }
            }
        }
    }
}
