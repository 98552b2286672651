//! The page's files and the API's description, compiled into the binary:
//! nothing is fetched at run time.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/app.js");
const STYLE: &str = include_str!("../../console/style.css");
const OPENAPI: &str = include_str!("openapi.json");

/// No inline script runs, and nothing loads from elsewhere.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
     script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

fn page(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub(super) async fn index() -> impl IntoResponse {
    page("text/html; charset=utf-8", INDEX)
}

pub(super) async fn script() -> impl IntoResponse {
    page("text/javascript; charset=utf-8", SCRIPT)
}

pub(super) async fn style() -> impl IntoResponse {
    page("text/css; charset=utf-8", STYLE)
}

pub(super) async fn openapi() -> impl IntoResponse {
    page("application/json", OPENAPI)
}
