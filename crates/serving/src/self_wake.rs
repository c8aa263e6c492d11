//! Polling a connection again at once when its own poll woke it, instead of handing it back
//! to the scheduler.
//!
//! Why: hyper's HTTP/1.1 dispatcher and the handler it calls run in one task, and a request
//! with a body passes that body from one to the other through a channel. Each hand-over
//! wakes the task from inside its own poll (the handler asks for the body, the dispatcher
//! sends it, then closes it). tokio treats a task woken while it runs as a yield: it goes to
//! the back of the run queue and a parked worker is woken to steal it, which is a futex or
//! eventfd write, and on a VM an inter-processor interrupt, for a worker that then finds
//! nothing to do. A `POST /v1/sql` paid that two or three times per request; `GET /health`,
//! which has no body, never did. Re-polling here keeps the request on its thread.
//!
//! A wake that arrives while the connection is not being polled (a socket became readable,
//! a streamed answer's next batch is ready) goes to the task's own waker as before. Re-polls
//! are bounded and stop when the task's cooperative budget is spent, so a connection that
//! keeps waking itself still yields to the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// Polls in a row, at most, before a self-woken future is handed back to the scheduler.
const MAX_POLLS: usize = 8;

/// `inner`, re-polled at once when it wakes itself during a poll (see the module docs).
pub fn repoll_on_self_wake<F: Future>(inner: F) -> RepollOnSelfWake<F> {
    let shared = Arc::new(Shared { state: AtomicU8::new(IDLE), task: AtomicWaker::new() });
    RepollOnSelfWake { inner: Box::pin(inner), waker: Waker::from(Arc::clone(&shared)), shared }
}

/// The future [`repoll_on_self_wake`] returns.
pub struct RepollOnSelfWake<F> {
    inner: Pin<Box<F>>,
    shared: Arc<Shared>,
    /// The waker `inner` is polled with, made once.
    waker: Waker,
}

/// Not being polled: a wake goes to the task.
const IDLE: u8 = 0;
/// Being polled: a wake is noted, and the poll loop polls again.
const POLLING: u8 = 1;
/// Being polled, and woken since the poll began.
const WOKEN: u8 = 2;

struct Shared {
    state: AtomicU8,
    /// The waker of the task that polls last.
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // One atomic step decides it: either the poll loop sees `WOKEN` when its poll ends,
        // or the loop had already ended (`IDLE`) and the task is woken.
        match self.state.compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

impl<F: Future> Future for RepollOnSelfWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.shared.task.register(cx.waker());
        for _ in 0..MAX_POLLS {
            this.shared.state.store(POLLING, Ordering::Release);
            let polled = this.inner.as_mut().poll(&mut Context::from_waker(&this.waker));
            let state = this.shared.state.swap(IDLE, Ordering::AcqRel);
            if polled.is_ready() || state != WOKEN {
                return polled;
            }
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        // Still waking itself: a turn for the other tasks first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

// `inner` is boxed, so moving the wrapper never moves it.
impl<F> Unpin for RepollOnSelfWake<F> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that wakes itself `self_wakes` times during its polls, then is ready.
    struct WakesItself {
        self_wakes: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Future for WakesItself {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.self_wakes == 0 {
                return Poll::Ready(());
            }
            self.self_wakes -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Counts the wakes a task receives.
    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_self_woken_future_is_polled_again_without_waking_its_task() {
        let polls = Arc::new(AtomicUsize::new(0));
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&task));
        let mut future = repoll_on_self_wake(WakesItself { self_wakes: 3, polls: Arc::clone(&polls) });
        let polled = Pin::new(&mut future).poll(&mut Context::from_waker(&waker));
        assert!(polled.is_ready(), "three self-wakes are answered by three more polls in one");
        assert_eq!(polls.load(Ordering::Relaxed), 4);
        assert_eq!(task.0.load(Ordering::Relaxed), 0, "the task was never woken");
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_after_a_bounded_number_of_polls() {
        let polls = Arc::new(AtomicUsize::new(0));
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&task));
        let mut future = repoll_on_self_wake(WakesItself { self_wakes: usize::MAX, polls: Arc::clone(&polls) });
        let polled = Pin::new(&mut future).poll(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), MAX_POLLS);
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "it yields through its task's waker, so it runs again");
    }

    #[test]
    fn a_wake_after_the_poll_reaches_the_task() {
        /// Pending, keeping the waker it was polled with for a later wake.
        struct Parks(Arc<std::sync::Mutex<Option<Waker>>>);
        impl Future for Parks {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                *self.0.lock().expect("not poisoned") = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        let kept = Arc::new(std::sync::Mutex::new(None));
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&task));
        let mut future = repoll_on_self_wake(Parks(Arc::clone(&kept)));
        assert!(Pin::new(&mut future).poll(&mut Context::from_waker(&waker)).is_pending());
        assert_eq!(task.0.load(Ordering::Relaxed), 0);
        // Woken later, from another thread, as a socket's readiness would.
        let later = kept.lock().expect("not poisoned").take().expect("the inner future kept a waker");
        std::thread::spawn(move || later.wake()).join().expect("the waking thread ended");
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "a wake outside a poll is not lost");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakes_from_other_threads_during_polls_are_never_lost() {
        // Many short exchanges over a channel whose other end is on another worker: a lost
        // wake would hang one of them, and the test's timeout would fail it.
        let (to_echo, mut echo_in) = tokio::sync::mpsc::channel::<u64>(1);
        let (echo_out, mut back) = tokio::sync::mpsc::channel::<u64>(1);
        tokio::spawn(async move {
            while let Some(n) = echo_in.recv().await {
                if echo_out.send(n).await.is_err() {
                    break;
                }
            }
        });
        let exchanges = repoll_on_self_wake(async move {
            for n in 0..20_000u64 {
                to_echo.send(n).await.expect("echo alive");
                assert_eq!(back.recv().await, Some(n));
            }
        });
        tokio::time::timeout(std::time::Duration::from_secs(20), tokio::spawn(exchanges))
            .await
            .expect("no exchange waited forever")
            .expect("the exchanges did not panic");
    }
}
