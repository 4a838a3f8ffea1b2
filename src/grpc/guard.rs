//! What stands between a hostile or buggy client and the server's state.
//!
//! - [`CatchPanicLayer`] wraps every call: a panic in a handler (or while it
//!   is being set up) becomes an INTERNAL answer for that call, an error log
//!   line naming the method, and `fabric_grpc_panics_total`; the connection
//!   and every other call go on. A stream whose producing task panics ends
//!   with INTERNAL too (see `entity::async_stream`).
//! - [`WatchSlot`] counts open `WatchEntities` streams against
//!   `server.max_watchers`, so a flood of watches is refused with
//!   RESOURCE_EXHAUSTED instead of growing memory: each open watch holds up
//!   to two 64-message queues and a place in the change broadcast.
//! - [`shown`] bounds what of a client's input is echoed back in an error
//!   message or a log line.
//!
//! Message sizes, streams per connection and HTTP/2 keepalives are set on
//! the server builder (`grpc::serve`), from `[server]`.

use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::codegen::http;

pub use crate::event::MAX_ID_BYTES;

/// At most this many characters of client input are echoed in messages.
const SHOWN_CHARS: usize = 64;

/// `s` quoted for an error message, cut to a few dozen characters (with
/// its length in bytes when cut).
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// Refuses an id over [`MAX_ID_BYTES`].
pub fn check_id_len(id: &str) -> Result<(), Status> {
    if id.len() > MAX_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "id {} is longer than the {MAX_ID_BYTES} bytes an id may have",
            shown(id)
        )));
    }
    Ok(())
}

/// A tower layer answering INTERNAL for a call whose handler panicked.
#[derive(Clone)]
pub struct CatchPanicLayer {
    pub panics: Counter,
}

impl<S> tower::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic {
            inner,
            panics: self.panics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CatchPanic<S> {
    inner: S,
    panics: Counter,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> tower::Service<http::Request<B>> for CatchPanic<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let panics = self.panics.clone();
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(fut) => fut,
            Err(p) => {
                let answer = panicked(&method, &*p, &panics);
                return Box::pin(std::future::ready(Ok(answer)));
            }
        };
        Box::pin(async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(answer) => answer,
                Err(p) => Ok(panicked(&method, &*p, &panics)),
            }
        })
    }
}

/// The text a panic was raised with.
pub fn panic_message(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

fn panicked<B: Default>(method: &str, p: &(dyn Any + Send), panics: &Counter) -> http::Response<B> {
    panics.inc();
    tracing::error!(
        method,
        panic = panic_message(p),
        "a gRPC handler panicked; the call is answered INTERNAL and the server goes on"
    );
    Status::internal(format!("internal error in {method}; the server logged it")).into_http()
}

/// One open `WatchEntities` stream, counted in `fabric_grpc_watchers`
/// until dropped.
pub struct WatchSlot(Gauge);

impl WatchSlot {
    /// A slot, or RESOURCE_EXHAUSTED when `max` streams are open already.
    pub fn take(open: &Gauge, max: usize) -> Result<WatchSlot, Status> {
        let before = open.inc();
        if before >= max as i64 {
            open.dec();
            return Err(Status::resource_exhausted(format!(
                "{max} WatchEntities streams are open already (server.max_watchers); \
                 close one or raise the limit"
            )));
        }
        Ok(WatchSlot(open.clone()))
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A stream that holds its [`WatchSlot`] for as long as it lives.
pub struct Slotted<S> {
    pub inner: S,
    pub slot: WatchSlot,
}

impl<S: futures::Stream + Unpin> futures::Stream for Slotted<S> {
    type Item = S::Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_cuts_long_input() {
        assert_eq!(shown("abc"), "\"abc\"");
        let long = "é".repeat(1000);
        let s = shown(&long);
        assert!(s.ends_with("… (2000 bytes)"), "{s}");
        assert!(s.chars().count() < 100, "{s}");
    }

    #[test]
    fn watch_slots_are_bounded_and_given_back() {
        let open = Gauge::default();
        let a = WatchSlot::take(&open, 2).unwrap();
        let _b = WatchSlot::take(&open, 2).unwrap();
        let err = WatchSlot::take(&open, 2).err().unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(open.get(), 2);
        drop(a);
        assert_eq!(open.get(), 1);
        let _c = WatchSlot::take(&open, 2).unwrap();
        assert_eq!(open.get(), 2);
    }
}
