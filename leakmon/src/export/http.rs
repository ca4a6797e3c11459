//! The web endpoints: `/metrics`, `/api/v1/leaks`, `/api/v1/processes`, `/healthz`,
//! and the profiles `/debug/pprof/heap` and `/debug/flamegraph.svg`.
//!
//! Everything but the profiles is rendered once per sampling tick into a [`Published`]
//! snapshot; handlers only clone it, so scrapes cost nothing however often they come.
//! A profile is built on request by the daemon's loop (which owns the probes), asked
//! through a [`ProfileRequest`].

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
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
}

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
        },
        Ok(Err((status, why))) => (status, format!("{why}\n")).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the profile was not built\n").into_response(),
    }
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
    let Some(tls) = web.tls else {
        return Ok(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("web server stopped: {e}");
            }
        }));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok(tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that fails the handshake is its own problem, not the server's.
                let Ok(stream) = acceptor.accept(tcp).await else {
                    tracing::debug!(%peer, "TLS handshake failed");
                    return;
                };
                let service =
                    hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        use tower::ServiceExt as _;
                        app.clone().oneshot(req.map(axum::body::Body::new))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}
