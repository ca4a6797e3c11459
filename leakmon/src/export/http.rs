//! The web endpoints: `/metrics`, `/api/v1/leaks`, `/api/v1/processes`, `/healthz`,
//! the profiles `/debug/pprof/heap` and `/debug/flamegraph.svg`, and `POST
//! /api/v1/holders?pid=N`, which holds a process still for a scan of what holds its
//! unfreed blocks (a POST: it does something to the process, and no crawler or
//! scraper that only reads should set it off).
//!
//! Everything but the profiles is rendered once per sampling tick into a [`Published`]
//! snapshot; handlers only clone it, so scrapes cost nothing however often they come.
//! A profile is built on request by the daemon's loop (which owns the probes), asked
//! through a [`ProfileRequest`].

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use tokio::sync::{mpsc, oneshot, RwLock};

use super::web_config::WebConfig;

/// What the endpoints serve, replaced as a whole each tick.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub metrics: String,
    pub leaks: String,
    pub processes: String,
    pub ready: bool,
}

pub type Shared = Arc<RwLock<Published>>;

/// Whose unfreed memory a profile shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Pid(u32),
    /// Every traced process of a service (its systemd unit, cgroup or container).
    Service(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileKind {
    Pprof,
    FlameGraph,
    /// The process's report with its holders scan, as JSON: the longest pause allowed
    /// (`None`: the method's own default), and for a Node.js process the window whose
    /// surviving objects are named, in seconds.
    Holders {
        budget_ms: Option<u32>,
        window_s: u32,
    },
}

/// The window of a Node.js process's holders unless `duration_s` says otherwise.
pub const HOLDERS_WINDOW_S: u32 = 20;

/// Why a profile cannot be given: the HTTP status and a one-line reason.
pub type ProfileError = (StatusCode, String);

/// A profile asked of the daemon's loop.
#[derive(Debug)]
pub struct ProfileRequest {
    pub selector: Selector,
    pub kind: ProfileKind,
    pub reply: oneshot::Sender<Result<Vec<u8>, ProfileError>>,
}

#[derive(Clone)]
struct AppState {
    published: Shared,
    profiles: mpsc::Sender<ProfileRequest>,
}

impl axum::extract::FromRef<AppState> for Shared {
    fn from_ref(state: &AppState) -> Self {
        state.published.clone()
    }
}

pub fn router(state: Shared, profiles: mpsc::Sender<ProfileRequest>) -> Router {
    Router::new()
        .route(
            "/debug/pprof/heap",
            get(|State(app): State<AppState>, Query(q): Query<HashMap<String, String>>| async move {
                profile(&app, &q, ProfileKind::Pprof).await
            }),
        )
        .route(
            "/debug/flamegraph.svg",
            get(|State(app): State<AppState>, Query(q): Query<HashMap<String, String>>| async move {
                profile(&app, &q, ProfileKind::FlameGraph).await
            }),
        )
        .route(
            "/api/v1/holders",
            post(|State(app): State<AppState>, Query(q): Query<HashMap<String, String>>| async move {
                holders(&app, &q).await
            }),
        )
        .route(
            "/metrics",
            get(|s: State<Shared>| async move {
                ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], s.read().await.metrics.clone())
            }),
        )
        .route("/api/v1/leaks", get(|s: State<Shared>| async move { json(s.read().await.leaks.clone()) }))
        .route(
            "/api/v1/processes",
            get(|s: State<Shared>| async move { json(s.read().await.processes.clone()) }),
        )
        .route(
            "/healthz",
            get(|s: State<Shared>| async move {
                if s.read().await.ready {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }),
        )
        .with_state(AppState { published: state, profiles })
}

