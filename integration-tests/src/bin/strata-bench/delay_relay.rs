//! A TCP relay that delays every byte by a fixed time in each direction: the emulated hop's
//! delay where the kernel has no `netem`. Each direction of each connection is a reader
//! thread that stamps what it reads and a writer thread that sends it on when its time
//! comes; OS threads rather than tokio tasks, because tokio's timer has millisecond
//! granularity and the delay is half of that. Both sides run with TCP_NODELAY.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Listens on `bind` and relays each connection to `target`, `one_way` later each way.
pub struct DelayRelay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl DelayRelay {
    pub fn start(bind: SocketAddr, target: SocketAddr, one_way: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        std::thread::Builder::new().name("delay-relay".into()).spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                if let Err(err) = relay(client, target, one_way) {
                    eprintln!("delay relay: {err:#}");
                }
            }
        })?;
        Ok(Self { addr, stop })
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn relay(client: TcpStream, target: SocketAddr, one_way: Duration) -> anyhow::Result<()> {
    let server = TcpStream::connect(target)?;
    for stream in [&client, &server] {
        stream.set_nodelay(true)?;
    }
    delayed_copy(client.try_clone()?, server.try_clone()?, one_way)?;
    delayed_copy(server, client, one_way)?;
    Ok(())
}

/// Copies `from` to `to`, each chunk `delay` after it was read, in order.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, delay: Duration) -> anyhow::Result<()> {
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::Builder::new().name("delay-relay-read".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if chunks.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping the sender ends the writer once it has sent what is queued.
    })?;
    std::thread::Builder::new().name("delay-relay-write".into()).spawn(move || {
        for (at, chunk) in due {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_and_a_round_trip_takes_twice_the_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = echo.local_addr().expect("addr");
        std::thread::spawn(move || {
            let (mut conn, _) = echo.accept().expect("accept");
            let mut buf = [0u8; 1024];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let delay = Duration::from_millis(20);
        let relay = DelayRelay::start("127.0.0.1:0".parse().expect("addr"), target, delay).expect("relay");
        let mut client = TcpStream::connect(relay.addr).expect("connect");
        let started = Instant::now();
        client.write_all(b"hello, hop").expect("write");
        let mut got = [0u8; 10];
        client.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello, hop");
        assert!(started.elapsed() >= 2 * delay, "{:?}", started.elapsed());
    }
}
