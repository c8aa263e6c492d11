//! Panics in code that decodes what clients send (Arrow IPC and Flight messages, shipped
//! plans, subset predicates) are caught and become a refusal of that one request. Rust's
//! default panic hook would still print each of them to stderr, outside the structured log
//! (and with a backtrace when `RUST_BACKTRACE` is set), so a client could flood a tier's log
//! with malformed bytes. Code run through [`contain`] (or polled through [`Contained`]) is
//! marked for the tiers' hook ([`install_hook`]), which logs such a panic at debug level only:
//! the refusal already says what went wrong. Any other panic is logged as an error, through
//! `tracing` like every other line.

use std::cell::Cell;
use std::future::Future;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;

thread_local! {
    /// How many [`contain`] calls are running on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks this thread as inside a contained section until dropped.
struct Inside;

impl Inside {
    fn enter() -> Self {
        DEPTH.with(|depth| depth.set(depth.get() + 1));
        Inside
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        DEPTH.with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

/// Runs `f`, catching a panic; the hook logs it at debug level only.
pub fn contain<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    let _inside = Inside::enter();
    std::panic::catch_unwind(AssertUnwindSafe(f))
}

/// True while a [`contain`] call runs on this thread.
pub fn is_contained() -> bool {
    DEPTH.with(Cell::get) > 0
}

/// Routes panics through `tracing`: contained ones at debug level, others as errors with
/// where they happened. Installed once by each tier process at start.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info: &PanicHookInfo<'_>| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        if is_contained() {
            tracing::debug!(%message, %location, "a decoder panicked on malformed input; the request is refused");
        } else {
            let thread = std::thread::current();
            let thread = thread.name().unwrap_or("unnamed");
            tracing::error!(%message, %location, thread, "panic");
        }
    }));
}

/// A future or stream whose every poll runs under [`contain`]: a panic while polling ends it
/// with `on_panic`'s value.
pub struct Contained<T, F> {
    inner: Option<T>,
    on_panic: F,
}

impl<T, F> Contained<T, F> {
    pub fn new(inner: T, on_panic: F) -> Self {
        Self { inner: Some(inner), on_panic }
    }
}

impl<T: Future + Unpin, F: Fn() -> T::Output + Unpin> Future for Contained<T, F> {
    type Output = T::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Output> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready((this.on_panic)()) };
        match contain(|| Pin::new(inner).poll(cx)) {
            Ok(poll) => poll,
            Err(_) => {
                this.inner = None;
                Poll::Ready((this.on_panic)())
            }
        }
    }
}

impl<T: Stream + Unpin, F: Fn() -> T::Item + Unpin> Stream for Contained<T, F> {
    type Item = T::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T::Item>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match contain(|| Pin::new(inner).poll_next(cx)) {
            Ok(poll) => poll,
            Err(_) => {
                // The panic is the stream's last item.
                this.inner = None;
                Poll::Ready(Some((this.on_panic)()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[test]
    fn a_contained_panic_is_caught_and_the_mark_is_scoped() {
        assert!(!is_contained());
        let inside = contain(is_contained).expect("no panic");
        assert!(inside);
        assert!(contain(|| panic!("malformed")).is_err());
        assert!(!is_contained(), "the mark outlived its section after a panic");
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_with_the_refusal() {
        let mut n = 0;
        let items = futures::stream::poll_fn(move |_| {
            n += 1;
            if n == 3 {
                panic!("a decoder failed");
            }
            Poll::Ready(Some(Ok::<i32, String>(n)))
        });
        let collected: Vec<_> = Contained::new(items, || Err("malformed".to_string())).collect().await;
        assert_eq!(collected, vec![Ok(1), Ok(2), Err("malformed".into())]);
    }

    #[tokio::test]
    async fn a_future_that_panics_resolves_to_the_refusal() {
        let panics = Box::pin(async {
            if is_contained() {
                panic!("a decoder failed");
            }
            1
        });
        assert_eq!(Contained::new(panics, || -1).await, -1);
    }
}
