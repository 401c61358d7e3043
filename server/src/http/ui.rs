//! `GET /ui`: a live status page, served by the server itself (one HTML file, no framework, no
//! request to anywhere else). It lists the tenant's locks (holders, tokens, queue lengths),
//! leases and the server's readiness, and follows `GET /v1/events` to update as locks change.

use axum::http::header;
use axum::response::IntoResponse;

/// The page.
const PAGE: &str = include_str!("ui.html");

/// The live status page (HTML).
#[utoipa::path(get, path = "/ui", tag = "service",
    responses((status = 200, description = "The status page", content_type = "text/html")))]
pub async fn status_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing but this server: scripts, styles and connections included.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        PAGE,
    )
}