/// `?pid=N` or `?service=NAME`, asked of the daemon's loop.
async fn profile(app: &AppState, query: &HashMap<String, String>, kind: ProfileKind) -> Response {
    let selector = match (query.get("pid"), query.get("service")) {
        (Some(pid), None) => match pid.parse() {
            Ok(pid) => Selector::Pid(pid),
            Err(_) => {
                return (StatusCode::BAD_REQUEST, format!("pid must be a number, not {pid:?}\n"))
                    .into_response()
            }
        },
        (None, Some(service)) => Selector::Service(service.clone()),
        _ => return (StatusCode::BAD_REQUEST, "give one of ?pid=N or ?service=NAME\n").into_response(),
    };
    let (reply, answer) = oneshot::channel();
    if app.profiles.send(ProfileRequest { selector, kind, reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "leakmon is stopping\n").into_response();
    }
    match answer.await {
        Ok(Ok(body)) => match kind {
            ProfileKind::Pprof => (
                [
                    (header::CONTENT_TYPE, "application/octet-stream"),
                    (header::CONTENT_DISPOSITION, "attachment; filename=\"heap.pb.gz\""),
                ],
                body,
            )
                .into_response(),
            ProfileKind::FlameGraph => ([(header::CONTENT_TYPE, "image/svg+xml")], body).into_response(),
            ProfileKind::Holders { .. } => {
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
        },
        Ok(Err((status, why))) => (status, format!("{why}\n")).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the profile was not built\n").into_response(),
    }
}

/// `?pid=N[&budget_ms=MS]`: one process, scanned by the daemon's loop.
async fn holders(app: &AppState, query: &HashMap<String, String>) -> Response {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why).into_response();
    if let Some(other) = query.keys().find(|k| !matches!(k.as_str(), "pid" | "budget_ms" | "duration_s")) {
        return bad(format!("unknown parameter {other:?}: give ?pid=N[&budget_ms=MS][&duration_s=S]\n"));
    }
    if !query.contains_key("pid") {
        return bad("a holders scan is of one process: give ?pid=N\n".to_owned());
    }
    let budget_ms = match query.get("budget_ms").map(|b| b.parse::<u32>()) {
        None => None,
        Some(Ok(ms)) if (1..=600_000).contains(&ms) => Some(ms),
        Some(_) => {
            return bad("budget_ms must be a whole number of milliseconds from 1 to 600000\n".to_owned())
        }
    };
    let window_s = match query.get("duration_s").map(|d| d.parse::<u32>()) {
        None => HOLDERS_WINDOW_S,
        Some(Ok(s)) if (1..=3600).contains(&s) => s,
        Some(_) => return bad("duration_s must be a whole number of seconds from 1 to 3600\n".to_owned()),
    };
    profile(app, query, ProfileKind::Holders { budget_ms, window_s }).await
}

fn json(body: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// Binds `addr` (failing at once, with the address, if it is taken) and serves, over
/// TLS and behind basic authentication where `web` says so.
pub async fn serve(
    addr: SocketAddr,
    state: Shared,
    profiles: mpsc::Sender<ProfileRequest>,
    web: Option<WebConfig>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("listen on {addr}: {e}"))?;
    let mut app = router(state, profiles);
    let web = web.unwrap_or(WebConfig { tls: None, users: None });
    // Stacks, process names and profiles go over the network only to users who log in:
    // without users, only loopback clients get them (`/metrics` and `/healthz` are for
    // every scraper, as node_exporter's).
    let open_to_all = web.users.is_some();
    if let Some(users) = web.users {
        app = app.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let users = users.clone();
                async move {
                    let authorization = req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    if users.allows_async(authorization.as_deref()).await {
                        next.run(req).await
                    } else {
                        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic")], "unauthorized\n")
                            .into_response()
                    }
                }
            },
        ));
    }
    let tls = web.tls.map(tokio_rustls::TlsAcceptor::from);
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            // At the cap, new connections wait in the kernel's backlog, not in memory.
            let Ok(permit) = connections.clone().acquire_owned().await else { return };
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            };
            let (tls, app) = (tls.clone(), app.clone());
            let everything = open_to_all || peer.ip().to_canonical().is_loopback();
            tokio::spawn(async move {
                let _connection = permit;
                match tls {
                    None => serve_connection(tcp, app, everything).await,
                    // A client that fails (or never finishes) the handshake is its own
                    // problem, not the server's.
                    Some(acceptor) => {
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                        {
                            serve_connection(stream, app, everything).await;
                        } else {
                            tracing::debug!(%peer, "TLS handshake failed or timed out");
                        }
                    }
                }
            });
        }
    }))
}

/// Connections served at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to send a request's headers (a slow client holds a connection
/// and its memory, not a thread).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection lives, kept alive or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Whether `path` is only for users who logged in, or for clients on loopback.
pub fn private_path(path: &str) -> bool {
    !matches!(path, "/metrics" | "/healthz")
}

/// Serves HTTP/1 on one connection, within the timeouts above; `everything` false
/// limits it to the public paths (see [`private_path`]).
async fn serve_connection<S>(io: S, app: Router, everything: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        use tower::ServiceExt as _;
        let app = app.clone();
        async move {
            if !everything && private_path(req.uri().path()) {
                return Ok::<_, std::convert::Infallible>(
                    (
                        StatusCode::FORBIDDEN,
                        "stacks, processes and profiles are served over the network only to users who log in (basic_auth_users in --web.config.file), or to clients on loopback\n",
                    )
                        .into_response(),
                );
            }
            app.oneshot(req.map(axum::body::Body::new)).await
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let _ = tokio::time::timeout(
        CONNECTION_LIFETIME,
        builder.serve_connection(hyper_util::rt::TokioIo::new(io), service),
    )
    .await;
}
