//! CORS as the client-server spec asks of every endpoint ("Web Browser Clients"): each
//! response allows any origin, and an `OPTIONS` request is answered with the allowed
//! methods and headers without running the endpoint.
//!
//! A layer of our own rather than tower-http's: that one keeps a header map per request
//! until the response, which every held `/sync` paid for its whole wait.

use std::task::{Context, Poll};

use axum::{body::Body, response::Response};
use futures_util::future::{Either, MapOk, Ready, TryFutureExt, ready};
use http::{HeaderValue, Method, Request, StatusCode, header};
use tower::{Layer, Service};

const ALLOW_METHODS: &str = "GET, POST, PUT, DELETE, OPTIONS";
const ALLOW_HEADERS: &str = "X-Requested-With, Content-Type, Authorization";

#[derive(Clone, Copy, Default)]
pub struct CorsLayer;

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Cors<S> {
        Cors(inner)
    }
}

#[derive(Clone)]
pub struct Cors<S>(S);

impl<S, B> Service<Request<B>> for Cors<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        Either<Ready<Result<Response, S::Error>>, MapOk<S::Future, fn(Response) -> Response>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.method() == Method::OPTIONS {
            let mut resp = Response::new(Body::from("{}"));
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Either::Left(ready(Ok(with_cors(resp))));
        }
        Either::Right(self.0.call(req).map_ok(with_cors as fn(Response) -> Response))
    }
}

fn with_cors(mut resp: Response) -> Response {
    let headers = resp.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
    resp
}
