//! A request body that does not decode as protobuf is the client's bad input.
//!
//! tonic-prost answers such a body with INTERNAL (the gRPC convention for a broken peer), which
//! reads like a server fault. surge's API answers INVALID_ARGUMENT instead, with tonic's own
//! message ("failed to decode Protobuf message: ..."), so clients and operators tell bad bytes
//! from a bug. The layer rewrites only that answer: the status travels in the headers of a
//! trailers-only response, which tonic sends when a unary request cannot be read.

use std::task::{Context, Poll};

use futures::future::MapOk;
use futures::TryFutureExt;

/// tonic-prost's message for an undecodable body, raw and as tonic percent-encodes it.
const DECODE_ERROR: [&str; 2] = [
    "failed to decode Protobuf message",
    "failed%20to%20decode%20Protobuf%20message",
];

#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeErrorLayer;

impl<S> tower::Layer<S> for DecodeErrorLayer {
    type Service = DecodeErrorService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeErrorService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct DecodeErrorService<S> {
    inner: S,
}

type Fix<RB> = fn(http::Response<RB>) -> http::Response<RB>;

impl<S, B, RB> tower::Service<http::Request<B>> for DecodeErrorService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = MapOk<S::Future, Fix<RB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.inner
            .call(req)
            .map_ok(invalid_argument_for_bad_bytes::<RB> as Fix<RB>)
    }
}

/// INTERNAL "failed to decode Protobuf message" becomes INVALID_ARGUMENT; anything else passes.
pub fn invalid_argument_for_bad_bytes<RB>(mut r: http::Response<RB>) -> http::Response<RB> {
    let headers = r.headers_mut();
    let internal = headers.get("grpc-status").is_some_and(|v| v == "13");
    let undecodable = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| DECODE_ERROR.iter().any(|p| m.starts_with(p)));
    if internal && undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &str, message: &str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut()
            .insert("grpc-status", status.parse().expect("header"));
        r.headers_mut()
            .insert("grpc-message", message.parse().expect("header"));
        r
    }

    fn status(r: &http::Response<()>) -> &str {
        r.headers()["grpc-status"].to_str().expect("ascii")
    }

    #[test]
    fn an_undecodable_body_is_invalid_argument() {
        let r = response(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20wire%20type",
        );
        assert_eq!(status(&invalid_argument_for_bad_bytes(r)), "3");
    }

    #[test]
    fn other_answers_pass_unchanged() {
        let r = response("13", "state%20machine%20failed");
        assert_eq!(status(&invalid_argument_for_bad_bytes(r)), "13");
        let r = response("5", "failed%20to%20decode%20Protobuf%20message");
        assert_eq!(status(&invalid_argument_for_bad_bytes(r)), "5");
        let ok = http::Response::new(());
        assert!(invalid_argument_for_bad_bytes(ok)
            .headers()
            .get("grpc-status")
            .is_none());
    }
}
