//! The web endpoints: `/metrics`, `/api/v1/leaks`, `/api/v1/processes`, `/healthz`.
//!
//! Everything served is rendered once per sampling tick into a [`Published`] snapshot;
//! handlers only clone it, so scrapes cost nothing however often they come.

use std::{net::SocketAddr, sync::Arc};

use axum::{http::header, response::IntoResponse, routing::get, Router};
use tokio::sync::RwLock;

/// What the endpoints serve, replaced as a whole each tick.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub metrics: String,
    pub leaks: String,
    pub processes: String,
    pub ready: bool,
}

pub type Shared = Arc<RwLock<Published>>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|s: axum::extract::State<Shared>| async move {
                ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], s.read().await.metrics.clone())
            }),
        )
        .route(
            "/api/v1/leaks",
            get(|s: axum::extract::State<Shared>| async move { json(s.read().await.leaks.clone()) }),
        )
        .route(
            "/api/v1/processes",
            get(|s: axum::extract::State<Shared>| async move { json(s.read().await.processes.clone()) }),
        )
        .route(
            "/healthz",
            get(|s: axum::extract::State<Shared>| async move {
                if s.read().await.ready {
                    (axum::http::StatusCode::OK, "ok\n")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }),
        )
        .with_state(state)
}

fn json(body: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// Binds `addr` (failing at once, with the address, if it is taken) and serves.
pub async fn serve(addr: SocketAddr, state: Shared) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("listen on {addr}: {e}"))?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!("web server stopped: {e}");
        }
    }))
}
