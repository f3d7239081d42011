//! The web console at `/ui`: three static files (`scheduler/ui/`) built into the binary with
//! `include_str!`, so every replica serves it on its HTTP port with no build step beyond cargo.
//!
//! The page holds no data: everything it shows comes from the job API and the aggregated
//! `/v1/ui/*` reads ([`crate::ui_api`]), which take the same bearer token as `/v1/jobs` (typed
//! into the page, kept in the tab's `sessionStorage`) over the same port, so with `--tls-dir` the
//! console is mutual TLS like the API: a browser without a cluster client certificate gets
//! nothing, not even these files.

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::http::HttpState;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_assets_and_has_the_ids_scripts_read() {
        assert!(INDEX_HTML.contains(r#"src="/ui/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/ui/app.css""#));
        // The overview's counts, by the ids the issue names.
        assert!(APP_JS.contains(r#"id="nodes-ready""#));
        assert!(APP_JS.contains(r#"id="sandboxes-running""#));
        // Only aggregated endpoints: no per-sandbox read of a job.
        assert!(
            !APP_JS.contains("/sandboxes/"),
            "the console reads no sandbox list"
        );
    }
}
